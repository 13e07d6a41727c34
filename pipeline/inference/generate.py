"""Inference: prefill, decode_step and a whole-loop `generate` under `jax.jit`.

`prefill` runs the (right-padded) prompts through the model in one pass and fills the KV cache;
`decode_step` adds one token per row, each row at its own position. `generate` runs the decode
loop on the device (`lax.while_loop`) and stops each row at EOS or its token budget. Sampling
parameters are arrays (one value per row), so new values never recompile; prompt lengths and
token budgets are padded to powers of two, so the number of compilations stays small. Every
program is compiled ahead of time once per shape (`PROGRAMS`), counted and logged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipeline.model import init_cache

MIN_BUCKET = 16
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling: temperature 0 is greedy; top_k 0 and top_p 1 turn those off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def bucket(n: int, limit: int) -> int:
    """The smallest power of two >= n (at least MIN_BUCKET), capped at `limit`."""
    size = MIN_BUCKET
    while size < n:
        size *= 2
    return min(size, limit)


def truncate(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Temperature-scaled logits with every token outside the top-k / top-p set at -inf.

    top-p keeps the smallest set of most likely tokens whose probability reaches top_p (always
    at least the most likely token); top_k 0 and top_p 1 keep everything.
    """
    B, V = logits.shape
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)  # (B, V) descending
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(V)[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    keep &= (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
    rows = jnp.arange(B)[:, None]
    return (
        jnp.full_like(scaled, -jnp.inf)
        .at[rows, order]
        .set(jnp.where(keep, sorted_logits, -jnp.inf))
    )


def sample(logits: jax.Array, keys: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """One token per row. logits (B, V) float32; keys (B, 2); the rest (B,) arrays.

    The sort behind top-k / top-p costs more than a small model's decode step, so it runs only
    when some row asks for it, and nothing but the argmax runs when every row is greedy.
    """

    def sampled():
        truncated = (top_k > 0) | (top_p < 1)
        masked = jax.lax.cond(
            jnp.any(truncated & (temperature > 0)),
            lambda: truncate(logits, temperature, top_k, top_p),
            lambda: logits / jnp.maximum(temperature, 1e-6)[:, None],
        )
        tokens = jax.vmap(jax.random.categorical)(keys, masked)
        return jnp.where(temperature > 0, tokens, jnp.argmax(logits, axis=-1))

    return jax.lax.cond(
        jnp.any(temperature > 0), sampled, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32)
    )


def prefill(model, tokens: jax.Array, lengths: jax.Array, cache):
    """Run right-padded prompts (B, P) into the cache; logits of each row's last token (B, V)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, cache = model(tokens, positions, cache, only=lengths - 1)
    return logits[:, 0], cache


def decode_step(model, tokens: jax.Array, positions: jax.Array, cache):
    """One token per row at its own position: tokens, positions (B,) -> logits (B, V)."""
    logits, cache = model(tokens[:, None], positions[:, None], cache)
    return logits[:, 0], cache


def decode_loop(
    model, logits, cache, lengths, budgets, temperature, top_k, top_p, seeds, eos_id, max_new
):
    """Sample and decode until every row has hit EOS or its budget: (tokens (B, max_new), steps).

    The token for step s of a row comes from `fold_in(PRNGKey(seed), s)`, so it does not depend
    on the other rows of the batch or on how the loop is driven (see `stream`).
    """
    B = logits.shape[0]
    base_keys = jax.vmap(jax.random.PRNGKey)(seeds)
    out = jnp.zeros((B, max_new), jnp.int32)

    def cond(carry):
        step, _, _, _, done = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, out, cache, logits, done = carry
        keys = jax.vmap(jax.random.fold_in, (0, None))(base_keys, step)
        token = sample(logits, keys, temperature, top_k, top_p)
        token = jnp.where(done, 0, token)
        out = out.at[:, step].set(token)
        done = done | (token == eos_id) | (step + 1 >= budgets)
        logits, cache = decode_step(model, token, lengths + step, cache)
        return step + 1, out, cache, logits, done

    done = budgets <= 0
    step, out, _, _, _ = jax.lax.while_loop(cond, body, (0, out, cache, logits, done))
    return out, step


@partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill(state, tokens, lengths, *, graphdef, cache_len: int):
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.cfg, tokens.shape[0], cache_len)
    return prefill(model, tokens, lengths, cache)


@partial(jax.jit, static_argnames=("graphdef", "max_new"))
def _decode_loop(state, logits, cache, *args, graphdef, max_new: int):
    return decode_loop(nnx.merge(graphdef, state), logits, cache, *args, max_new)


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _step_one(state, logits, cache, position, key, temperature, top_k, top_p, *, graphdef):
    model = nnx.merge(graphdef, state)
    token = sample(logits, key[None], temperature[None], top_k[None], top_p[None])
    logits, cache = decode_step(model, token, position[None], cache)
    return token[0], logits, cache


class Programs:
    """Ahead-of-time compiled programs, one per (function, static arguments, argument shapes).

    `get` compiles on first use, logs it and records the seconds it took, so callers can tell
    compilation from execution and tests can count compilations.
    """

    def __init__(self):
        self.compiled: dict = {}
        self.seconds = 0.0

    def get(self, fn, name: str, args: tuple, **static):
        leaves, treedef = jax.tree.flatten(args)
        shapes = tuple((np.shape(x), jnp.result_type(x).name) for x in leaves)
        key = (name, tuple(sorted(static.items(), key=lambda kv: kv[0])), treedef, shapes)
        program = self.compiled.get(key)
        if program is None:
            start = time.perf_counter()
            program = fn.lower(*args, **static).compile()
            seconds = time.perf_counter() - start
            self.compiled[key] = program
            self.seconds += seconds
            detail = ", ".join(f"{k}={v}" for k, v in static.items() if k != "graphdef")
            log.info(
                "compiled %s (input %s%s) in %.2f s: %d programs in this process",
                name,
                "x".join(map(str, np.shape(args[1]))) or "scalar",
                f", {detail}" if detail else "",
                seconds,
                len(self.compiled),
            )
        return program

    def __len__(self) -> int:
        return len(self.compiled)


PROGRAMS = Programs()


def compilations() -> int:
    """How many generation programs have been compiled in this process."""
    return len(PROGRAMS)


def check_request(prompt_len: int, max_new_tokens: int, context: int) -> None:
    """The one rule every entry point shares: a prompt, a budget, and both within the context."""
    if prompt_len <= 0:
        raise ValueError("the prompt is empty: it needs at least one token")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens > context:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's context of {context}"
        )


def check_sampling(sampling: Sampling) -> None:
    if not sampling.temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {sampling.temperature}")
    if not 0 < sampling.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {sampling.top_p}")
    if sampling.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {sampling.top_k}")


@dataclass(frozen=True)
class Batch:
    """A checked batch of requests as device arrays: right-padded prompts and per-row values."""

    tokens: jax.Array  # (B, P), P a bucket
    lengths: jax.Array  # (B,)
    budgets: np.ndarray  # (B,) host copy: rows are trimmed to it
    sampling: tuple  # temperature, top_k, top_p, seed: (B,) arrays
    max_new: int  # the budget bucket


def make_batch(prompts, max_new_tokens, sampling, context: int) -> Batch:
    B = len(prompts)
    budgets = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (B,)).copy()
    samplings = sampling if isinstance(sampling, list) else [sampling] * B
    for prompt, budget, s in zip(prompts, budgets, samplings, strict=True):
        check_request(len(prompt), int(budget), context)
        check_sampling(s)
    P = bucket(max(len(p) for p in prompts), context)
    tokens = np.zeros((B, P), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return Batch(
        tokens=jnp.asarray(tokens),
        lengths=jnp.asarray([len(p) for p in prompts], jnp.int32),
        budgets=budgets,
        sampling=sampling_arrays(samplings),
        max_new=bucket(int(budgets.max()), context),
    )


def sampling_arrays(samplings: list[Sampling]) -> tuple:
    """Per-row temperature, top_k, top_p and seed arrays (the programs take nothing else)."""
    return (
        jnp.asarray([s.temperature for s in samplings], jnp.float32),
        jnp.asarray([s.top_k for s in samplings], jnp.int32),
        jnp.asarray([s.top_p for s in samplings], jnp.float32),
        jnp.asarray([s.seed for s in samplings], jnp.uint32),
    )


def trim_rows(out: np.ndarray, counts, eos_id: int) -> list[list[int]]:
    """Each row's first `counts[i]` tokens, cut after its first EOS."""
    rows = []
    for row, n in zip(out, counts, strict=True):
        ids = [int(t) for t in row[: int(n)]]
        rows.append(ids[: ids.index(eos_id) + 1] if eos_id in ids else ids)
    return rows


def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int | list[int],
    sampling: Sampling | list[Sampling] = Sampling(),
    eos_id: int = -1,
) -> dict:
    """Generate for a batch of prompts (token ids). Returns ids per row and timings.

    Timings exclude compilation (reported as `compile_s`): `ttft_s` is the prefill (the first
    token's logits), `decode_s` the device loop, `tokens_per_sec` generated tokens over both.
    """
    batch = make_batch(prompts, max_new_tokens, sampling, model.cfg.max_seq_len)
    P, max_new = batch.tokens.shape[1], batch.max_new
    graphdef, state = nnx.split(model)
    loop_args = (batch.lengths, jnp.asarray(batch.budgets), *batch.sampling, jnp.int32(eos_id))
    compiled_before = PROGRAMS.seconds
    prefill_args = (state, batch.tokens, batch.lengths)
    prefill_fn = PROGRAMS.get(
        _prefill, "prefill", prefill_args, graphdef=graphdef, cache_len=P + max_new
    )
    start = time.perf_counter()
    logits, cache = jax.block_until_ready(prefill_fn(*prefill_args))
    ttft = time.perf_counter() - start
    args = (state, logits, cache, *loop_args)
    loop_fn = PROGRAMS.get(_decode_loop, "decode_loop", args, graphdef=graphdef, max_new=max_new)
    start = time.perf_counter()
    out, steps = loop_fn(*args)
    out = np.asarray(out)
    decode_s = time.perf_counter() - start
    rows = trim_rows(out, batch.budgets, eos_id)
    generated = sum(len(r) for r in rows)
    seconds = ttft + decode_s
    return {
        "tokens": rows,
        "steps": int(steps),
        "seconds": seconds,
        "ttft_s": ttft,
        "decode_s": decode_s,
        "compile_s": PROGRAMS.seconds - compiled_before,
        "tokens_per_sec": generated / seconds if seconds > 0 else 0.0,
    }


def stream(
    model, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(), eos_id: int = -1
):
    """Yield generated token ids one at a time, as they are produced.

    Two programs (prefill, one decode step) per prompt-length bucket; sampling values and the
    step index are arrays, so a new request or token never recompiles. Tokens equal
    `generate`'s for the same inputs.
    """
    cfg = model.cfg
    check_request(len(prompt), max_new_tokens, cfg.max_seq_len)
    check_sampling(sampling)
    P = bucket(len(prompt), cfg.max_seq_len)
    tokens = np.zeros((1, P), np.int32)
    tokens[0, : len(prompt)] = prompt
    graphdef, state = nnx.split(model)
    prefill_args = (state, jnp.asarray(tokens), jnp.asarray([len(prompt)], jnp.int32))
    cache_len = P + bucket(max_new_tokens, cfg.max_seq_len)
    prefill_fn = PROGRAMS.get(
        _prefill, "prefill", prefill_args, graphdef=graphdef, cache_len=cache_len
    )
    logits, cache = prefill_fn(*prefill_args)
    base_key = jax.random.PRNGKey(np.uint32(sampling.seed))
    params = (
        jnp.float32(sampling.temperature),
        jnp.int32(sampling.top_k),
        jnp.float32(sampling.top_p),
    )
    step_fn = None
    for step in range(max_new_tokens):
        args = (
            state,
            logits,
            cache,
            jnp.int32(len(prompt) + step),
            jax.random.fold_in(base_key, step),
            *params,
        )
        if step_fn is None:
            step_fn = PROGRAMS.get(_step_one, "decode_step", args, graphdef=graphdef)
        token, logits, cache = step_fn(*args)
        token = int(token)
        yield token
        if token == eos_id:
            return


# --- speculative decoding -------------------------------------------------------------------


def _probs(logits, temperature, top_k, top_p):
    """The distribution sampling draws from: tempered and truncated (rows with T > 0).

    Greedy rows never use it; when every row is greedy nothing is computed (zeros), and the
    sort behind top-k / top-p runs only when a sampling row asks for it.
    """

    def tempered():
        truncated = jnp.any(((top_k > 0) | (top_p < 1)) & (temperature > 0))
        masked = jax.lax.cond(
            truncated,
            lambda: truncate(logits, temperature, top_k, top_p),
            lambda: logits / jnp.maximum(temperature, 1e-6)[:, None],
        )
        return jax.nn.softmax(masked, axis=-1)

    return jax.lax.cond(jnp.any(temperature > 0), tempered, lambda: jnp.zeros_like(logits))


def speculate(target, draft, pos, last, tcache, dcache, keys, sampling, k: int):
    """One round: the draft proposes k tokens after `last` (at `pos`, not yet in the caches),
    the target scores them in one pass, the accept/reject rule keeps the target's distribution.

    Returns the k + 1 candidate tokens (B, k+1) of which the first n + 1 are produced (the n
    accepted drafts, then a token from the target), n (B,), that last token t (B,), and both
    caches, which now hold positions up to pos + n (later slots are rewritten before use).
    """
    temperature, top_k, top_p = sampling
    greedy = temperature <= 0
    B, V = last.shape[0], target.cfg.vocab_size
    rows = jnp.arange(B)

    def draft_step(i, c):
        dcache, tok, ds, qs = c
        logits, dcache = decode_step(draft, tok, pos + i, dcache)
        q = _probs(logits, *sampling)
        skeys = jax.vmap(jax.random.fold_in, (0, None))(keys, i)
        d = jax.lax.cond(
            jnp.all(greedy),
            lambda: jnp.argmax(logits, -1).astype(jnp.int32),
            lambda: jnp.where(
                greedy, jnp.argmax(logits, -1), jax.vmap(jax.random.categorical)(skeys, jnp.log(q))
            ).astype(jnp.int32),
        )
        return dcache, d, ds.at[:, i].set(d), qs.at[:, i].set(q)

    ds, qs = jnp.zeros((B, k), jnp.int32), jnp.zeros((B, k, V), jnp.float32)
    dcache, d_last, ds, qs = jax.lax.fori_loop(0, k, draft_step, (dcache, last, ds, qs))
    _, dcache = decode_step(draft, d_last, pos + k, dcache)  # an all-accepted round needs it
    verify = jnp.concatenate([last[:, None], ds], axis=1)  # (B, k+1) at pos..pos+k
    logits, tcache = target(verify, pos[:, None] + jnp.arange(k + 1)[None], tcache)
    ps = jax.vmap(lambda lg: _probs(lg, *sampling), in_axes=1, out_axes=1)(logits)
    p_d = jnp.take_along_axis(ps[:, :k], ds[..., None], -1)[..., 0]  # (B, k)
    q_d = jnp.take_along_axis(qs, ds[..., None], -1)[..., 0]
    u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(
        jax.vmap(jax.random.fold_in, (0, None))(keys, k + 1)
    )
    accept = jnp.where(greedy[:, None], ds == jnp.argmax(logits[:, :k], -1), u * q_d < p_d)
    n = jnp.sum(jnp.cumprod(accept, axis=1), axis=1)  # leading accepted drafts
    # the next token: from max(0, p_n - q_n) after a rejection, from p_k after none
    p_n = ps[rows, n]
    q_n = jnp.concatenate([qs, jnp.zeros((B, 1, V))], axis=1)[rows, n]
    residual = jnp.maximum(p_n - q_n, 0.0)
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_n)
    rkeys = jax.vmap(jax.random.fold_in, (0, None))(keys, k + 2)
    t = jax.vmap(jax.random.categorical)(rkeys, jnp.log(residual))
    t = jnp.where(greedy, jnp.argmax(logits[rows, n], -1), t).astype(jnp.int32)
    j = jnp.arange(k + 1)[None]
    emitted = jnp.where(j < n[:, None], jnp.pad(ds, ((0, 0), (0, 1))), t[:, None])
    return emitted, n, t, tcache, dcache


