"""Models load from the bundled GGUF (cached) or a folder, and carry a fingerprint of what made them."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from chatrt.config import ModelConfig
from chatrt.errors import ModelLoadError
from chatrt.model import fingerprint, load, resolve_dtype
from tests.conftest import tiny_llama


def test_fingerprint_names_weights_dtype_and_template(tokenizer, tiny_lm):
    assert tiny_llama(tokenizer, seed=0).info.fingerprint == tiny_lm.info.fingerprint
    assert tiny_llama(tokenizer, seed=1).info.fingerprint != tiny_lm.info.fingerprint
    assert tiny_llama(tokenizer, dtype=torch.bfloat16).info.fingerprint != tiny_lm.info.fingerprint
    other = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other.chat_template = tokenizer.chat_template + " "
    info = tiny_lm.info
    assert fingerprint("w", info, other) != fingerprint("w", info, tokenizer)


def test_geometry_and_stop_tokens(tiny_lm, tokenizer):
    assert (tiny_lm.info.num_layers, tiny_lm.info.num_kv_heads, tiny_lm.info.head_dim) == (2, 2, 16)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in tiny_lm.stop_ids


def test_dtype_choice():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_missing_sources_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load(ModelConfig(source=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(ModelConfig(source=str(tmp_path / "x.gguf")))
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA"):
            load(ModelConfig(device="cuda"))


@pytest.mark.bundled
def test_bundled_model_loads_from_the_cache_with_a_stable_fingerprint(bundled_lm):
    lm = load(ModelConfig(dtype="float32"))
    assert lm.info.num_layers == 30 and lm.info.num_kv_heads == 3 and lm.info.max_context == 8192
    assert lm.info.kv_bytes_per_token == 46080
    assert lm.info.fingerprint == bundled_lm.info.fingerprint
    assert load(ModelConfig(dtype="bfloat16")).info.fingerprint != lm.info.fingerprint


@pytest.mark.bundled
def test_a_local_folder_loads_too(bundled_folder):
    lm = load(ModelConfig(source=str(bundled_folder[0]), dtype="float32"))
    assert lm.info.name == bundled_folder[0].name and lm.info.num_layers == 30


QUIET = """
from chatrt import ChatRuntime
with ChatRuntime.from_config() as rt:
    print(rt.open_session().send("Hi", max_new_tokens=4).stats.generated_tokens)
"""


@pytest.mark.bundled
def test_library_use_prints_nothing_but_what_the_bot_prints(bundled_folder):
    """No progress bars or warnings from transformers in a bot's logs (the model is cached by then)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATRT_", "TRANSFORMERS_"))}
    out = subprocess.run([sys.executable, "-c", QUIET], capture_output=True, text=True, env=env, check=True)
    assert out.stderr == "" and out.stdout.strip() == "4"


def test_a_hub_id_that_cannot_be_fetched_is_a_typed_error_that_says_what_to_do(tmp_path):
    """No test downloads: offline, the Hub answers nothing, and the user learns why and what else to pass."""
    import subprocess
    import sys

    code = (
        "from chatrt.config import ModelConfig\nfrom chatrt.errors import ModelLoadError\n"
        "from chatrt.model import load\n"
        "try:\n    load(ModelConfig(source='chatrt-tests/no-such-model'))\n"
        "except ModelLoadError as e:\n    print('ModelLoadError:', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.stdout.startswith("ModelLoadError:"), done.stderr
    assert "Hugging Face Hub" in done.stdout and "local folder" in done.stdout
    assert not (tmp_path / "hf" / "hub" / "models--chatrt-tests--no-such-model" / "blobs").exists()


def test_a_folder_that_looks_like_a_hub_id_is_read_as_a_folder(tiny_folder, tmp_path, monkeypatch):
    from chatrt.config import ModelConfig
    from chatrt.model import load

    (tmp_path / "org").mkdir()
    shutil.copytree(tiny_folder, tmp_path / "org" / "model")
    monkeypatch.chdir(tmp_path)
    lm = load(ModelConfig(source="org/model", dtype="float32"))
    assert lm.info.name == "model" and lm.info.origin == ""
