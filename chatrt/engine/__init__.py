"""What computes: one reply's state (Generation), the packed forward that runs many at once, the scheduler
and the engine loop that owns the model.

A turn becomes a request: `Engine.submit(generation)` queues it; one thread runs `step()` = schedule → run
the model once over every scheduled row → sample each row and deliver its piece.
"""

from chatrt.engine.generation import (
    GREEDY_BELOW,
    FinishReason,
    Generation,
    TextStream,
    compute_kv,
    decode_step,
    forward,
    prefill,
    sample,
)
from chatrt.engine.loop import Engine, Request

__all__ = [
    "GREEDY_BELOW",
    "Engine",
    "FinishReason",
    "Generation",
    "Request",
    "TextStream",
    "compute_kv",
    "decode_step",
    "forward",
    "prefill",
    "sample",
]