@partial(jax.jit, static_argnames=("tgraph", "dgraph", "max_new", "cache_len", "k"))
def _speculative(
    tstate,
    dstate,
    tokens,
    lengths,
    budgets,
    temperature,
    top_k,
    top_p,
    seeds,
    eos_id,
    *,
    tgraph,
    dgraph,
    max_new: int,
    cache_len: int,
    k: int,
):
    """Draft k tokens with the small model, verify them with one target pass, keep the target's
    distribution exact (greedy: the target's own tokens). Returns (tokens, count, stats)."""
    target, draft = nnx.merge(tgraph, tstate), nnx.merge(dgraph, dstate)
    B = tokens.shape[0]
    rows = jnp.arange(B)
    tlogits, tcache = prefill(target, tokens, lengths, init_cache(target.cfg, B, cache_len))
    _, dcache = prefill(draft, tokens, lengths, init_cache(draft.cfg, B, cache_len))
    base = jax.vmap(jax.random.PRNGKey)(seeds)
    keys = jax.vmap(jax.random.fold_in, (0, None))(base, 0)
    first = sample(tlogits, keys, temperature, top_k, top_p)  # as `generate`'s first token
    out = jnp.zeros((B, max_new + k + 1), jnp.int32).at[:, 0].set(first)
    count = jnp.ones((B,), jnp.int32)
    done = (count >= budgets) | (first == eos_id)
    sampling = (temperature, top_k, top_p)

    def cond(carry):
        it, _, _, _, _, _, done, _, _ = carry
        return (it < max_new) & ~jnp.all(done)

    def body(carry):
        it, pos, last, out, count, tcache, done, dcache, stats = carry
        ikeys = jax.vmap(jax.random.fold_in, (0, None))(base, it + 1)  # per iteration
        emitted, n, t, tcache, dcache = speculate(
            target, draft, pos, last, tcache, dcache, ikeys, sampling, k
        )
        j = jnp.arange(k + 1)[None]
        valid = (j <= n[:, None]) & ~done[:, None]
        index = count[:, None] + j
        current = out[rows[:, None], index]
        out = out.at[rows[:, None], index].set(jnp.where(valid, emitted, current))
        produced = jnp.where(done, 0, n + 1)
        hit_eos = jnp.any(valid & (emitted == eos_id), axis=1)
        stats = stats + jnp.stack([jnp.sum(jnp.where(done, 0, n)), jnp.sum(jnp.where(done, 0, k))])
        count = count + produced
        pos = pos + produced
        last = jnp.where(done, last, t)
        done = done | hit_eos | (count >= budgets)
        return it + 1, pos, last, out, count, tcache, done, dcache, stats

    carry = (0, lengths, first, out, count, tcache, done, dcache, jnp.zeros(2, jnp.int32))
    it, _, _, out, count, _, _, _, stats = jax.lax.while_loop(cond, body, carry)
    return out, count, stats, it


