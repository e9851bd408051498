"""Time spent inside named functions while a block runs: how the benches split a step into its parts."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def spent_in(owner: Any, *names: str) -> Iterator[list[float]]:
    """Seconds spent in each call of `owner`'s `names` (a module's functions, a class's methods) while in the
    block; callers that look them up on `owner` at call time are timed."""
    spent: list[float] = []
    originals = {name: getattr(owner, name) for name in names}

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - t0)

        return call

    for name, fn in originals.items():
        setattr(owner, name, timed(fn))
    try:
        yield spent
    finally:
        for name, fn in originals.items():
            setattr(owner, name, fn)
