"""Inference benchmarks: decode speed and time to first token, the KV cache against
recomputation, what quantisation costs in quality, and a distilled student as a draft.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipeline.config import Config, ConfigError
from pipeline.data import prepare_dataset
from pipeline.inference.generate import generate
from pipeline.inference.runs import load_for_inference, load_model
from pipeline.inference.sampling import Sampling
from pipeline.inference.speculative import speculative_generate
from pipeline.model import count_params, create_model
from pipeline.quantize import MODES, quantize_model, weight_bytes
from pipeline.runtime import allocator

GENERATE_CASES = ("b1", "b32", "int8", "int4", "recompute")
# `bench serve`'s own `generate` figure (`repeat_s`) runs again while its decode loops total
# under REPEAT_S seconds, at most REPEAT_RUNS times, and gives the runs' medians: the `tiny`
# model's loop of 64 steps at batch 32 takes 10-20 ms, and one run's figure moved by 2x between
# runs on this CPU.
REPEAT_S, REPEAT_RUNS = 0.5, 9


def bench_generate(
    cfg: Config,
    case: str,
    prompt_len: int = 64,
    new_tokens: int = 128,
    batch: int = 1,
    quantize: str | None = None,
    repeat_s: float = 0.0,
) -> dict:
    """Decode speed of the jitted whole-loop generate (the median of `runs` runs: again while
    their decode loops total under `repeat_s` seconds, at most REPEAT_RUNS), and time to first
    token as the peer's is timed (`ttft_ms`: a whole one-token `generate` call, from the call
    to the token on the host; `prefill_ms`: the prefill program alone, to the first token's
    logits)."""

    model = create_model(cfg.model)
    if quantize:
        quantize_model(model, quantize, embeddings=True)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, cfg.model.vocab_size, prompt_len)) for _ in range(batch)]
    first = generate(model, prompts, new_tokens, Sampling())  # compiles
    generate(model, prompts, 1, Sampling())  # compiles the one-token programs
    start = time.perf_counter()
    generate(model, prompts, 1, Sampling())
    ttft = time.perf_counter() - start
    runs = [generate(model, prompts, new_tokens, Sampling())]
    while len(runs) < REPEAT_RUNS and sum(r.decode_s for r in runs) < repeat_s:
        runs.append(generate(model, prompts, new_tokens, Sampling()))
    seconds = float(np.median([r.seconds for r in runs]))
    decode_s = float(np.median([r.decode_s for r in runs]))
    return {
        "case": f"generate/{case}",
        "kind": "generate",
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "runs": len(runs),
        "tokens_per_sec": batch * new_tokens / seconds,
        "decode_tokens_per_sec": batch * new_tokens / decode_s,
        "ttft_ms": ttft * 1e3,
        "prefill_ms": float(np.median([r.ttft_s for r in runs])) * 1e3,
        "compile_s": first.compile_s,
        "weight_bytes": weight_bytes(model),
        "device": jax.devices()[0].device_kind,
        "allocator": allocator(),
    }


def bench_recompute(cfg: Config, case: str, prompt_len: int = 64, new_tokens: int = 512) -> dict:
    """Greedy decoding without a cache (the whole sequence again for every token), on device.

    The baseline the KV cache is measured against: one jitted `fori_loop` over a fixed-size
    buffer (causal attention makes the padding harmless), so only the recomputation differs.
    """

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
    if out[0, prompt_len:].tolist() != cached.tokens[0]:
        raise RuntimeError("recomputation and the KV cache generated different tokens")
    return {
        "case": f"generate/{case}",
        "kind": "recompute",
        "batch": 1,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "recompute_tokens_per_sec": new_tokens / seconds,
        "tokens_per_sec": new_tokens / cached.seconds,
        "speedup": seconds / cached.seconds,
        "device": jax.devices()[0].device_kind,
        "allocator": allocator(),
    }


def bench_quantize(run_dir: str, modes=("int8", "int4")) -> list[dict]:
    """Quality and size of int8 / int4 weights for a run's model, on its validation split."""

    loaded = load_for_inference(run_dir)
    cfg, tokenizer = loaded.cfg, loaded.tokenizer
    tokens = np.asarray(prepare_dataset(cfg, tokenizer).val)
    seq_len = min(cfg.data.seq_len, cfg.model.max_seq_len)
    results = quality_report(
        lambda: load_for_inference(run_dir).model,
        tokens,
        modes,
        seq_len=seq_len,
        prompt_len=min(32, seq_len // 2),
        new_tokens=min(32, cfg.model.max_seq_len - min(32, seq_len // 2)),
    )
    return [
        {"case": f"quantize/{r['mode']}", "kind": "quantize", "run": str(run_dir), **r}
        for r in results
    ]


def bench_distill(run_dir: str, ks=(2, 4, 8), prompts: int = 4, new_tokens: int = 128) -> list:
    """Teacher against distilled student: eval loss, greedy decode speed, and speculative
    decoding with the student drafting for the teacher (acceptance, speed-up) at each k."""
    loaded = load_for_inference(run_dir)
    cfg, student, tokenizer = loaded.cfg, loaded.model, loaded.tokenizer
    if not cfg.distill.teacher:
        raise ConfigError(f"--run: {run_dir} is not a distillation run (no distill.teacher)")
    teacher_cfg, teacher, _ = load_model(cfg.distill.teacher, key="distill.teacher")
    val = np.asarray(prepare_dataset(teacher_cfg, tokenizer).val)
    rng = np.random.default_rng(0)
    rows = [val[s : s + 64].tolist() for s in rng.integers(0, len(val) - 64, prompts)]
    results, greedy = [], {}
    for name, model, run in (
        ("teacher", teacher, cfg.distill.teacher),
        ("student", student, run_dir),
    ):
        greedy[name] = _speed(rows, lambda p, m=model: generate(m, p, new_tokens, Sampling()))
        results.append(
            {
                "case": f"distill/{name}",
                "kind": "distill",
                "eval_loss": _last_eval_loss(run),
                "params": count_params(model.cfg),
                "tokens_per_sec": greedy[name][0],
                "allocator": allocator(),
            }
        )
    teacher_tps, teacher_tokens = greedy["teacher"]
    for k in ks:
        accepted = []

        def spec(p, k=k, accepted=accepted):
            out = speculative_generate(teacher, student, p, new_tokens, k=k)
            accepted.append(out.acceptance)
            return out

        tps, tokens = _speed(rows, spec)
        results.append(
            {
                "case": f"distill/speculative/k{k}",
                "kind": "speculative",
                "k": k,
                "tokens_per_sec": tps,
                "speedup": tps / teacher_tps,
                "acceptance": float(np.mean(accepted[1:])),  # the first call compiled
                "same_tokens": tokens == teacher_tokens,
                "allocator": allocator(),
            }
        )
    return results


def _last_eval_loss(run) -> float | None:
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    evals = [r["eval_loss"] for r in map(json.loads, lines) if "eval_loss" in r]
    return evals[-1] if evals else None


def _speed(rows: list[list[int]], fn) -> tuple[float, list]:
    """Tokens/s of `fn([prompt])` over the prompts one at a time (after a compiling call)."""
    fn(rows[:1])
    seconds, tokens = 0.0, []
    for prompt in rows:
        out = fn([prompt])
        seconds += out.seconds
        tokens.append(out.tokens[0])
    return sum(len(t) for t in tokens) / seconds, tokens


def quality_report(
    model_fn,
    tokens: np.ndarray,
    modes=MODES,
    seq_len: int = 128,
    batches: int = 8,
    batch_size: int = 8,
    prompts: int = 64,
    prompt_len: int = 32,
    new_tokens: int = 32,
) -> list[dict]:
    """What quantisation costs, measured against float32 on held-out tokens.

    `model_fn()` returns a fresh float model. For float32 and each mode: weight bytes, eval loss
    (next-token cross-entropy over `batches` x `batch_size` windows of `seq_len` tokens), the
    share of positions whose argmax next token equals float32's (teacher-forced, same windows),
    and the share of greedily generated tokens equal to float32's, position by position, over
    `prompts` prompts cut from the same tokens (a generation that diverges once scores its
    later positions as disagreements, so this is the stricter figure).
    """
    rng = np.random.default_rng(0)
    need = seq_len + 1
    if len(tokens) < need:
        raise ValueError(f"{len(tokens)} held-out tokens: need at least {need}")
    starts = rng.integers(0, len(tokens) - need + 1, batches * batch_size)
    windows = np.stack([tokens[s : s + need] for s in starts]).astype(np.int32)
    prompt_starts = rng.integers(0, len(tokens) - prompt_len + 1, prompts)
    prompt_ids = [[int(t) for t in tokens[s : s + prompt_len]] for s in prompt_starts]
    results, reference = [], None
    for mode in ("float32", *modes):
        model = model_fn()
        if mode != "float32":
            quantize_model(model, mode, embeddings=True)
        loss, argmax = _teacher_forced(model, windows.reshape(batches, batch_size, need))
        greedy = generate(model, prompt_ids, new_tokens).tokens
        if reference is None:
            reference = {"argmax": argmax, "greedy": greedy, "bytes": weight_bytes(model)}
        same = [
            a == b
            for ga, gb in zip(greedy, reference["greedy"], strict=True)
            for a, b in zip(ga, gb, strict=False)
        ]
        results.append(
            {
                "mode": mode,
                "weight_bytes": weight_bytes(model),
                "bytes_ratio": weight_bytes(model) / reference["bytes"],
                "eval_loss": loss,
                "next_token_agreement": float(np.mean(argmax == reference["argmax"])),
                "greedy_agreement": float(np.mean(same)),
            }
        )
    for r in results:
        r["eval_loss_delta"] = r["eval_loss"] - results[0]["eval_loss"]
    return results


@nnx.jit
def _forward(model, x, y):
    logits, _ = model(x)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
    return nll.mean(), jnp.argmax(logits, axis=-1)


def _teacher_forced(model, batches: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean next-token loss over batches (n, B, T+1) and the argmax at every position."""
    losses, argmaxes = [], []
    for rows in batches:
        loss, argmax = _forward(model, jnp.asarray(rows[:, :-1]), jnp.asarray(rows[:, 1:]))
        losses.append(float(loss))
        argmaxes.append(np.asarray(argmax))
    return float(np.mean(losses)), np.concatenate(argmaxes)
