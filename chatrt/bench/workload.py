"""The bench's workload: its modes, presets (configs/bench/*.toml) and the support-desk text it is made of.
Light on purpose (pydantic and tomllib): the command line builds its options from it without loading torch."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chatrt.errors import ConfigError

Mode = Literal["recompute", "prefix", "session", "full", "pressure", "pressure-redis"]
FULL = {"prefix": {"enabled": True}, "session": {"reuse": True}}
MODES: dict[str, dict[str, dict[str, bool]]] = {
    "recompute": {"prefix": {"enabled": False}, "session": {"reuse": False}},
    "prefix": {"prefix": {"enabled": True}, "session": {"reuse": False}},
    "session": {"prefix": {"enabled": False}, "session": {"reuse": True}},
    "full": FULL,
    # full, with a device tier too small for the sessions: caches move down the ladder between their turns
    "pressure": FULL,
    "pressure-redis": FULL,
}
PRESETS = Path(__file__).resolve().parents[2] / "configs" / "bench"
# The workload reads like a support desk: a policy system prompt and real questions, so the model
# answers at a natural length (random words make it refuse in a few tokens, which no user does).
POLICY = (
    "Parcels sent by {a} service arrive within {n} working days.",
    "A {b} parcel may be returned within {m} days of delivery for a full refund.",
    "Customers who report a {b} item must attach a photo and the tracking number.",
    "Refunds go back to the original card within {n} working days of approval.",
    "The courier tries to deliver {n} times before the parcel goes to the nearest pickup locker.",
    "Orders over {m} euros ship by {a} service at no extra cost.",
    "Never share a customer's address or card number in a reply.",
    "When a question is unclear, ask one short question before answering.",
)
FILL = {"a": ("express", "standard", "weekend", "economy"), "b": ("damaged", "late", "missing", "wrong")}
QUESTIONS = (
    "Where is my parcel? The tracking page has not changed for three days.",
    "How do I return a jacket that does not fit?",
    "My package arrived damaged. What should I do?",
    "Can I change the delivery address after the order has shipped?",
    "How long does a refund take to reach my card?",
    "Why was I charged a customs fee for my order?",
    "Can the courier leave the parcel with my neighbour?",
    "What is the difference between express and standard delivery?",
    "I received the wrong item. Can you send the right one?",
    "Do you deliver on weekends and public holidays?",
    "How can I pick up my parcel from a locker?",
    "Can I cancel an order that I placed an hour ago?",
    "The courier says nobody was home, but I was. What now?",
    "Is it possible to get an invoice with my company's name on it?",
    "Which countries do you ship to, and how long does it take?",
    "My discount code did not work at checkout. Can you help?",
)


class Workload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    """The preset it came from, for the report."""
    sessions: int = Field(4, ge=1)
    turns: int = Field(8, ge=1)
    system_words: int = Field(300, ge=0)
    """Words of the system prompt every session shares (0: the template's default)."""
    user_words: int = Field(1, ge=1)
    """Questions shorter than this get a sentence of context appended (1: the bare questions)."""
    max_new_tokens: int = Field(256, ge=1)
    interleave: bool = True
    """Every session takes turn t before any takes turn t + 1 (False: one session's turns after another's)."""
    seed: int = 0
    modes: tuple[Mode, ...] = ("recompute", "prefix", "session", "full", "pressure", "pressure-redis")
    device_sessions: int = Field(0, ge=0)
    """Session caches the device tier holds in the pressure modes (0: half the sessions, at least one)."""
    host_sessions: int = Field(1, ge=0)
    """Session caches the host tier holds in the pressure modes."""
    repeats: int = Field(1, ge=1)
    """Runs of each mode; its figures are the median over them (the turns listed are the first run's)."""
    restore_tokens: int = Field(2000, ge=0)
    """History length of the Redis restore vs recompute measurement (0 skips it)."""

    def pressure_tiers(self, redis_url: str) -> dict[str, object]:
        tiers: dict[str, object] = {
            "device_sessions": self.device_sessions or max(1, self.sessions // 2),
            "host_sessions": self.host_sessions,
            "redis_url": redis_url,
        }
        return tiers if self.host_sessions else {**tiers, "host_bytes": 0}  # no host tier at all


def load_preset(name: str) -> Workload:
    """A preset by name (`configs/bench/<name>.toml`) or a path to a TOML file of Workload fields."""
    path = Path(name) if name.endswith(".toml") else PRESETS / f"{name}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.toml")))
        raise ConfigError(f"no bench preset {name!r}; use one of {known} or a .toml file")
    try:
        return Workload.model_validate({"name": path.stem, **tomllib.loads(path.read_text())})
    except (tomllib.TOMLDecodeError, ValidationError) as e:
        raise ConfigError(f"bench preset {path}: {e}") from None


def machine_load() -> tuple[float, int]:
    """(1-minute load average, cores): figures taken while the first exceeds the second are suspect."""
    cores = os.cpu_count() or 1
    try:
        return os.getloadavg()[0], cores
    except OSError:  # not available on this platform
        return 0.0, cores
