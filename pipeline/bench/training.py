"""Training benchmarks: the pre-training and fine-tuning steps, and the matmul peak.

Each case reports tokens/s, step time, MFU against the measured peak (a jitted 2048x2048
matmul in the compute dtype), compile time, XLA's memory figures and the allocator. The data
are random tokens: this measures the step, not I/O.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable

import jax
import numpy as np

from pipeline.attention import attention_impl
from pipeline.config import Config, with_overrides
from pipeline.data import Dataset
from pipeline.model import count_params, create_model
from pipeline.model import flops_per_token as flops_per_token_of
from pipeline.runtime import (
    aggregate_peak_flops,
    allocator,
    measure_matmul_peak,
    nominal_peak_flops,
)
from pipeline.tokenizer import byte_tokenizer
from pipeline.training.finetune import stage_for_model
from pipeline.training.instruct import Examples
from pipeline.training.pretrain import build_stage
from pipeline.training.train import Stage, create_trainer, wait_for_previous_step


def bench_train(cfg: Config, case: str, steps: int = 5, warmup: int = 3) -> dict:
    """Compile and time the pre-training step of `cfg` on every local device."""

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, 200_000).astype(np.int32)
    data = Dataset(byte_tokenizer(), tokens, tokens[:10_000], {})
    timed = time_stage(cfg, lambda: build_stage(cfg, data), steps, warmup)
    return {"case": f"train/{case}", "kind": "train", **timed}


def bench_finetune(cfg: Config, case: str, method: str, steps: int = 3, warmup: int = 2) -> dict:
    """Time LoRA, QLoRA (int8 base) or full fine-tuning of a randomly initialised `cfg` model."""

    cfg = with_overrides(
        cfg,
        finetune={"method": "full" if method == "full" else "lora"},
        lora={"base_quantize": "int8" if method == "qlora" else "none"},
    )
    rng = np.random.default_rng(0)
    shape = (4 * cfg.train.batch_size, cfg.data.seq_len + 1)
    tokens = rng.integers(0, cfg.model.vocab_size, shape).astype(np.int32)
    examples = Examples(tokens, np.ones((shape[0], shape[1] - 1), np.float32))

    def build():
        return stage_for_model(cfg, create_model(cfg.model), byte_tokenizer(), examples, examples)

    return {
        "case": f"finetune/{case}/{method}",
        "kind": "train",
        **time_stage(cfg, build, steps, warmup),
    }


def time_stage(cfg: Config, build: Callable[[], Stage], steps: int, warmup: int) -> dict:
    """Steady-state time of the pmapped step of the stage `build()` makes, and the memory
    figures for it. The stage is built here, and dropped once its state is placed: nothing else
    holds its parameters, so the device's peak is the training step's alone (as PyTorch's is
    measured)."""
    stage = build()
    trainer = create_trainer(stage, cfg, steps=max(cfg.train.steps, warmup + steps))
    strategy, train_fn = trainer.strategy, trainer.train_step
    state = strategy.replicate(trainer.state)
    trained_params = sum(int(np.size(x)) for x in jax.tree.leaves(stage.params))
    flops_per_token, train_batch = stage.flops_per_token, stage.train_batch
    del trainer, stage  # the unplaced state: only the placed one is measured and kept
    # per device, from the shard's shape (a shard's .data copied the state: +1.7 GiB on gpt2-124m)
    state_bytes = sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(state)
    )
    batches = [strategy.shard_batch(train_batch(i)) for i in range(warmup + steps)]
    start = time.perf_counter()
    compiled = train_fn.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    temp_bytes = int(getattr(compiled.memory_analysis(), "temp_size_in_bytes", 0) or 0)
    step_s = _step_seconds(compiled, state, batches, warmup)
    device_stats = jax.devices()[0].memory_stats() or {}  # None on CPU
    return {
        "params": count_params(cfg.model),
        "trained_params": trained_params,
        "batch": cfg.train.batch_size,
        "seq_len": cfg.data.seq_len,
        "devices": strategy.num_devices,
        **_throughput(cfg, step_s, flops_per_token, strategy.num_devices),
        "compile_s": compile_s,
        # per device: the training state (weights, adapters, optimizer) and XLA's temporaries
        "state_bytes": state_bytes,
        "temp_bytes": temp_bytes,
        "peak_bytes": state_bytes + temp_bytes,
        # the device allocator's peak over the process (not its preallocated pool), as
        # PyTorch's max_memory_allocated: None where the backend keeps none (CPU)
        "device_peak_bytes": device_stats.get("peak_bytes_in_use"),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # process
        "compute_dtype": cfg.model.compute_dtype,
        "attention": attention_impl(cfg.model.attention, cfg.model.compute_dtype),
        "remat": cfg.model.remat,
        "device": jax.devices()[0].device_kind,
        "allocator": allocator(),
    }


def _step_seconds(compiled, state, batches: list, warmup: int) -> float:
    """Seconds per step after `warmup` steps, the steps run as the training loop runs them (on
    CPU one in flight)."""

    def run(state, batches):
        metrics = []
        for batch in batches:
            wait_for_previous_step(metrics)
            state, m = compiled(state, batch)
            metrics.append(m)
        return jax.block_until_ready(state)

    state = run(state, batches[:warmup])
    start = time.perf_counter()
    run(state, batches[warmup:])
    return (time.perf_counter() - start) / (len(batches) - warmup)


def _throughput(cfg: Config, step_s: float, flops_per_token: float, devices: int) -> dict:
    """Tokens/s and MFU against the measured matmul peak and against the card's data-sheet
    peak (None where unknown, as on CPUs), each under two counts of the FLOPs: PaLM's (every
    query against every key: `mfu`, `mfu_nominal`) and MaxText's (causal attention, half of
    PaLM's attention FLOPs: `mfu_causal`, `mfu_nominal_causal`)."""
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    flops_per_sec = tokens_per_step / step_s * flops_per_token
    peak = aggregate_peak_flops(cfg.train.peak_flops, cfg.model.compute_dtype)
    nominal = nominal_peak_flops(jax.devices()[0].device_kind, cfg.model.compute_dtype)
    m, T = cfg.model, cfg.data.seq_len
    causal = flops_per_token_of(m, T, causal=True) / flops_per_token_of(m, T)
    return {
        "tokens_per_sec": tokens_per_step / step_s,
        "step_time_s": step_s,
        "mfu": flops_per_sec / peak,
        "mfu_causal": causal * flops_per_sec / peak,
        "mfu_nominal": flops_per_sec / (nominal * devices) if nominal else None,
        "mfu_nominal_causal": causal * flops_per_sec / (nominal * devices) if nominal else None,
        "peak_flops": peak,
    }


def bench_matmul(dtype: str = "float32") -> dict:
    peak = measure_matmul_peak(dtype)
    size = 2048 if jax.devices()[0].platform == "cpu" else 8192
    platform = jax.devices()[0].platform
    # float32 matmuls on a GPU run as TF32 at JAX's default precision: say so
    default = jax.config.jax_default_matmul_precision in (None, "default", "tensorfloat32")
    tf32 = platform == "gpu" and dtype == "float32" and default
    return {
        "case": f"matmul/{size}/{dtype}",
        "kind": "matmul",
        "precision": "tf32" if tf32 else dtype,
        "flops_per_sec": peak,
        "nominal_flops_per_sec": nominal_peak_flops(jax.devices()[0].device_kind, dtype),
        "device": jax.devices()[0].device_kind,
        "allocator": allocator(),
    }