def speculative_generate(
    target,
    draft,
    prompts: list[list[int]],
    max_new_tokens: int | list[int],
    sampling: Sampling | list[Sampling] = Sampling(),
    eos_id: int = -1,
    k: int = 4,
) -> dict:
    """`generate` with a draft model proposing k tokens per target pass.

    The draft must share the target's vocabulary. Greedy output equals the target's alone; with
    sampling, the standard accept/reject rule keeps the target's distribution exactly. Caches
    need no rollback: slot s holds position s, and a position past the accepted tokens is
    written again before any query can see it.
    """
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(
            f"the draft's vocabulary ({draft.cfg.vocab_size}) differs from the target's "
            f"({target.cfg.vocab_size})"
        )
    if k < 1:
        raise ValueError(f"k (draft tokens per step) must be at least 1, got {k}")
    context = min(target.cfg.max_seq_len, draft.cfg.max_seq_len)
    batch = make_batch(prompts, max_new_tokens, sampling, context)
    P, max_new = batch.tokens.shape[1], batch.max_new
    tgraph, tstate = nnx.split(target)
    dgraph, dstate = nnx.split(draft)
    args = (
        tstate,
        dstate,
        batch.tokens,
        batch.lengths,
        jnp.asarray(batch.budgets),
        *batch.sampling,
        jnp.int32(eos_id),
    )
    static = {"tgraph": tgraph, "dgraph": dgraph, "max_new": max_new, "k": k}
    compiled_before = PROGRAMS.seconds
    fn = PROGRAMS.get(_speculative, "speculative", args, cache_len=P + max_new + k + 1, **static)
    start = time.perf_counter()
    out, count, stats, iterations = fn(*args)
    out = np.asarray(out)
    seconds = time.perf_counter() - start
    rows = trim_rows(out, np.minimum(np.asarray(count), batch.budgets), eos_id)
    accepted, proposed = (int(x) for x in np.asarray(stats))
    generated = sum(len(r) for r in rows)
    return {
        "tokens": rows,
        "seconds": seconds,
        "tokens_per_sec": generated / seconds if seconds > 0 else 0.0,
        "acceptance": accepted / proposed if proposed else 0.0,
        "iterations": int(iterations),
        "compile_s": PROGRAMS.seconds - compiled_before,
    }
