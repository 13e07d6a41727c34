"""Config-driven experiments on the run directories the stages write: list, compare, sweep.

`summarize(dir)` reads a run directory (config.yaml, state.json, metrics.jsonl) into one row;
a half-written or corrupt directory becomes a row with its `problem`, never an exception.
`config_differences` and `plot_comparison` set runs side by side; `sweep` runs a stage once per
point of a grid of overrides, each point a normal run directory named after its overrides, so a
rerun skips finished points and resumes an interrupted one.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

from pipeline.checkpoint import Checkpointer
from pipeline.config import ConfigError, flat_keys, load_config
from pipeline.model import count_params
from pipeline.training.metrics import METRICS_FILE, STATE_FILE, read_metrics
from pipeline.training.stages import stage_of

COLUMNS = (
    "run",
    "stage",
    "params",
    "steps",
    "tokens",
    "train_loss",
    "eval_loss",
    "best_eval_loss",
    "tokens_per_sec",
    "wall_s",
    "status",
)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).exists() for name in ("config.yaml", STATE_FILE, METRICS_FILE, "checkpoints")
    )


def find_runs(root: str | Path) -> list[Path]:
    root = Path(root)
    if is_run_dir(root) and (root / "config.yaml").exists():
        return [root]
    if not root.is_dir():
        raise ConfigError(f"runs: {root} is not a directory")
    return sorted(p for p in root.iterdir() if is_run_dir(p))


def _stage(cfg, state: dict) -> str:
    """What the run records: state.json's stage (e.g. finetune-lora), else its config's."""
    return state.get("stage") or cfg.run.stage or "?"


def summarize(run_dir: str | Path) -> dict:
    """One row for a run directory; `problem` says what is wrong with a broken one."""

    run_dir = Path(run_dir)
    row: dict = {"run": run_dir.name, "dir": str(run_dir), "problem": None}
    try:
        cfg = load_config(run_dir / "config.yaml")
    except ConfigError as err:
        return {**row, "status": "broken", "problem": str(err)}
    state = {}
    if (run_dir / STATE_FILE).is_file():
        try:
            state = json.loads((run_dir / STATE_FILE).read_text())
        except json.JSONDecodeError as err:
            row["problem"] = f"{STATE_FILE} is not valid JSON ({err})"
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("loss") is not None]
    evals = [r["eval_loss"] for r in records if r.get("eval_loss") is not None]
    speeds = sorted(r["tokens_per_sec"] for r in train if r.get("tokens_per_sec"))
    times = [r["time"] for r in records if r.get("time")]
    status = state.get("status", "unknown").split(" ")[0]  # "interrupted (signal 15)" etc.
    if status in ("interrupted", "failed") and _has_checkpoint(run_dir):
        status += "-resumable"  # the same command continues it from its last checkpoint
    row.update(
        {
            "stage": _stage(cfg, state),
            "name": cfg.run.name,
            "params": count_params(cfg.model),
            "steps": state.get("step", train[-1]["step"] if train else 0),
            "steps_planned": state.get("steps", cfg.train.steps),
            "tokens": train[-1].get("tokens") if train else 0,
            "train_loss": train[-1]["loss"] if train else None,
            "eval_loss": evals[-1] if evals else None,
            "best_eval_loss": min(evals) if evals else None,
            "tokens_per_sec": speeds[len(speeds) // 2] if speeds else None,
            "wall_s": (times[-1] - times[0]) if len(times) > 1 else None,
            "status": status,
        }
    )
    if state.get("error"):
        row["problem"] = state["error"]
    return row


def _has_checkpoint(run_dir: Path) -> bool:

    if not (run_dir / "checkpoints").is_dir():
        return False
    checkpoints = Checkpointer(run_dir / "checkpoints", use_async=False)
    try:
        return checkpoints.latest_step() is not None
    finally:
        checkpoints.close()


def sort_rows(rows: list[dict], key: str | None) -> list[dict]:
    if not key:
        return rows
    if key not in COLUMNS:
        raise ConfigError(f"--sort: {key!r} is not a column; valid: {', '.join(COLUMNS)}")

    def order(row):
        value = row.get(key)
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        return (missing, value if not missing else 0)

    return sorted(rows, key=order)


def format_table(rows: list[dict]) -> str:
    """A plain-text table of run rows (problems listed under it)."""

    def cell(row, key):
        value = row.get(key)
        if value is None:
            return "-"
        if key == "params":
            return f"{value / 1e6:.2f}M"
        if key == "steps":
            return f"{value}/{row.get('steps_planned', '?')}"
        if key == "tokens":
            return f"{value:,}"
        if key in ("train_loss", "eval_loss", "best_eval_loss"):
            return f"{value:.4f}"
        if key == "tokens_per_sec":
            return f"{value:,.0f}"
        if key == "wall_s":
            return f"{value:,.0f}s"
        return str(value)

    table = [list(COLUMNS)] + [[cell(r, k) for k in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in table]
    problems = [f"  {r['run']}: {r['problem']}" for r in rows if r.get("problem")]
    return "\n".join(lines + (["problems:", *problems] if problems else []))


def config_differences(run_dirs: list[str | Path]) -> dict[str, list]:
    """{dotted key: [value per run]} for the keys whose values differ (run.* excluded)."""
    flats = []
    for run_dir in run_dirs:
        cfg = load_config(Path(run_dir) / "config.yaml")
        flats.append(
            {k: v for k, v in flat_keys(cfg.to_dict()).items() if not k.startswith("run.")}
        )
    keys = sorted(set().union(*flats))
    return {
        k: [f.get(k) for f in flats] for k in keys if len({json.dumps(f.get(k)) for f in flats}) > 1
    }


def plot_comparison(run_dirs: list[str | Path], out: str | Path, x: str = "step") -> Path:
    """Train (lines) and eval (markers) loss of several runs against step, tokens or time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in ("step", "tokens", "time"):
        raise ConfigError(f"--x: {x!r} is not one of step, tokens, time")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, run_dir in enumerate(run_dirs):
        records = read_metrics(run_dir)
        tokens_per_step = _tokens_per_step(records)
        start = next((r["time"] for r in records if r.get("time")), 0.0)

        def xval(r, tokens_per_step=tokens_per_step, start=start):
            if x == "step":
                return r["step"]
            if x == "tokens":
                return r.get("tokens", r["step"] * tokens_per_step)
            return r.get("time", start) - start

        color = f"C{i % 10}"
        train = [(xval(r), r["loss"]) for r in records if r.get("loss") is not None]
        evals = [(xval(r), r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
        name = Path(run_dir).name
        if train:
            ax.plot(*zip(*train, strict=True), color=color, lw=1, label=f"{name} train")
        if evals:
            ax.plot(*zip(*evals, strict=True), "o--", color=color, lw=1, label=f"{name} eval")
    ax.set_xlabel({"step": "step", "tokens": "tokens", "time": "wall time (s)"}[x])
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _tokens_per_step(records: list[dict]) -> float:
    for r in records:
        if r.get("tokens") and r.get("step"):
            return r["tokens"] / r["step"]
    return 0.0


# --- sweeps -----------------------------------------------------------------------------------


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--grid: {item!r} is not of the form key=v1,v2")
        grid.append((key, values.split(",")))
    return grid


def point_name(prefix: str, point: list[tuple[str, str]]) -> str:
    """A directory name for a grid point: `prefix-lr=1e-3-layers=2` style, filesystem-safe."""
    parts = [f"{key.split('.')[-1]}={value}" for key, value in point]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "-".join([prefix, *parts]))


def sweep(
    config: str,
    grid_items: list[str],
    overrides: list[str] = (),
    name: str | None = None,
    root: str = "runs",
    log=print,
    stage: str | None = None,
) -> list[Path]:
    """Run a stage once per grid point; finished points are skipped. `stage` names it
    (`training.stages.STAGES`); None: the config's `run.stage`."""
    grid = parse_grid(grid_items)
    prefix = name or Path(config).stem
    points = [
        list(zip([k for k, _ in grid], values, strict=True))
        for values in itertools.product(*[v for _, v in grid])
    ]
    base = load_config(config, list(overrides))  # fails early on a bad config or override
    spec = stage_of(base, stage)
    dirs = []
    for i, point in enumerate(points, 1):
        run_dir = Path(root) / point_name(prefix, point)
        dirs.append(run_dir)
        point_overrides = [f"{k}={v}" for k, v in point]
        names = [f"run.dir={run_dir}", f"run.name={run_dir.name}"]
        # the sweep's points: one W&B group, one MLflow parent run (unless overridden)
        cfg = load_config(
            config,
            [f"run.group={prefix}", f"run.stage={spec.name}", *overrides, *point_overrides, *names],
        )
        state = {}
        if (run_dir / STATE_FILE).is_file():
            try:
                state = json.loads((run_dir / STATE_FILE).read_text())
            except json.JSONDecodeError:
                state = {}
        if state.get("status") == "finished" and state.get("step") == cfg.train.steps:
            log(f"[{i}/{len(points)}] {run_dir}: finished, skipped")
            continue
        verb = "resuming" if (run_dir / "checkpoints").is_dir() else "running"
        log(f"[{i}/{len(points)}] {run_dir}: {verb} ({' '.join(point_overrides)})")
        spec.run(cfg)
    return dirs


def write_sweep_summary(dirs: list[Path], out_dir: Path, x: str = "step") -> tuple[str, Path]:
    rows = [summarize(d) for d in dirs]
    table = format_table(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.txt").write_text(table + "\n")
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    plot = plot_comparison(dirs, out_dir / "compare.png", x)
    return table, plot
