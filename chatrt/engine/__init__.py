"""What computes: one reply's sequence state (Generation), how a step runs the model (runner: a lone row's plain
forward, or many rows packed), the scheduler and the engine loop that owns the model.

A turn becomes a request: `Engine.submit(generation)` queues it; one thread runs `step()` = schedule → run
the model once over every scheduled row → sample each row and deliver its piece.
"""

from chatrt.engine.generation import GREEDY_BELOW, FinishReason, Generation, Piece, TextStream, TokenLogprob, sample
from chatrt.engine.loop import Engine, Request
from chatrt.engine.runner import forward

__all__ = ["GREEDY_BELOW", "Engine", "FinishReason", "Generation", "Piece", "Request", "TextStream", "TokenLogprob",
           "forward", "sample"]
