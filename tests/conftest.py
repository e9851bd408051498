"""Shared fixtures: the bundled tokenizer, a tiny random Llama on it, the bundled model, runtimes, references,
and a real redis-server started on a free loopback port for the test session."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig, LlamaForCausalLM

from chatrt import ChatRuntime, Config
from chatrt.cache.kv import KV, new_cache
from chatrt.config import EngineConfig, ModelConfig
from chatrt.engine import Engine, forward
from chatrt.model import LoadedModel, _gguf_folder, bundled_gguf, cache_root
from chatrt.redis_server import redis_server

# Compiling the bundled model's decode step takes minutes of CPU: processes the suite starts (chatrt serve, chat,
# scripts) run eagerly unless a test asks; tests/test_compiled.py compiles on purpose.
os.environ.setdefault("CHATRT_ENGINE__COMPILE", "off")


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch) -> Path:
    """Every test keeps its chats (the UI's store) in a folder of its own."""
    folder = tmp_path / "data"
    monkeypatch.setenv("CHATRT_DATA_DIR", str(folder))
    return folder


@pytest.fixture(scope="session")
def bundled_folder():
    """The bundled GGUF dequantized to a transformers folder (made once per machine, then read in 0.2 s)."""
    folder, weights_id, _ = _gguf_folder(bundled_gguf(), cache_root(ModelConfig()), progress=lambda _: None)
    return folder, weights_id


@pytest.fixture(scope="session")
def tokenizer(bundled_folder):
    return AutoTokenizer.from_pretrained(bundled_folder[0])


def tiny_llama(tokenizer, seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(config).to(dtype)
    return LoadedModel.wrap(model, tokenizer, name=f"tiny-{seed}")


def scripted_llama(tokenizer, text: str, after: int, end: int) -> LoadedModel:
    """A real Llama whose weights make it write `text` greedily whenever the last token is `after`, then `end`:
    its layers are zero, so each position's logits come from its own token alone (a bigram table), and each
    token of the script has a one-hot embedding its head maps to the next. Every token of `text` must differ
    from the others; any other token's logits are all zero (token 0)."""
    script = [after, *tokenizer(text, add_special_tokens=False).input_ids, end]
    assert len(set(script[:-1])) == len(script) - 1, "each token of the script once"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.model.norm.weight.fill_(1.0)
        for i, (token, following) in enumerate(itertools.pairwise(script)):
            model.model.embed_tokens.weight[token, i] = 1.0
            model.lm_head.weight[following, i] = 10.0
    return LoadedModel.wrap(model, tokenizer, name="scripted")


@pytest.fixture(scope="session")
def tiny_lm(tokenizer) -> LoadedModel:
    return tiny_llama(tokenizer)


@pytest.fixture(scope="session")
def bundled_lm(bundled_folder) -> LoadedModel:
    folder, weights_id = bundled_folder
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return LoadedModel.wrap(model, AutoTokenizer.from_pretrained(folder), name="bundled", weights_id=weights_id)


@pytest.fixture
def runtime(tiny_lm) -> Iterator[ChatRuntime]:
    with ChatRuntime(tiny_lm, Config().with_values(generation={"max_new_tokens": 12})) as rt:
        yield rt


@pytest.fixture
def bundled_runtime(bundled_lm) -> Iterator[ChatRuntime]:
    config = Config().with_values(generation={"max_new_tokens": 24}, engine={"compile": "off"})
    with ChatRuntime(bundled_lm, config) as rt:
        yield rt


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture
def redis_client(redis_url) -> Iterator[redis.Redis]:
    """A client on an empty database: every test starts with no keys."""
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.close()


def tiered(lm: LoadedModel, redis_url: str = "", max_new_tokens: int = 12, **tiers) -> ChatRuntime:  # type: ignore[no-untyped-def]
    """A runtime with tier budgets (and Redis when a URL is given)."""
    config = Config().with_values(generation={"max_new_tokens": max_new_tokens},
                                  tiers={"redis_url": redis_url, **tiers}, engine={"compile": "off"})  # fmt: skip
    return ChatRuntime(lm, config)


def reference_reply(
    lm: LoadedModel, prompt: list[int], max_new_tokens: int, *, use_cache: bool = False, **options: float
) -> tuple:
    """What plain transformers generates greedily from the full prompt, with no reused cache (`options`: more
    `generate` arguments)."""
    with torch.inference_mode():
        out = lm.model.generate(
            torch.tensor([prompt], device=lm.device),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=lm.device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(lm.stop_ids),
            pad_token_id=lm.tokenizer.pad_token_id,
            use_cache=use_cache,
            **options,
        )
    new = out[0, len(prompt) :].tolist()
    return tuple(new[:-1] if new and new[-1] in lm.stop_ids else new)


def compute_kv(lm: LoadedModel, ids: tuple[int, ...] | list[int]) -> KV:
    """The KV of `ids` from scratch, as the engine computes a shared prefix (one row, the whole prompt)."""
    return Engine(lm, EngineConfig(max_batch=1, prefill_chunk=0), thread=False).compute_kv(tuple(ids))


def prefill(lm: LoadedModel, kv: KV | None, ids: list[int]) -> tuple[torch.Tensor, DynamicCache]:
    """The engine's lone-row forward of `ids` after `kv`: the last position's logits ([V]) and the grown cache."""
    cache = kv.as_cache() if kv is not None else new_cache()
    return forward(lm, cache, ids), cache


def threaded(fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    """`fn()` on another thread: its result, or its exception raised here; a call that hangs fails the test
    instead of hanging the suite."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"did not return within {timeout} s (a deadlock?)"
    if "error" in result:
        raise result["error"]
    return result.get("value")


def live_keys(client: redis.Redis) -> list[bytes]:
    """chatrt's keys in Redis but the tombstones of closed sessions (a few bytes each) and shared prefixes (kept
    once for every process, not any session's), both expiring with the TTL."""
    return sorted(k for k in client.keys("chatrt:*") if not k.endswith(b":closed") and b":prefix:" not in k)


@pytest.fixture(scope="session")
def tiny_folder(tiny_lm, tmp_path_factory) -> Path:
    """The tiny model saved as a transformers folder, for processes that load it by path (`chatrt serve`)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_lm.model.save_pretrained(folder)
    tiny_lm.tokenizer.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served(str):
    """A served base URL (…/v1) that also knows its process: `pid`, and `printed()`, what it has printed so far."""

    pid: int
    printed: Callable[[], str]


@contextlib.contextmanager
def serve(model: str | Path, max_new_tokens: int = 12, **env: object) -> Iterator[Served]:
    """A real `chatrt serve` process on a free loopback port; yields its base URL (…/v1) once /healthz answers.
    `env`: CHATRT_* settings, e.g. SERVE__API_KEY="k" or TIERS__REDIS_URL=url."""
    port = free_port()
    settings = {"GENERATION__MAX_NEW_TOKENS": max_new_tokens, **env}
    environ = {**os.environ, **{f"CHATRT_{k}": str(v) for k, v in settings.items()}}
    chatrt = Path(sys.executable).with_name("chatrt")
    cmd = [str(chatrt), "serve", "--model", str(model), "--dtype", "float32", "--port", str(port)]
    with tempfile.NamedTemporaryFile(mode="w+") as out:  # read back when it fails to start
        proc = subprocess.Popen(cmd, env=environ, stdout=out, stderr=subprocess.STDOUT, text=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    out.seek(0)
                    raise AssertionError(f"chatrt serve exited with {proc.returncode}: {out.read()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                assert time.monotonic() < deadline, "chatrt serve did not start within 120 s"
                time.sleep(0.2)
            served = Served(f"{base}/v1")
            served.pid = proc.pid
            served.printed = lambda: Path(out.name).read_text()
            yield served
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def client(server: str) -> Iterator[openai.OpenAI]:
    """The official client on the module's `server` (a served base URL), as its users set it up."""
    c = openai.OpenAI(base_url=server, api_key="unused", max_retries=0)
    yield c
    c.close()


def assert_greedy(lm: LoadedModel, prompt: list[int], got: tuple[int, ...], max_new_tokens: int) -> bool:
    """`got` is plain transformers' greedy reply to `prompt`, or left it only at a near-tie: where they part,
    the top-2 gap of the eager logits is below 1e-3 (printed). Returns whether they were identical."""
    want = reference_reply(lm, prompt, max_new_tokens)
    if got == want:
        return True
    k = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    with torch.inference_mode():
        logits = lm.model(torch.tensor([prompt + list(want[:k])], device=lm.device)).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    gap = float(top[0] - top[1])
    print(f"a reply left greedy at token {k}: top-2 logit gap {gap:.2e}")
    assert gap < 1e-3, f"not a near-tie (gap {gap:.3f}): {got} vs {want}"
    return False
