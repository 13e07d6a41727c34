"""`pipeline bench train|finetune|generate|quantize`: measured speed, memory and quality.

Each case prints one line (or one JSON object with --json): tokens/s, step time, MFU against the
measured peak (a jitted 2048x2048 matmul in the compute dtype), compile time, and which
allocator the process runs with. The data are random tokens: this measures the step, not I/O.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipeline.config import Config, ConfigError, load_config
from pipeline.data import Dataset
from pipeline.runtime import aggregate_peak_flops, allocator, measure_matmul_peak
from pipeline.tokenizer import byte_tokenizer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_TRAIN_CASES = ("small", "gpt2-124m")
# A CPU-sized batch for the large preset (its own config asks for 32 x 1024 tokens a step);
# command-line overrides come after these and win.
CASE_OVERRIDES = {"gpt2-124m": ["train.batch_size=2"]}
FINETUNE_METHODS = ("lora", "qlora", "full")


def bench_train(cfg: Config, case: str, steps: int = 5, warmup: int = 3) -> dict:
    """Compile and time the pre-training step of `cfg` on every local device."""
    from pipeline.training.pretrain import build_stage

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, 200_000).astype(np.int32)
    stage = build_stage(cfg, Dataset(byte_tokenizer(), tokens, tokens[:10_000], {}))
    return {"case": f"train/{case}", **time_stage(cfg, stage, steps, warmup)}


def bench_finetune(cfg: Config, case: str, method: str, steps: int = 3, warmup: int = 2) -> dict:
    """Time LoRA, QLoRA (int8 base) or full fine-tuning of a randomly initialised `cfg` model."""
    from pipeline.config import with_overrides
    from pipeline.model import create_model
    from pipeline.training.finetune import stage_for_model
    from pipeline.training.instruct import Examples

    cfg = with_overrides(
        cfg,
        finetune={"method": "full" if method == "full" else "lora"},
        lora={"base_quantize": "int8" if method == "qlora" else "none"},
    )
    rng = np.random.default_rng(0)
    shape = (4 * cfg.train.batch_size, cfg.data.seq_len + 1)
    tokens = rng.integers(0, cfg.model.vocab_size, shape).astype(np.int32)
    examples = Examples(tokens, np.ones((shape[0], shape[1] - 1), np.float32))
    stage = stage_for_model(cfg, create_model(cfg.model), byte_tokenizer(), examples, examples)
    return {"case": f"finetune/{case}/{method}", **time_stage(cfg, stage, steps, warmup)}


def time_stage(cfg: Config, stage, steps: int, warmup: int) -> dict:
    """Steady-state time of a stage's pmapped step, and XLA's memory figures for it."""
    from pipeline.model import count_params
    from pipeline.training.parallel import make_strategy
    from pipeline.training.train import build_steps, create_train_state, make_optimizer

    tx, schedule = make_optimizer(cfg.optimizer, max(cfg.train.steps, warmup + steps), stage.params)
    strategy = make_strategy(cfg.train)
    state = create_train_state(stage, tx, cfg.train.seed)
    train_fn, _ = build_steps(stage, cfg, tx, schedule, strategy, state)
    state = strategy.replicate(state)
    state_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
    batches = [strategy.shard_batch(stage.train_batch(i)) for i in range(warmup + steps)]
    start = time.perf_counter()
    compiled = train_fn.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    temp_bytes = int(getattr(compiled.memory_analysis(), "temp_size_in_bytes", 0) or 0)
    for i in range(warmup):
        state, metrics = compiled(state, batches[i])
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        state, metrics = compiled(state, batches[i])
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / steps
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    peak = aggregate_peak_flops(cfg.train.peak_flops, cfg.model.compute_dtype)
    return {
        "params": count_params(cfg.model),
        "trained_params": sum(int(np.size(x)) for x in jax.tree.leaves(stage.params)),
        "batch": cfg.train.batch_size,
        "seq_len": cfg.data.seq_len,
        "devices": strategy.num_devices,
        "tokens_per_sec": tokens_per_step / step_s,
        "step_time_s": step_s,
        "mfu": tokens_per_step / step_s * stage.flops_per_token / peak,
        "compile_s": compile_s,
        # per device: the training state (weights, adapters, optimizer) and XLA's temporaries
        "state_bytes": state_bytes,
        "temp_bytes": temp_bytes,
        "peak_bytes": state_bytes + temp_bytes,
        "peak_flops": peak,
        "compute_dtype": cfg.model.compute_dtype,
        "device": jax.devices()[0].device_kind,
        "allocator": allocator(),
    }


GENERATE_CASES = ("b1", "b32", "int8", "int4", "recompute")


def bench_generate(
    cfg: Config,
    case: str,
    prompt_len: int = 64,
    new_tokens: int = 128,
    batch: int = 1,
    quantize: str | None = None,
) -> dict:
    """Decode speed of the jitted whole-loop generate, and time to first token (prefill)."""
    from pipeline.inference.generate import Sampling, generate
    from pipeline.model import create_model
    from pipeline.quantize import weight_bytes

    model = create_model(cfg.model)
    if quantize:
        from pipeline.quantize import quantize_model

        quantize_model(model, quantize, embeddings=True)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, cfg.model.vocab_size, prompt_len)) for _ in range(batch)]
    first = generate(model, prompts, new_tokens, Sampling())  # compiles
    result = generate(model, prompts, new_tokens, Sampling())
    return {
        "case": f"generate/{case}",
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "tokens_per_sec": batch * new_tokens / result["seconds"],
        "decode_tokens_per_sec": batch * new_tokens / result["decode_s"],
        "ttft_ms": result["ttft_s"] * 1e3,
        "compile_s": first["compile_s"],
        "weight_bytes": weight_bytes(model),
        "device": jax.devices()[0].device_kind,
        "allocator": allocator(),
    }


def bench_recompute(cfg: Config, case: str, prompt_len: int = 64, new_tokens: int = 512) -> dict:
    """Greedy decoding without a cache (the whole sequence again for every token), on device.

    The baseline the KV cache is measured against: one jitted `fori_loop` over a fixed-size
    buffer (causal attention makes the padding harmless), so only the recomputation differs.
    """
    from pipeline.inference.generate import Sampling, generate
    from pipeline.model import create_model

    length = prompt_len + new_tokens
    if length > cfg.model.max_seq_len:
        raise ValueError(f"recompute: {length} tokens exceed model.max_seq_len")
    model = create_model(cfg.model)
    graphdef, state = nnx.split(model)

    @jax.jit
    def recompute(state, buffer):
        model = nnx.merge(graphdef, state)

        def body(i, buffer):
            logits, _ = model(buffer)
            token = jnp.argmax(logits[:, prompt_len + i - 1], axis=-1).astype(buffer.dtype)
            return buffer.at[:, prompt_len + i].set(token)

        return jax.lax.fori_loop(0, new_tokens, body, buffer)

    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, cfg.model.vocab_size, prompt_len)]
    buffer = jnp.zeros((1, length), jnp.int32).at[0, :prompt_len].set(jnp.asarray(prompt))
    jax.block_until_ready(recompute(state, buffer))  # compiles
    start = time.perf_counter()
    out = np.asarray(recompute(state, buffer))
    seconds = time.perf_counter() - start
    generate(model, [prompt], new_tokens, Sampling())  # compiles
    cached = generate(model, [prompt], new_tokens, Sampling())
    assert out[0, prompt_len:].tolist() == cached["tokens"][0], "recompute and cache disagree"
    return {
        "case": f"generate/{case}",
        "batch": 1,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "recompute_tokens_per_sec": new_tokens / seconds,
        "tokens_per_sec": new_tokens / cached["seconds"],
        "speedup": seconds / cached["seconds"],
        "device": jax.devices()[0].device_kind,
        "allocator": allocator(),
    }


def bench_quantize(run_dir: str, modes=("int8", "int4")) -> list[dict]:
    """Quality and size of int8 / int4 weights for a run's model, on its validation split."""
    from pipeline.data import prepare_dataset
    from pipeline.inference.runs import load_model
    from pipeline.quantize import quality_report

    cfg, _, tokenizer = load_model(run_dir, key="--run")
    tokens = np.asarray(prepare_dataset(cfg, tokenizer).val)
    seq_len = min(cfg.data.seq_len, cfg.model.max_seq_len)
    results = quality_report(
        lambda: load_model(run_dir, key="--run")[1],
        tokens,
        modes,
        seq_len=seq_len,
        prompt_len=min(32, seq_len // 2),
        new_tokens=min(32, cfg.model.max_seq_len - min(32, seq_len // 2)),
    )
    return [{"case": f"quantize/{r['mode']}", "run": str(run_dir), **r} for r in results]


def bench_distill(run_dir: str, ks=(2, 4, 8), prompts: int = 4, new_tokens: int = 128) -> list:
    """Teacher against distilled student: eval loss, greedy decode speed, and speculative
    decoding with the student drafting for the teacher (acceptance, speed-up) at each k."""
    from pipeline.data import prepare_dataset
    from pipeline.inference.generate import Sampling, generate, speculative_generate
    from pipeline.inference.runs import load_model
    from pipeline.model import count_params

    cfg, student, tokenizer = load_model(run_dir, key="--run")
    if not cfg.distill.teacher:
        raise ConfigError(f"--run: {run_dir} is not a distillation run (no distill.teacher)")
    teacher_cfg, teacher, _ = load_model(cfg.distill.teacher, key="distill.teacher")
    val = np.asarray(prepare_dataset(teacher_cfg, tokenizer).val)
    rng = np.random.default_rng(0)
    rows = [val[s : s + 64].tolist() for s in rng.integers(0, len(val) - 64, prompts)]

    def last_eval(run) -> float | None:
        lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
        evals = [r["eval_loss"] for r in map(json.loads, lines) if "eval_loss" in r]
        return evals[-1] if evals else None

    def speed(fn) -> tuple[float, list]:
        fn()  # compiles
        seconds, tokens = 0.0, []
        for prompt in rows:
            out = fn([prompt])
            seconds += out["seconds"]
            tokens.append(out["tokens"][0])
        return sum(len(t) for t in tokens) / seconds, tokens

    results = []
    base_speed = {}
    for name, model, run in (
        ("teacher", teacher, cfg.distill.teacher),
        ("student", student, run_dir),
    ):
        tps, tokens = speed(
            lambda p=None, m=model: generate(m, p or rows[:1], new_tokens, Sampling())
        )
        base_speed[name] = (tps, tokens)
        results.append(
            {
                "case": f"distill/{name}",
                "eval_loss": last_eval(run),
                "params": count_params(model.cfg),
                "tokens_per_sec": tps,
                "allocator": allocator(),
            }
        )
    teacher_tps, teacher_tokens = base_speed["teacher"]
    for k in ks:
        accepted = []

        def spec(p=None, k=k, accepted=accepted):
            out = speculative_generate(teacher, student, p or rows[:1], new_tokens, k=k)
            accepted.append(out["acceptance"])
            return out

        tps, tokens = speed(spec)
        results.append(
            {
                "case": f"distill/speculative/k{k}",
                "k": k,
                "tokens_per_sec": tps,
                "speedup": tps / teacher_tps,
                "acceptance": float(np.mean(accepted[1:])),
                "same_tokens": tokens == teacher_tokens,
                "allocator": allocator(),
            }
        )
    return results


def bench_matmul(dtype: str = "float32") -> dict:
    peak = measure_matmul_peak(dtype)
    return {
        "case": f"matmul/2048/{dtype}",
        "flops_per_sec": peak,
        "device": jax.devices()[0].device_kind,
        "allocator": allocator(),
    }


def run_bench(
    target: str,
    config: str | None,
    overrides: list[str],
    cases: list[str] | None,
    steps: int,
    as_json: bool,
    run: str | None = None,
) -> list[dict]:
    results = []
    if target == "distill":
        if not run:
            raise ConfigError("bench distill needs --run DIR (a distillation run)")
        for result in bench_distill(run):
            results.append(result)
            _emit(result, as_json)
        return results
    if target == "quantize":
        if not run:
            raise ConfigError("bench quantize needs --run DIR (a trained run)")
        for result in bench_quantize(run, [c for c in (cases or ["int8", "int4"])]):
            results.append(result)
            _emit(result, as_json)
        return results
    if target == "serve":
        from pipeline.serving.loadgen import bench_serve

        name = Path(config).stem if config else "small"
        cfg = load_config(config or CONFIGS / "small.yaml", overrides)
        levels = tuple(int(c) for c in cases) if cases else (1, 8, 32)
        for result in bench_serve(cfg, name, levels):
            results.append(result)
            _emit(result, as_json)
        return results
    results.append(bench_matmul())
    _emit(results[-1], as_json)
    if target == "generate":
        name = Path(config).stem if config else "small"
        for case in cases or GENERATE_CASES:
            if case == "recompute":
                # 64 + 512 tokens: the preset's context is lengthened (random weights anyway)
                cfg = load_config(
                    config or CONFIGS / "small.yaml", ["model.max_seq_len=1024", *overrides]
                )
                results.append(bench_recompute(cfg, f"{name}/{case}"))
            elif case in GENERATE_CASES:
                cfg = load_config(config or CONFIGS / "small.yaml", overrides)
                batch = int(case[1:]) if case.startswith("b") else 1
                quantize = case if case.startswith("int") else None
                results.append(
                    bench_generate(cfg, f"{name}/{case}", batch=batch, quantize=quantize)
                )
            else:
                raise ConfigError(
                    f"bench generate: unknown case {case!r}; valid: {', '.join(GENERATE_CASES)}"
                )
            _emit(results[-1], as_json)
        return results
    if target == "finetune":
        name = Path(config).stem if config else "gpt2-124m"
        base = [] if config else CASE_OVERRIDES["gpt2-124m"]
        cfg = load_config(config or CONFIGS / "gpt2-124m.yaml", [*base, *overrides])
        for method in cases or FINETUNE_METHODS:
            results.append(bench_finetune(cfg, name, method, steps=steps))
            _emit(results[-1], as_json)
        return results
    if config:
        named = [(Path(config).stem, load_config(config, overrides))]
    else:
        named = [
            (c, load_config(CONFIGS / f"{c}.yaml", [*CASE_OVERRIDES.get(c, []), *overrides]))
            for c in (cases or DEFAULT_TRAIN_CASES)
        ]
    for name, cfg in named:
        results.append(bench_train(cfg, name, steps=steps))
        _emit(results[-1], as_json)
    return results


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result), flush=True)
        return
    if result["case"].startswith("distill/"):
        if "k" in result:
            print(
                f"{result['case']:<24} {result['tokens_per_sec']:8,.0f} tokens/s  "
                f"speed-up {result['speedup']:.2f}x  acceptance {result['acceptance']:.1%}  "
                f"same tokens as the teacher: {result['same_tokens']}",
                flush=True,
            )
        else:
            loss = result["eval_loss"]
            print(
                f"{result['case']:<24} {result['tokens_per_sec']:8,.0f} tokens/s  "
                f"eval loss {loss if loss is None else round(loss, 4)}  "
                f"({result['params'] / 1e6:.2f}M params, {result['allocator']})",
                flush=True,
            )
        return
    if "concurrency" in result:
        print(
            f"{result['case']:<32} {result['requests_per_sec']:6.2f} req/s  "
            f"{result['tokens_per_sec']:8,.0f} tokens/s  TTFT p50 {result['ttft_p50_ms']:7.1f} "
            f"p99 {result['ttft_p99_ms']:7.1f} ms  latency p50 {result['latency_p50_ms']:7.0f} "
            f"p99 {result['latency_p99_ms']:7.0f} ms  ({result['requests']} requests, "
            f"{result['slots']} slots, prompt {result['prompt_len']}, "
            f"{result['max_tokens']} tokens, {result['allocator']})",
            flush=True,
        )
        return
    if "eval_loss" in result:
        print(
            f"{result['case']:<22} weights {result['weight_bytes'] / 2**20:8.2f} MiB "
            f"({result['bytes_ratio']:.3f}x)  eval loss {result['eval_loss']:.4f} "
            f"({result['eval_loss_delta']:+.4f})  next-token agreement "
            f"{result['next_token_agreement']:.1%}  greedy agreement "
            f"{result['greedy_agreement']:.1%}",
            flush=True,
        )
        return
    if "speedup" in result:
        print(
            f"{result['case']:<22} {result['recompute_tokens_per_sec']:10,.1f} tokens/s without "
            f"a cache, {result['tokens_per_sec']:,.1f} with: {result['speedup']:.1f}x  "
            f"(prompt {result['prompt_len']}, {result['new_tokens']} new tokens, "
            f"{result['allocator']})",
            flush=True,
        )
        return
    if "ttft_ms" in result:
        print(
            f"{result['case']:<22} {result['tokens_per_sec']:10,.0f} tokens/s  "
            f"(decode {result['decode_tokens_per_sec']:,.0f})  "
            f"TTFT {result['ttft_ms']:7.1f} ms  compile {result['compile_s']:.1f} s  "
            f"weights {result['weight_bytes'] / 2**20:.1f} MiB  "
            f"(batch {result['batch']}, prompt {result['prompt_len']}, "
            f"{result['new_tokens']} new tokens, {result['allocator']})",
            flush=True,
        )
        return
    if "flops_per_sec" in result:
        print(
            f"{result['case']:<22} {result['flops_per_sec'] / 1e9:8.1f} GFLOP/s  "
            f"({result['device']}, {result['allocator']})",
            flush=True,
        )
        return
    print(
        f"{result['case']:<22} {result['tokens_per_sec']:10,.0f} tokens/s  "
        f"step {result['step_time_s'] * 1e3:8.1f} ms  MFU {result['mfu']:.3f}  "
        f"compile {result['compile_s']:.1f} s  memory {result['peak_bytes'] / 2**20:,.0f} MiB "
        f"(state {result['state_bytes'] / 2**20:,.0f})  ({result['params'] / 1e6:.1f}M params, "
        f"batch {result['batch']}x{result['seq_len']}, {result['devices']} device(s), "
        f"{result['compute_dtype']}, {result['allocator']})",
        flush=True,
    )
