"""One reply as the engine's sequence state (nano-vllm's `Sequence`): the ids its cache is to hold, how many it
holds (`computed`), the cache itself (parked on the host while preempted), and the reply as a state machine
(take a KV, accept logits, feed a token, end) with sampling, stop conditions and streamed text. It knows
nothing of sessions.

The engine loop drives Generations, many at once through packed forwards, a lone one through the plain forward.
When one has ended, its KV, ids and timings describe exactly what was computed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from chatrt.cache.kv import KV, new_cache
from chatrt.config import GREEDY_BELOW, GenerationConfig
from chatrt.engine.grammar import Constraint, Lazy, Triggered, compile_schema
from chatrt.model import LoadedModel
from chatrt.template import decode

FinishReason = Literal["stop", "length", "stop_string", "cancelled"]


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, and the most likely tokens at its step."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token, log-probability), most likely first."""


class Piece(str):
    """A piece of a reply that asked for logprobs: its text, carrying the tokens that spell it (since the last
    piece) with their log-probabilities."""

    logprobs: tuple[TokenLogprob, ...]

    def __new__(cls, text: str, logprobs: tuple[TokenLogprob, ...]) -> Piece:
        piece = super().__new__(cls, text)
        piece.logprobs = logprobs
        return piece


def sample(
    logits: torch.Tensor,
    p: GenerationConfig,
    generator: torch.Generator | None,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> int:
    """Greedy at temperature 0, else temperature / top-k / top-p sampling, after the logit bias, the repetition
    penalty on the tokens marked in `seen` (transformers') and the frequency and presence penalties on the
    reply's token `counts` (OpenAI's), in vLLM's order. logits, seen, counts: [V]."""
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=logits.device)
        logits = logits.index_add(0, ids, torch.tensor(list(p.logit_bias.values()), device=logits.device))
    if seen is not None:
        r = p.repetition_penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * r, logits / r), logits)
    if counts is not None:
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
    if p.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if torch.isposinf(logits).any():  # a penalty far below 1 overflowed: the limit is uniform over those tokens
        logits = torch.where(torch.isposinf(logits), 0.0, float("-inf"))
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, -1) > p.top_p  # keep the token that crosses top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability under the logits ([V]) and the `top` most likely tokens'."""
    logprobs = torch.log_softmax(logits.float(), -1)
    best = torch.topk(logprobs, top) if top else None
    alternatives = tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else ()
    return TokenLogprob(token, float(logprobs[token]), alternatives)


