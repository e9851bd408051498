"""The bench report's picture: median TTFT by turn number, one line per mode, saved as a PNG.

matplotlib is imported here only, with the file-only Agg backend, so nothing else pays for it.
"""

from __future__ import annotations

from pathlib import Path

from chatrt.bench.reuse import Report


def ttft_by_turn(report: Report, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    w = report.workload
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for result in report.results:
        turns = range(1, len(result.ttft_by_turn_s) + 1)
        ax.plot(turns, [s * 1000 for s in result.ttft_by_turn_s], marker="o", markersize=3, label=result.mode)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("turn")
    ax.set_ylabel("median TTFT over sessions (ms, log scale)")
    ax.set_title(
        f"{report.model} · {report.dtype} · {report.device} · {w.sessions} sessions × {w.turns} turns "
        f"(preset {w.name})",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
