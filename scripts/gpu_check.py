"""The sections of scripts/gpu_check.sh, one per process: `python scripts/gpu_check.py SECTION`.

Each prints one JSON line per figure on stdout ({"check": SECTION, ...}); progress goes to
stderr. GPU_CHECK_SIZE=tiny shrinks every case to a toy model (the CPU rehearsal that CI runs);
the default, full, is GPT-2 small (124M) in bfloat16.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY = os.environ.get("GPU_CHECK_SIZE", "full") == "tiny"
if TINY:
    CONFIG = ROOT / "configs/tiny.yaml"
    OVERRIDES = ["train.batch_size=2", "model.compute_dtype=bfloat16"]
    STEPS, WARMUP = 2, 1
else:
    CONFIG = ROOT / "configs/gpt2-124m.yaml"
    OVERRIDES = ["train.batch_size=16", "model.compute_dtype=bfloat16"]
    STEPS, WARMUP = 10, 3
# More overrides for every case (e.g. GPU_CHECK_OVERRIDES="train.batch_size=32").
OVERRIDES += os.environ.get("GPU_CHECK_OVERRIDES", "").split()


# Every line says which invocation of gpu_check.sh wrote it and with what settings, so lines
# of several runs in one file need no note added by hand.
RUN = {
    "run": os.environ.get("GPU_CHECK_RUN"),
    "run_overrides": OVERRIDES,
    "xla_flags": os.environ.get("XLA_FLAGS"),
}


def emit(check: str, **fields) -> None:
    print(json.dumps({"check": check, **fields, **RUN}, default=str), flush=True)


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def config(*extra: str):
    from pipeline.config import load_config

    return load_config(CONFIG, [*OVERRIDES, *extra])


def _on_tpu() -> bool:
    import jax

    return jax.default_backend() == "tpu"


def env() -> None:
    from importlib import metadata

    import jax

    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    device = jax.devices()[0]
    stats = getattr(device, "memory_stats", lambda: None)() or {}
    emit(
        "env",
        python=sys.version.split()[0],
        **versions,
        backend=jax.default_backend(),
        device=device.device_kind,
        devices=jax.device_count(),
        memory_bytes=stats.get("bytes_limit"),  # what JAX may allocate (its pool)
        **_nvidia_smi(),
    )


def _nvidia_smi() -> dict:
    """The driver, CUDA version and the card's total memory as `nvidia-smi` reports them
    (empty off NVIDIA machines)."""
    query = "--query-gpu=driver_version,memory.total"
    try:
        out = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    if not out or "," not in out[0]:
        return {}
    driver, total = (x.strip() for x in out[0].split(",")[:2])
    return {"driver": driver, "card_memory_mib": int(total) if total.isdigit() else total}


def matmul() -> None:
    from pipeline.bench.training import bench_matmul

    for dtype in ("bfloat16", "float32"):
        result = bench_matmul(dtype)
        emit("matmul", **result)


def attention() -> None:
    """cuDNN (on GPUs) and XLA attention against a float32 einsum reference, then forward plus
    backward time of each path at the training shape."""
    import jax
    import jax.numpy as jnp

    from pipeline.attention import attention as attend
    from pipeline.attention import attention_impl

    cfg = config().model
    B, T = (2, 64) if TINY else (16, 1024)
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    accelerated = {"gpu": ["cudnn"], "tpu": ["splash"]}.get(jax.default_backend(), [])
    impls = ["einsum", "xla", *accelerated]
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (B, T, N, H), jnp.float32)
    k = jax.random.normal(keys[1], (B, T, K, H), jnp.float32)
    v = jax.random.normal(keys[2], (B, T, K, H), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    for window in (None, T // 4):
        ref = attend(q, k, v, positions, window, "einsum")
        for impl in impls:
            half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
            out = attend(*half, positions, window, impl).astype(jnp.float32)
            err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))

            def loss(q, k, v, impl=impl, window=window):
                return attend(q, k, v, positions, window, impl).astype(jnp.float32).sum()

            grad = jax.jit(jax.grad(loss, (0, 1, 2)))
            jax.block_until_ready(grad(*half))
            start = time.perf_counter()
            for _ in range(5):
                result = grad(*half)
            jax.block_until_ready(result)
            emit(
                "attention",
                impl=impl,
                window=window,
                shape=[B, T, N, H],
                rel_error_bf16=err,
                fwd_bwd_ms=(time.perf_counter() - start) / 5 * 1e3,
                auto=attention_impl("auto", jnp.bfloat16),
            )


def train() -> None:
    from pipeline.bench.training import bench_train

    # remat/attention pairs; none/xla: what cuDNN's flash attention gains
    default = "none/auto,dots/auto" + ("" if TINY else ",none/xla")
    variants = [v.split("/") for v in os.environ.get("GPU_CHECK_TRAIN", default).split(",")]
    for remat, impl in variants:
        log(f"train: remat {remat}, attention {impl}")
        cfg = config(f"model.remat={remat}", f"model.attention={impl}")
        result = bench_train(cfg, CONFIG.stem, steps=STEPS, warmup=WARMUP)
        emit("train", **result)


# The training step's levers, each measured alone against `base` in a process of its own (so
# each has its own allocator peak): (config overrides, environment). XLA_FLAGS values join.
LEVERS = {
    "base": ([], {}),
    # bfloat16 logits into the cross-entropy (float32 log-sum-exp in the same pass)
    "loss_dtype=compute": (["model.loss_dtype=compute"], {}),
    "loss_chunk=256": (["model.loss_chunk=256"], {}),
    # 50,304 is a multiple of 128 already; 50,432 of 256
    "vocab=50432": (["model.vocab_size=50432"], {}),
    # AdamW over one flat vector (optax.flatten); its weight-decay mask sees one 1-D leaf, so
    # this measures the optimizer's kernels without weight decay: an upper bound of the gain
    "optax.flatten": ([], {"GPU_CHECK_FLATTEN": "1"}),
    "xla:latency_hiding_scheduler": (
        [],
        {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true"},
    ),
    "xla:no_command_buffer": ([], {"XLA_FLAGS": "--xla_gpu_enable_command_buffer="}),
    "xla:no_triton_gemm": ([], {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"}),
    # the same one-device step under jit over a mesh instead of pmap
    "parallelism=mesh": (["train.parallelism=mesh"], {}),
}


def _lever_env(env: dict) -> dict:
    merged = dict(os.environ)
    for key, value in env.items():
        merged[key] = f"{merged[key]} {value}" if key == "XLA_FLAGS" and merged.get(key) else value
    return merged


def _run_lever(name: str, overrides: list, env: dict, timeout: float) -> dict | None:
    """One training measurement in a fresh process: its JSON row, or None (its error emitted)."""
    command = [sys.executable, __file__, "train_one", *overrides]
    try:
        out = subprocess.run(
            command, capture_output=True, text=True, env=_lever_env(env), timeout=timeout
        )
    except subprocess.TimeoutExpired:
        emit("levers", lever=name, error="timed out")
        return None
    rows = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not rows:
        emit("levers", lever=name, error=(out.stderr.strip().splitlines() or ["failed"])[-1])
        return None
    row = json.loads(rows[-1])
    row.pop("check", None)
    row = {"lever": name, "overrides": overrides, "env": env, **row}
    emit("levers", **row)
    return row


def levers() -> None:
    """Each lever of LEVERS (or of GPU_CHECK_LEVERS) alone against `base` (remat none,
    attention auto), then the ones that paid together (faster by 1%, or 5% less device memory
    at most 1% slower): cold, then again with the persistent compilation cache warm (the
    compile-time target). GPU_CHECK_LEVER_TIMEOUT: seconds per process (default 150)."""
    import tempfile

    budget = float(os.environ.get("GPU_CHECK_LEVER_TIMEOUT", 150))
    fixed = ["model.remat=none", "model.attention=auto"]
    chosen = os.environ.get("GPU_CHECK_LEVERS")  # a comma-separated subset; base always runs
    names = ["base", *(n for n in chosen.split(",") if n != "base")] if chosen else list(LEVERS)
    results = {}
    for name in names:
        overrides, env = LEVERS[name]
        log(f"levers: {name}")
        results[name] = _run_lever(name, [*fixed, *overrides], env, budget)
    base = results.get("base")
    if not base:
        return
    paid = []
    for name, row in results.items():
        if name == "base" or not row:
            continue
        speed = row["tokens_per_sec"] / base["tokens_per_sec"]
        memory = (row.get("device_peak_bytes") or row["peak_bytes"]) / (
            base.get("device_peak_bytes") or base["peak_bytes"]
        )
        if speed >= 1.01 or (memory <= 0.95 and speed >= 0.99):
            paid.append(name)
    overrides = [o for name in paid for o in LEVERS[name][0]]
    env: dict = {}
    for name in paid:
        for key, value in LEVERS[name][1].items():
            env[key] = f"{env[key]} {value}" if key in env else value
    cache = tempfile.mkdtemp(prefix="gpu_check_cache_")
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    for run in ("cold", "warm"):
        log(f"levers: together ({', '.join(paid) or 'none'}), compilation cache {run}")
        _run_lever(f"together/{run}", [*fixed, *overrides], env, budget)


def train_one() -> None:
    """One bench_train row with sys.argv[2:] as further overrides (the levers' process)."""
    from pipeline.bench.training import bench_train

    if os.environ.get("GPU_CHECK_FLATTEN"):
        import optax

        from pipeline.training import train as training

        make = training.make_optimizer

        def flat(cfg, steps, params):
            tx, schedule = make(cfg, steps, params)
            return optax.flatten(tx), schedule

        training.make_optimizer = flat
    result = bench_train(config(*sys.argv[2:]), CONFIG.stem, steps=STEPS, warmup=WARMUP)
    emit("train_one", **result)


def fit() -> None:
    from pipeline.training.fit import device_budget
    from pipeline.training.fit import fit as fit_config

    result = fit_config(config(), device_budget(), max_rows=0)  # one compile, no batch search
    emit("fit", **result)


def generate() -> None:
    from pipeline.bench.inference import bench_generate

    new_tokens = 16 if TINY else 128
    for batch in (1, 32):
        result = bench_generate(
            config(), f"{CONFIG.stem}/b{batch}", batch=batch, new_tokens=new_tokens
        )
        emit("generate", **result)


def serve() -> None:
    import logging

    from pipeline.bench.loadgen import bench_serve

    # the engine's start-up (21 programs to compile for these sizes) shows on stderr
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    levels, max_tokens = ((1, 2), 8) if TINY else ((1, 32), 64)
    # 256 positions: 32-token prompts and 64 new tokens fit, and the engine compiles fewer buckets
    cfg = config("model.max_seq_len=256", "data.seq_len=256")
    for result in bench_serve(
        cfg, CONFIG.stem, levels, max_tokens=max_tokens, baseline_concurrency=0
    ):
        emit("serve", **result)


def engine() -> None:
    """`bench serve --cases engine`: the serving engine alone (no HTTP) and its decode step
    against `generate` at batch 32, alternated (the engine's step target: within 1.3x)."""
    from pipeline.bench.engine_case import engine_case

    cfg = config("model.max_seq_len=256", "data.seq_len=256")
    sizes = {"rounds": 1, "waves": 1, "batch": 4} if TINY else {}
    for result in engine_case(cfg, CONFIG.stem, None, {}, **sizes):
        emit("engine", **result)


def peer_generate() -> None:
    """`bench generate --peer torch` at batch 1 and 32: our jitted generate and transformers'
    `generate` (bfloat16 weights on a GPU) on the same model, alternated, each in processes of
    its own; the last row of each case holds the ratios."""
    import importlib.util

    if not importlib.util.find_spec("torch") or not importlib.util.find_spec("transformers"):
        emit("peer_generate", skipped="torch or transformers is not importable")
        return
    if _on_tpu():
        emit("peer_generate", skipped="a TPU: the PyTorch peer runs on GPUs")
        return
    from pipeline.bench.peer import generate_rows

    # the rehearsal runs each path once: one round, the batch-32 case alone
    cases, rounds = (["b32"], 1) if TINY else (["b1", "b32"], None)
    for row in generate_rows(CONFIG.stem, str(CONFIG), OVERRIDES, cases, rounds):
        emit("peer_generate", **row)


def grpo() -> None:
    """`make grpo`'s chain, unchanged but for its run directories: the byte-level base, the
    supervised start, then GRPO; each stage's wall time, and GRPO's held-out exact match (greedy)
    before and after with its rollout and update time per step."""
    import tempfile

    from pipeline.config import load_config
    from pipeline.training.finetune import finetune
    from pipeline.training.grpo import grpo as run_grpo
    from pipeline.training.pretrain import pretrain

    root = Path(tempfile.mkdtemp(prefix="gpu_check_grpo_"))
    short = {
        "pretrain": ["train.steps=20", "train.eval_every=20", "train.checkpoint_every=20"],
        "finetune": ["train.steps=10", "train.eval_every=10", "train.checkpoint_every=10"],
        "grpo": ["train.steps=2", "train.eval_every=2", "grpo.eval_prompts=16"],
    }
    stages = [
        ("pretrain", pretrain, "grpo_base", []),
        ("finetune", finetune, "sft_reversal", [f"init.from={root}/grpo_base"]),
        ("grpo", run_grpo, "grpo", [f"init.from={root}/sft_reversal"]),
    ]
    for stage, run, name, extra in stages:
        overrides = [f"run.dir={root}/{name}", "run.progress=false", *extra]
        cfg = load_config(ROOT / f"configs/{name}.yaml", overrides + (short[stage] if TINY else []))
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # the loop's progress lines: not JSON
            result = run(cfg, fresh=True)
        seconds = time.perf_counter() - start
        fields = {"stage": stage, "config": f"configs/{name}.yaml", "seconds": seconds}
        fields.update(status=result.status, step=result.step)
        if stage == "grpo":
            lines = Path(f"{root}/{name}/metrics.jsonl").read_text().splitlines()
            rows = [json.loads(line) for line in lines]
            timed = [r for r in rows if "rollout_s" in r]
            fields["before"] = result.initial_eval.get("eval_pass_rate")
            fields["after"] = result.eval.get("eval_pass_rate")
            for key in ("rollout_s", "update_s"):
                fields[key] = [round(r[key], 4) for r in timed]
        emit("grpo", **fields)


def torch() -> None:
    """The same training step in PyTorch (transformers' GPT-2, fused AdamW, bf16 autocast),
    eager and, on a GPU, torch.compile'd too, each in its own process; skipped where torch is
    not importable."""
    import importlib.util

    if not importlib.util.find_spec("torch") or not importlib.util.find_spec("transformers"):
        emit("torch", skipped="torch or transformers is not importable")
        return
    if _on_tpu():
        emit("torch", skipped="a TPU: the PyTorch peer runs on GPUs")
        return
    import torch as pt

    for compiled in (False, True) if pt.cuda.is_available() else (False,):
        command = [sys.executable, "-m", "pipeline.bench.torch_peer", "--config", str(CONFIG)]
        command += [*OVERRIDES, "--steps", str(STEPS), "--warmup", str(WARMUP)]
        command += ["--compile"] if compiled else []
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # torch has the device to itself
        out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        if out.returncode:
            raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "failed")
        emit("torch", **json.loads(out.stdout.strip().splitlines()[-1]))


SECTIONS = {
    f.__name__: f
    for f in (
        env,
        matmul,
        attention,
        train,
        levers,
        train_one,
        fit,
        generate,
        serve,
        engine,
        torch,
        peer_generate,
        grpo,
    )
}

if __name__ == "__main__":
    name = sys.argv[1]
    try:
        SECTIONS[name]()
    except Exception as error:  # one section's failure must not hide the others' figures
        emit(name, error=f"{type(error).__name__}: {error}"[:2000])
        raise
