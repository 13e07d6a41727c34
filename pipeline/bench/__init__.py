"""`pipeline bench train|finetune|generate|quantize|serve|soak|distill`: speed, memory, quality.

Each case prints one line (or one JSON object with --json, whose fields are a contract:
scripts compare them across commits). The cases live in `training.py` and `inference.py`
(and `pipeline/bench/loadgen.py` for serving); the lines in `report.py`.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.bench.report import emit
from pipeline.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parent.parent.parent / "configs"
DEFAULT_TRAIN_CASES = ("small", "gpt2-124m")
# A CPU-sized batch for the large preset (its own config asks for 32 x 1024 tokens a step);
# command-line overrides come after these and win.
CASE_OVERRIDES = {"gpt2-124m": ["train.batch_size=2"]}
FINETUNE_METHODS = ("lora", "qlora", "full")
# The options each verb reads (--json: all); any other given is refused, naming it.
FLAGS = {
    "train": ("--config", "overrides", "--cases", "--steps", "--peer"),
    "finetune": ("--config", "overrides", "--cases", "--steps"),
    "generate": ("--config", "overrides", "--cases", "--peer"),
    "quantize": ("--run", "--cases"),
    "serve": ("--config", "overrides", "--cases", "--request", "--peer"),
    "soak": ("--config", "overrides", "--requests", "--seconds", "--concurrency"),
    "distill": ("--run",),
}


def check_flags(target: str, given: list[str]) -> None:
    """ConfigError naming the first of `given` (options set on the command line; "overrides":
    key=value ones) that `bench target` does not read."""
    unused = [flag for flag in given if flag not in FLAGS[target]]
    if unused:
        what = "key=value overrides" if unused[0] == "overrides" else unused[0]
        takes = ", ".join(f for f in FLAGS[target] if f != "overrides")
        extra = " and key=value overrides" if "overrides" in FLAGS[target] else ""
        raise ConfigError(f"bench {target} does not use {what}; it takes {takes}, --json{extra}")


def run_bench(
    target: str,
    config: str | None,
    overrides: list[str],
    cases: list[str] | None,
    steps: int,
    as_json: bool,
    run: str | None = None,
    request: dict | None = None,
    peer: str | None = None,
    soak: dict | None = None,
) -> list[dict]:
    """Run the cases of `target`, printing each result as it comes; returns them all.
    `request` (serve alone): more fields for every request."""
    cases_of = {
        "train": _train,
        "finetune": _finetune,
        "generate": _generate,
        "quantize": _quantize,
        "serve": _serve,
        "soak": _soak,
        "distill": _distill,
    }
    if request is not None and (target != "serve" or not isinstance(request, dict)):
        raise ConfigError("--request takes a JSON object, for bench serve alone")
    peers = {"serve": "transformers", "train": "torch", "generate": "torch"}
    if peer is not None and peers.get(target) != peer:
        raise ConfigError(
            "--peer: transformers is for bench serve, torch for bench train and generate"
        )
    extra = {"request": request, "peer": peer} if target == "serve" else {}
    if target in ("train", "generate"):
        extra = {"peer": peer}
    if target == "soak":
        extra = dict(soak or {})
    results = []
    for result in cases_of[target](config, overrides, cases, steps, run, **extra):
        emit(result, as_json)
        results.append(result)
    return results


def _preset(config: str | None, default: str, overrides: list[str]):
    """(name, config): the file given, else a preset from configs/ with its CPU overrides."""
    if config:
        return Path(config).stem, load_config(config, overrides)
    base = CASE_OVERRIDES.get(default, [])
    return default, load_config(CONFIGS / f"{default}.yaml", [*base, *overrides])


def _train(config, overrides, cases, steps, run, peer=None):
    from pipeline.bench.training import bench_matmul, bench_train

    yield bench_matmul()
    names = [config] if config else list(cases or DEFAULT_TRAIN_CASES)
    for name in names:
        label, cfg = _preset(config, name, overrides)
        if peer == "torch":  # both sides in processes of their own, alternated
            from pipeline.bench.peer import train_rows

            path = str(config or CONFIGS / f"{name}.yaml")
            base = [] if config else CASE_OVERRIDES.get(name, [])
            yield from train_rows(label, path, [*base, *overrides], steps)
        else:
            yield bench_train(cfg, label, steps=steps)


def _finetune(config, overrides, cases, steps, run):
    from pipeline.bench.training import bench_finetune, bench_matmul

    yield bench_matmul()
    name, cfg = _preset(config, "gpt2-124m", overrides)
    for method in cases or FINETUNE_METHODS:
        yield bench_finetune(cfg, name, method, steps=steps)


def _generate(config, overrides, cases, steps, run, peer=None):
    from pipeline.bench.inference import GENERATE_CASES, bench_generate, bench_recompute
    from pipeline.bench.training import bench_matmul

    unknown = [c for c in cases or () if c not in GENERATE_CASES]
    if unknown:
        valid = ", ".join(GENERATE_CASES)
        raise ConfigError(f"bench generate: unknown case {unknown[0]!r}; valid: {valid}")
    yield bench_matmul()
    if peer == "torch":  # the batch cases, each side in processes of its own, alternated
        from pipeline.bench.peer import generate_rows

        batches = [c for c in cases or ("b1", "b32") if c.startswith("b")]
        if not batches:
            raise ConfigError("bench generate --peer torch: the batch cases (b1, b32) alone")
        name = Path(config).stem if config else "small"
        path = str(config or CONFIGS / "small.yaml")
        yield from generate_rows(name, path, list(overrides), batches)
        return
    for case in cases or GENERATE_CASES:
        if case == "recompute":
            # 64 + 512 tokens: the preset's context is lengthened (random weights anyway)
            name, cfg = _preset(config, "small", ["model.max_seq_len=1024", *overrides])
            yield bench_recompute(cfg, f"{name}/{case}")
        else:
            name, cfg = _preset(config, "small", overrides)
            batch = int(case[1:]) if case.startswith("b") else 1
            quantize = case if case.startswith("int") else None
            yield bench_generate(cfg, f"{name}/{case}", batch=batch, quantize=quantize)


def _quantize(config, overrides, cases, steps, run):
    from pipeline.bench.inference import bench_quantize

    if not run:
        raise ConfigError("bench quantize needs --run DIR (a trained run)")
    yield from bench_quantize(run, list(cases or ["int8", "int4"]))


def _serve(config, overrides, cases, steps, run, request=None, peer=None):
    from pipeline.bench.loadgen import NAMED_CASES, bench_serve

    name, cfg = _preset(config, "small", overrides)
    levels = tuple(cases) if cases else (1, 8, 32)
    for c in levels:
        if c not in NAMED_CASES and not c.isdigit():
            valid = ", ".join(NAMED_CASES)
            raise ConfigError(
                f"bench serve: unknown case {c!r}; valid: concurrency levels, {valid}"
            )
    ours = {}
    for row in bench_serve(cfg, name, levels, request=request or {}):
        if "/batched/" in row["case"]:
            ours[row["concurrency"]] = row
        yield row
    numbers = [int(c) for c in levels if c.isdigit()]
    if peer == "transformers" and numbers:
        from pipeline.bench.serve_peer import peer_rows

        yield from peer_rows(cfg, name, numbers, 32, 64, request or {}, ours)


def _soak(config, overrides, cases, steps, run, requests=5000, seconds=600.0, concurrency=32):
    from pipeline.bench.soak import bench_soak

    if concurrency < 1 or requests < 1 or seconds <= 0:
        raise ConfigError("bench soak: --requests, --seconds and --concurrency must be positive")
    name, cfg = _preset(config, "small", overrides)
    yield bench_soak(cfg, name, requests, seconds, concurrency)


def _distill(config, overrides, cases, steps, run):
    from pipeline.bench.inference import bench_distill

    if not run:
        raise ConfigError("bench distill needs --run DIR (a distillation run)")
    yield from bench_distill(run)
