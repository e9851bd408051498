"""Building the compiled step ahead of time, in a process of its own: `python -m chatrt.engine.aot MODEL DEVICE
TOKENS PACKAGE` loads the model saved in the folder MODEL, exports its step for 1 to TOKENS tokens (`torch.export`)
and compiles it with AOTInductor into PACKAGE, which any process then loads in seconds.
Exporting and compiling take a minute or two of one core and change process-wide tracing state; in a process
of their own (at a lower priority) they neither hold the serving process's GIL nor disturb its steps.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from chatrt.engine.compiled import llama_forward


class Step(torch.nn.Module):
    """`llama_forward` as a module, for `torch.export`."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        return llama_forward(self.model, ids, positions, last)


def export(model: PreTrainedModel, max_tokens: int) -> torch.export.ExportedProgram:
    """The model's step for 1 to `max_tokens` tokens in 1 to that many rows, exported."""
    # Examples inside the ranges (export specializes a dimension whose example is 1), each a tensor of its own
    # (one tensor given twice would be traced as one input).
    n = min(2, max_tokens)
    ids, positions = (torch.zeros(1, n, dtype=torch.long, device=model.device) for _ in range(2))
    last = torch.arange(n, device=model.device)
    shapes = None
    if max_tokens > 1:
        tokens = torch.export.Dim("tokens", min=1, max=max_tokens)
        shapes = ({1: tokens}, {1: tokens}, {0: torch.export.Dim("rows", min=1, max=max_tokens)})
    with torch.inference_mode():
        return torch.export.export(Step(model), (ids, positions, last), dynamic_shapes=shapes, strict=False)


def inductor_configs(device: torch.device) -> dict[str, object]:
    """On a CPU: weights frozen into the graph and pre-packed for inductor's C++ GEMM micro-kernels, chosen by
    autotuning against ATen's (they read the weights about twice as fast as eager PyTorch's GEMV)."""
    if device.type != "cpu":
        return {}
    return {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def build(folder: Path, device: torch.device, max_tokens: int, package: Path) -> None:
    """Compile the decode step of the model saved in `folder` into `package` (written whole or not at all:
    another process may be loading or building the same one)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").to(device).eval()
    program = export(model, max_tokens)
    partial = package.with_name(f"{package.stem}.{os.getpid()}.partial.pt2")
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(partial),
                                                 inductor_configs=inductor_configs(device))  # fmt: skip
        os.replace(partial, package)
    finally:
        partial.unlink(missing_ok=True)


if __name__ == "__main__":
    with contextlib.suppress(OSError):
        os.nice(10)  # the serving process comes first
    build(Path(sys.argv[1]), torch.device(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
