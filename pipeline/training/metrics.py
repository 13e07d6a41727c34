"""Run-directory outputs of training: metrics.jsonl, TensorBoard events, loss.png, state.json.

Only the main process writes; the others get a logger that does nothing.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from pipeline.training.trackers import open_trackers

METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.json"


class MetricsLogger:
    """Appends one JSON object per logged step and passes the scalars to the trackers that
    run.trackers names (trackers.py: TensorBoard, W&B, MLflow)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int = 0, cfg=None):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.trackers = []
        if not enabled:
            return
        truncate_after(self.path, resume_step)
        if cfg is not None:
            self.trackers = open_trackers(cfg, Path(run_dir))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in values.items()}, "time": time.time()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {
            k: v
            for k, v in record.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for tracker in self.trackers:
            tracker.log(step, scalars)

    def close(self, status: str = "finished") -> None:
        """status: finished, interrupted or failed (W&B's exit code, MLflow's run status)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(status)


def _clean(value):
    value = float(value) if hasattr(value, "__float__") and not isinstance(value, int) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_metrics(path: str | Path) -> list[dict]:
    """Every complete JSON line of a metrics file (a torn last line is skipped)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after `step`: a resumed run logs those steps again."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def write_state(run_dir: str | Path, **fields) -> None:
    """`state.json`: status (running, finished, interrupted, failed), step, steps planned."""
    path = Path(run_dir) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**fields, "updated": time.time()}))
    tmp.replace(path)


def plot_losses(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """loss.png: train loss against step, with eval loss where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out or Path(run_dir) / "loss.png")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
