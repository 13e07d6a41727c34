"""Training benchmarks: the pre-training and fine-tuning steps, and the matmul peak.

Each case reports tokens/s, step time, MFU against the measured peak (a jitted 2048x2048
matmul in the compute dtype), compile time, XLA's memory figures and the allocator. The data
are random tokens: this measures the step, not I/O.
"""

from __future__ import annotations

import math
import resource
import time

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
from pipeline.training.train import create_trainer, wait_for_previous_step


def bench_train(cfg: Config, case: str, steps: int = 5, warmup: int = 3) -> dict:
    """Compile and time the pre-training step of `cfg` on every local device."""

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, 200_000).astype(np.int32)
    holder = [build_stage(cfg, Dataset(byte_tokenizer(), tokens, tokens[:10_000], {}))]
    return {"case": f"train/{case}", "kind": "train", **time_stage(cfg, holder, steps, warmup)}


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
    holder = [stage_for_model(cfg, create_model(cfg.model), byte_tokenizer(), examples, examples)]
    return {
        "case": f"finetune/{case}/{method}",
        "kind": "train",
        **time_stage(cfg, holder, steps, warmup),
    }


def time_stage(cfg: Config, holder: list, steps: int, warmup: int) -> dict:
    """Steady-state time of a stage's pmapped step, and XLA's memory figures for it. The stage
    comes in a list that this empties: once the state is placed, nothing else holds its
    parameters, so the device's peak is the training step's alone (as PyTorch's is measured)."""

    stage = holder.pop()
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

    def run(state, batches):  # as the training loop runs steps: on CPU one in flight
        metrics = []
        for batch in batches:
            wait_for_previous_step(metrics)
            state, m = compiled(state, batch)
            metrics.append(m)
        return jax.block_until_ready(state)

    state = run(state, batches[:warmup])
    start = time.perf_counter()
    run(state, batches[warmup:])
    step_s = (time.perf_counter() - start) / steps
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    peak = aggregate_peak_flops(cfg.train.peak_flops, cfg.model.compute_dtype)
    kind = jax.devices()[0].device_kind
    nominal = nominal_peak_flops(kind, cfg.model.compute_dtype)
    flops_per_sec = tokens_per_step / step_s * flops_per_token
    # MaxText's count: causal attention's half of the attention FLOPs (PaLM's counts all)
    causal = flops_per_token_of(cfg.model, cfg.data.seq_len, causal=True) / flops_per_token_of(
        cfg.model, cfg.data.seq_len
    )
    device_stats = jax.devices()[0].memory_stats() or {}  # None on CPU
    return {
        "params": count_params(cfg.model),
        "trained_params": trained_params,
        "batch": cfg.train.batch_size,
        "seq_len": cfg.data.seq_len,
        "devices": strategy.num_devices,
        "tokens_per_sec": tokens_per_step / step_s,
        "step_time_s": step_s,
        "mfu": flops_per_sec / peak,
        # against the card's data-sheet peak (None where unknown, as on CPUs)
        "mfu_nominal": flops_per_sec / (nominal * strategy.num_devices) if nominal else None,
        "mfu_nominal_causal": (
            causal * flops_per_sec / (nominal * strategy.num_devices) if nominal else None
        ),
        "compile_s": compile_s,
        # per device: the training state (weights, adapters, optimizer) and XLA's temporaries
        "state_bytes": state_bytes,
        "temp_bytes": temp_bytes,
        "peak_bytes": state_bytes + temp_bytes,
        # the device allocator's peak over the process (not its preallocated pool), as
        # PyTorch's max_memory_allocated: None where the backend keeps none (CPU)
        "device_peak_bytes": device_stats.get("peak_bytes_in_use"),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # process
        "peak_flops": peak,
        "compute_dtype": cfg.model.compute_dtype,
        "attention": attention_impl(cfg.model.attention, cfg.model.compute_dtype),
        "remat": cfg.model.remat,
        "device": kind,
        "allocator": allocator(),
    }


def bench_matmul(dtype: str = "float32") -> dict:
    peak = measure_matmul_peak(dtype)
    size = 2048 if jax.devices()[0].platform == "cpu" else 8192
    return {
        "case": f"matmul/{size}/{dtype}",
        "kind": "matmul",
        "flops_per_sec": peak,
        "nominal_flops_per_sec": nominal_peak_flops(jax.devices()[0].device_kind, dtype),
        "device": jax.devices()[0].device_kind,
        "allocator": allocator(),
    }
