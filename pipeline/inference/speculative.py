"""Speculative decoding: a small draft proposes k tokens, the target verifies them in one pass.

The accept/reject rule (Leviathan et al. 2023; Chen et al. 2023) keeps the target's
distribution exactly; greedy rows get the target's own tokens. `speculate` is one round, shared
by `speculative_generate` (the whole loop under one jit) and the serving engine (a round per
engine step). Round i of a request draws from `request_keys(seed, i + 1)`, folded further per
draft position; the first token, as in `generate`, from `request_keys(seed, 0)`.
"""

from __future__ import annotations

import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipeline.inference.generate import (
    PROGRAMS,
    Generation,
    decode_step,
    make_batch,
    prefill,
    stop_ids,
    trim_rows,
)
from pipeline.inference.sampling import Sampling, greedy_tokens, request_keys, sample, truncate
from pipeline.model import init_cache


def distribution(logits, temperature, top_k, top_p):
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
        q = distribution(logits, *sampling)
        skeys = jax.vmap(jax.random.fold_in, (0, None))(keys, i)
        d = jax.lax.cond(
            jnp.all(greedy),
            lambda: greedy_tokens(logits),
            lambda: jnp.where(
                greedy, greedy_tokens(logits), jax.vmap(jax.random.categorical)(skeys, jnp.log(q))
            ).astype(jnp.int32),
        )
        return dcache, d, ds.at[:, i].set(d), qs.at[:, i].set(q)

    ds, qs = jnp.zeros((B, k), jnp.int32), jnp.zeros((B, k, V), jnp.float32)
    dcache, d_last, ds, qs = jax.lax.fori_loop(0, k, draft_step, (dcache, last, ds, qs))
    _, dcache = decode_step(draft, d_last, pos + k, dcache)  # an all-accepted round needs it
    verify = jnp.concatenate([last[:, None], ds], axis=1)  # (B, k+1) at pos..pos+k
    logits, tcache = target(verify, pos[:, None] + jnp.arange(k + 1)[None], tcache)
    ps = jax.vmap(lambda lg: distribution(lg, *sampling), in_axes=1, out_axes=1)(logits)
    p_d = jnp.take_along_axis(ps[:, :k], ds[..., None], -1)[..., 0]  # (B, k)
    q_d = jnp.take_along_axis(qs, ds[..., None], -1)[..., 0]
    u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(
        jax.vmap(jax.random.fold_in, (0, None))(keys, k + 1)
    )
    accept = jnp.where(greedy[:, None], ds == greedy_tokens(logits[:, :k]), u * q_d < p_d)
    n = jnp.sum(jnp.cumprod(accept, axis=1), axis=1)  # leading accepted drafts
    # the next token: from max(0, p_n - q_n) after a rejection, from p_k after none
    p_n = ps[rows, n]
    q_n = jnp.concatenate([qs, jnp.zeros((B, 1, V))], axis=1)[rows, n]
    residual = jnp.maximum(p_n - q_n, 0.0)
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_n)
    rkeys = jax.vmap(jax.random.fold_in, (0, None))(keys, k + 2)
    t = jax.vmap(jax.random.categorical)(rkeys, jnp.log(residual))
    t = jnp.where(greedy, greedy_tokens(logits[rows, n]), t).astype(jnp.int32)
    j = jnp.arange(k + 1)[None]
    emitted = jnp.where(j < n[:, None], jnp.pad(ds, ((0, 0), (0, 1))), t[:, None])
    return emitted, n, t, tcache, dcache


class _Loop(NamedTuple):
    """The speculative loop's state: its iteration, each row's next position, last token,
    tokens so far and their count, both caches, which rows are done, and (accepted, proposed)
    draft-token totals."""

    it: jax.Array
    pos: jax.Array
    last: jax.Array
    out: jax.Array
    count: jax.Array
    tcache: list
    done: jax.Array
    dcache: list
    stats: jax.Array


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
    keys = request_keys(seeds, 0)
    first = sample(tlogits, keys, temperature, top_k, top_p)  # as `generate`'s first token
    out = jnp.zeros((B, max_new + k + 1), jnp.int32).at[:, 0].set(first)
    count = jnp.ones((B,), jnp.int32)
    done = (count >= budgets) | jnp.isin(first, eos_id)
    sampling = (temperature, top_k, top_p)

    def cond(s: _Loop):
        return (s.it < max_new) & ~jnp.all(s.done)

    def body(s: _Loop) -> _Loop:
        it, pos, last, out, count, tcache, done, dcache, stats = s
        ikeys = request_keys(seeds, it + 1)  # per iteration
        emitted, n, t, tcache, dcache = speculate(
            target, draft, pos, last, tcache, dcache, ikeys, sampling, k
        )
        j = jnp.arange(k + 1)[None]
        valid = (j <= n[:, None]) & ~done[:, None]
        index = count[:, None] + j
        current = out[rows[:, None], index]
        out = out.at[rows[:, None], index].set(jnp.where(valid, emitted, current))
        produced = jnp.where(done, 0, n + 1)
        hit_eos = jnp.any(valid & jnp.isin(emitted, eos_id), axis=1)
        stats = stats + jnp.stack([jnp.sum(jnp.where(done, 0, n)), jnp.sum(jnp.where(done, 0, k))])
        count = count + produced
        pos = pos + produced
        last = jnp.where(done, last, t)
        done = done | hit_eos | (count >= budgets)
        return _Loop(it + 1, pos, last, out, count, tcache, done, dcache, stats)

    start = _Loop(0, lengths, first, out, count, tcache, done, dcache, jnp.zeros(2, jnp.int32))
    end = jax.lax.while_loop(cond, body, start)
    return end.out, end.count, end.stats, end.it


def speculative_generate(
    target,
    draft,
    prompts: list[list[int]],
    max_new_tokens: int | list[int],
    sampling: Sampling | list[Sampling] = Sampling(),
    eos_id: int | tuple[int, ...] = -1,
    k: int = 4,
) -> Generation:
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
        jnp.asarray(stop_ids(eos_id), jnp.int32),
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
    return Generation(
        tokens=rows,
        seconds=seconds,
        tokens_per_sec=generated / seconds if seconds > 0 else 0.0,
        compile_s=PROGRAMS.seconds - compiled_before,
        acceptance=accepted / proposed if proposed else 0.0,
        iterations=int(iterations),
    )
