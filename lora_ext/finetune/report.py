"""What a run leaves behind besides the adapter: the loss curve as a PNG and a JSON summary."""
from __future__ import annotations

import json
import resource

import torch

from ..atomic import write_file, write_text


def peak_memory_mib(device: torch.device) -> tuple:
    """(MiB, what was measured): CUDA's peak allocated memory, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def plot_losses(losses: list, eval_losses: dict, path: str, title: str) -> None:
    # A Figure on the Agg canvas, as bench/plot.py: no pyplot state, no process-wide backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train loss (per step)")
    smooth, avg = [], None
    for v in losses:
        avg = v if avg is None else 0.9 * avg + 0.1 * v
        smooth.append(avg)
    ax.plot(steps, smooth, color="tab:blue", linewidth=2, label="train loss (moving average)")
    if eval_losses:
        ax.plot(list(eval_losses), list(eval_losses.values()), "o-", color="tab:orange", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_file(path, lambda tmp: fig.savefig(tmp, format="png"))


def write_summary(summary: dict, path: str) -> None:
    write_text(path, json.dumps(summary, indent=2))
