"""Config comes from TOML and CHATRT_* variables; mistakes are errors that name the key."""

from pathlib import Path

import pytest

from chatrt.config import Config
from chatrt.errors import ConfigError


def test_defaults_and_repo_config_load():
    cfg = Config.load("configs/default.toml", env={})
    assert cfg.model.source == "bundled"
    assert cfg.generation.temperature == 0.0
    assert Config() == Config.load(None, env={})


def test_the_repo_config_lists_every_key_at_its_default():
    import tomllib

    text = Path("configs/default.toml").read_text()
    listed = tomllib.loads(text)
    for section, model in Config.model_fields.items():
        fields = model.annotation.model_fields  # type: ignore[union-attr]
        unset = {k for k, f in fields.items() if f.default is None}  # TOML has no None: named in a comment
        assert set(listed[section]) == set(fields) - unset, section
        assert all(f"# {k} =" in text for k in unset), section
    assert Config.load("configs/default.toml", env={}) == Config()


def test_toml_values_and_byte_sizes(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\ndtype = "bfloat16"\n[prefix]\nmax_bytes = "64MiB"\n')
    cfg = Config.load(path, env={})
    assert cfg.model.dtype == "bfloat16"
    assert cfg.prefix.max_bytes == 64 * 2**20


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[model]\ndtpye = 'float32'\n", "model.dtpye"),
        ("[model]\ndtype = 'float8'\n", "model.dtype"),
        ("[generation]\nmax_new_tokens = 'many'\n", "generation.max_new_tokens"),
        ("[generation]\ntemperature = -1\n", "generation.temperature"),
        ("[nonsense]\nx = 1\n", "nonsense"),
    ],
)
def test_invalid_values_name_the_key(tmp_path, text, named):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        Config.load(path, env={})


def test_env_overrides(tmp_path):
    cfg = Config.load(None, env={"CHATRT_MODEL__DTYPE": "bfloat16", "CHATRT_GENERATION__MAX_NEW_TOKENS": "7"})
    assert cfg.model.dtype == "bfloat16" and cfg.generation.max_new_tokens == 7
    with pytest.raises(ConfigError, match="CHATRT_MODEL__DTPYE"):
        Config.load(None, env={"CHATRT_MODEL__DTPYE": "x"})
    with pytest.raises(ConfigError, match="CHATRT_BOGUS"):
        Config.load(None, env={"CHATRT_BOGUS": "1"})


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "nope.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.load(bad, env={})


def test_with_values_validates():
    assert Config().with_values(generation={"top_k": 5}).generation.top_k == 5
    with pytest.raises(ConfigError, match="top_k"):
        Config().with_values(generation={"top_k": -1})


def test_the_redis_secret_comes_from_the_environment_and_is_never_shown():
    cfg = Config.load(None, env={"CHATRT_TIERS__REDIS_SECRET": "20261124"})  # digits stay text
    assert cfg.tiers.redis_secret.get_secret_value() == "20261124"
    assert "20261124" not in cfg.model_dump_json() and "20261124" not in repr(cfg)


def test_turn_options_type_every_generation_option():
    from typing import get_type_hints

    from chatrt.config import GenerationConfig, TurnOptions

    # response_format is the turn's way to set json_schema (from a model class or OpenAI's object); tools and
    # tool_choice are the turn's alone (its prompt, and how its reply is read)
    turn_only = {"response_format", "tools", "tool_choice"}
    assert set(get_type_hints(TurnOptions)) == {*GenerationConfig.model_fields, *turn_only}


@pytest.mark.parametrize(
    ("other", "ours"), [("max_tokens", "max_new_tokens"), ("repeat_penalty", "repetition_penalty")]
)
def test_an_option_named_as_other_apis_do_says_chatrts_name(runtime, other, ours):
    with pytest.raises(ConfigError, match=f"chatrt calls it '{ours}'"):
        runtime.open_session().send("hi", **{other: 5})