class TextStream:
    """Turns generated ids into text deltas that never split a character, and applies stop strings.

    Text that could be the start of a stop string is held back until it is known not to be one.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # all complete text decoded so far (stop string cut away once found)
        self.emitted = 0  # characters of self.text handed out
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:  # the reply already ended at a stop string
            return ""
        self.ids.append(token)
        full = self._decode(self.ids)
        if full.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        self.text = full
        return self._release(final=False)

    def finish(self) -> str:
        """The held-back rest, once no more tokens will come."""
        if not self.stopped:
            self.text = self._decode(self.ids)
        return self._release(final=True)

    def kept_tokens(self) -> int:
        """After a stop string: how many leading ids spell only text before it (the reply's own tokens)."""
        n = len(self.ids)
        while n and len(self._decode(self.ids[:n])) > len(self.text):
            n -= 1
        return n

    def _release(self, *, final: bool) -> str:
        if self.stop and not self.stopped:
            # Search from where a stop string could begin that was not complete at the last push.
            start = max(0, self.emitted - max(map(len, self.stop)))
            hits = [i for s in self.stop if (i := self.text.find(s, start)) != -1]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._partial_stop_len()
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _decode(self, ids: list[int]) -> str:
        return decode(self.tokenizer, ids)


@dataclass
class Generation:
    """One reply, driven by the engine: `begin`, then `accept` the logits of each step and feed `next_token`,
    then `end`. Once ended, `kv` holds exactly `kv.ids` (prompt + every generated token fed back), also when the
    consumer stopped early."""

    lm: LoadedModel
    kv: KV | None
    new_ids: list[int]
    params: GenerationConfig
    started: float = field(default_factory=time.perf_counter)
    calls: Lazy | None = None
    """The grammar of tool calls the reply may write, held from where it begins one (its trigger) on."""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason = "cancelled"
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    ended_at: float = 0.0
    prompt_len: int = 0
    marks: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)])
    """(characters handed out, reply tokens that spell them) after each piece: where a stopped reply can be cut."""
    prefill_only: bool = False
    """Only compute the KV of the prompt (a shared prefix, a probe): ends when the prompt is in, sampling nothing."""
    done: bool = False
    next_token: int = -1
    """The token sampled last, to be fed at the next step (while not done)."""
    cache: DynamicCache | None = None
    fed: list[int] = field(default_factory=list)
    """The ids the cache holds once the prompt is in: the prompt, then each generated token fed back."""
    computed: int = 0
    """How many leading ids of `fed` the cache holds (the rest of the prompt is still to prefill)."""
    parked: KV | None = None
    """The cache while preempted: on the host, until `unpark`."""
    shared: tuple[KV, ...] = ()
    """The shared segments the cache starts from (read in place, never copied): the reply's KV references them."""
    _t0: float = 0.0
    _stream: TextStream | None = None
    _generator: torch.Generator | None = None
    _seen: torch.Tensor | None = None
    _counts: torch.Tensor | None = None  # [V]: how often the reply holds each token (frequency, presence)
    _constraint: Constraint | Triggered | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """Each reply token's log-probability, when the params ask for them."""
    _told: int = 0  # reply tokens whose logprobs went out with a piece
    _ended: bool = False

    def begin(self) -> None:
        """Take the KV handed in as this reply's cache. The KV is consumed: from here on `kv` is only what this
        generation computed, so a prefill that fails leaves nothing to keep."""
        source, self.kv = self.kv, None
        self.fed = [*(source.ids if source is not None else ()), *self.new_ids]
        self.computed = len(self.fed) - len(self.new_ids)
        self.prompt_len = len(self.fed)
        self.shared = source.shared if source is not None else ()
        self.cache = source.as_cache() if source is not None else new_cache()
        self._stream = TextStream(self.lm.tokenizer, self.params.stop)
        if self.params.seed is not None:
            self._generator = torch.Generator(device=self.lm.device).manual_seed(self.params.seed)
        if self.params.json_schema is not None and not self.prefill_only:
            self._constraint = Constraint(compile_schema(self.params.json_schema), self.lm.tokenizer,
                                          self.lm.info.vocab_size, self.lm.stop_ids)  # fmt: skip
        elif self.calls is not None and not self.prefill_only:
            self._constraint = Triggered(self.calls, self.lm.tokenizer, self.lm.info.vocab_size, self.lm.stop_ids)
        self._t0 = time.perf_counter()

    # -- what the engine schedules and runs ----------------------------------------------------------

    @property
    def to_prefill(self) -> int:
        """Prompt ids still to run through the model (0: decoding)."""
        return len(self.fed) - self.computed if self.computed < self.prompt_len else 0

    def inputs(self, n: int) -> list[int]:
        """The ids of this row's next step: the next `n` of the prompt, or the token sampled last."""
        return self.fed[self.computed : self.computed + n] if self.to_prefill else [self.next_token]

    def ran(self, n: int) -> None:
        """`n` prompt ids went through the model: the cache holds them."""
        assert 0 < n <= self.to_prefill
        self.computed += n

    def park(self) -> None:
        """Preempted: move the KV computed so far to the host, freeing its device memory until `unpark`."""
        if self.parked is None and self.cache is not None and self.cache.layers:
            self.parked = KV.from_cache(self.cache, tuple(self.fed[: self.computed]), self.shared).to("cpu")
            self.cache = new_cache()

    def unpark(self, device: torch.device) -> None:
        """Back in the batch: its KV returns to the device."""
        if self.parked is not None:
            self.cache, self.parked = self.parked.to(device).as_cache(), None

    # -- the reply ----------------------------------------------------------------------------------

    def accept(self, logits: torch.Tensor) -> str:
        """Sample the next token from the last position's logits ([V]); returns its text ("" while a character
        or a possible stop string is incomplete). Ends the reply at a stop token or string or at max_new_tokens;
        otherwise `next_token` is to be fed, then `advance()`."""
        assert not self.done and self._stream is not None
        p, stream = self.params, self._stream
        if not self.token_ids:  # the first token: the prompt is in the cache now
            self.prefill_s = time.perf_counter() - self._t0
            if p.repetition_penalty != 1.0:  # every token of the prompt (the reused part too) and of the reply
                self._seen = torch.zeros_like(logits, dtype=torch.bool)
                self._seen[torch.tensor(self.fed, device=logits.device)] = True
            if p.frequency_penalty or p.presence_penalty:
                self._counts = torch.zeros_like(logits)
        allowed = self._constraint.mask(logits) if self._constraint is not None else logits
        token = sample(allowed, p, self._generator, self._seen, self._counts)
        if not self.token_ids:
            self.ttft_s = time.perf_counter() - self.started
        if token in self.lm.stop_ids:
            return self._piece(self.end("stop"))
        if p.logprobs is not None:
            self.logprobs.append(token_logprob(logits, token, p.logprobs))
        if self._constraint is not None:
            self._constraint.feed(token)
        self.token_ids.append(token)
        if self._counts is not None:
            self._counts[token] += 1
        piece = stream.push(token)
        if piece:
            self.marks.append((stream.emitted, len(self.token_ids)))
        if stream.stopped:  # the tokens that spell the stop string are not the reply's, nor its cache's
            del self.token_ids[stream.kept_tokens() :]
            del self.logprobs[len(self.token_ids) :]
            rest = self.end("stop_string")
            if self.kv is not None:
                self.kv = self.kv.crop(min(len(self.kv), self.prompt_len + len(self.token_ids)))
            return self._piece(piece + rest)
        if len(self.token_ids) >= p.max_new_tokens:
            return self._piece(piece + self.end("length"))
        self.next_token = token
        return self._piece(piece)

    def _piece(self, text: str) -> str:
        """The text handed out, carrying its tokens' logprobs when the reply asks for them."""
        if self.params.logprobs is None or not text:
            return text
        told, self._told = self._told, len(self.logprobs)
        return Piece(text, tuple(self.logprobs[told:]))

    def advance(self) -> None:
        """`next_token` was fed: the cache holds it now."""
        self.fed.append(self.next_token)
        self.computed += 1
        if self._seen is not None:
            self._seen[self.next_token] = True
        self.decode_steps += 1

    def end(self, reason: FinishReason = "cancelled") -> str:
        """Finish (once): the text, and the KV of exactly what was fed (none when a failed step left layers of
        different lengths). Returns text held back until now (a possible stop string that was not one)."""
        if self._ended:
            return ""
        self._ended, self.done, self.finish_reason = True, True, reason
        rest = ""
        if self._stream is not None:
            rest = self._stream.finish() if reason != "cancelled" else ""
            self.text = self._stream.text if reason != "cancelled" else self._stream.text[: self._stream.emitted]
        self.ended_at = time.perf_counter()
        self.decode_s = self.ended_at - self._t0 - self.prefill_s if self._t0 else 0.0
        cache = self.cache  # kept only when every layer holds exactly `fed` (not when a step never ran or failed)
        if (
            cache is not None
            and len(cache.layers) == self.lm.info.num_layers
            and all(layer.get_seq_length() == len(self.fed) for layer in cache.layers)
        ):
            spare = 0.0 if self.prefill_only else 1 / 8  # a computed prefix is kept as it is, with no room to grow
            self.kv = KV.from_cache(cache, tuple(self.fed), self.shared).compact(spare)
        self.cache = None
        return rest

    def cut(self, chars: int) -> None:
        """A stream stopped by a consumer that received only its first `chars` characters (pieces it was handed,
        so a piece boundary): that is the reply, spelled by the tokens generated up to that piece, and the KV
        keeps only those. Call once iteration has ended."""
        if chars >= len(self.text):
            return
        self.text, self.finish_reason = self.text[:chars], "cancelled"
        tokens = next(t for c, t in self.marks if c == chars)
        self.token_ids = self.token_ids[:tokens]
        del self.logprobs[tokens:]
        if self.kv is not None:  # a view: the tokens after the cut are no longer part of this session's cache
            self.kv = self.kv.crop(self.prompt_len + tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0
