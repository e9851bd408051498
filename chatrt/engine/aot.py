"""Building the compiled decode step ahead of time, in a process of its own: `python -m chatrt.engine.aot MODEL
DEVICE ROWS PACKAGE` loads the model saved in the folder MODEL, exports its decode step for 1 to ROWS rows
(`torch.export`) and compiles it with AOTInductor into PACKAGE, which any process loads in about a second.
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

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return llama_forward(self.model, ids, positions)


def export(model: PreTrainedModel, max_rows: int) -> torch.export.ExportedProgram:
    """The model's decode step for 1 to `max_rows` rows (one token each), exported."""
    rows = min(2, max_rows)  # an example inside the range: export specializes a dimension whose example is 1
    ids, positions = (torch.zeros(1, rows, dtype=torch.long, device=model.device) for _ in range(2))  # two: one
    # tensor given twice would be traced as one input
    shapes = None
    if max_rows > 1:
        tokens = torch.export.Dim("tokens", min=1, max=max_rows)
        shapes = ({1: tokens}, {1: tokens})
    with torch.inference_mode():
        return torch.export.export(Step(model), (ids, positions), dynamic_shapes=shapes, strict=False)


def inductor_configs(device: torch.device) -> dict[str, object]:
    """On a CPU: weights frozen into the graph and pre-packed for inductor's C++ GEMM micro-kernels, chosen by
    autotuning against ATen's (they read the weights about twice as fast as eager PyTorch's GEMV)."""
    if device.type != "cpu":
        return {}
    return {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def build(folder: Path, device: torch.device, max_rows: int, package: Path) -> None:
    """Compile the decode step of the model saved in `folder` into `package` (written whole or not at all:
    another process may be loading or building the same one)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").to(device).eval()
    program = export(model, max_rows)
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
