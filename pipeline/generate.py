"""Inference: prefill, decode_step and a whole-loop `generate` under one `jax.jit`.

`prefill` runs the (right-padded) prompts through the model in one pass and fills the KV cache;
`decode_step` adds one token per row, each row at its own position. `generate` runs the decode
loop on the device (`lax.while_loop`) and stops each row at EOS or its token budget. Sampling
parameters are arrays (one value per row), so new values never recompile; prompt lengths and
token budgets are padded to powers of two, so the number of compilations stays small.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipeline.model import init_cache

MIN_BUCKET = 16


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


def sample(logits: jax.Array, keys: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """One token per row. logits (B, V) float32; keys (B, 2); the rest (B,) arrays."""
    V = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)  # (B, V) descending
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(V)[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    # top-p: keep the smallest prefix whose probability reaches top_p (always the first token)
    keep &= (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(keys, masked)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, sampled, greedy)


def prefill(model, tokens: jax.Array, lengths: jax.Array, cache):
    """Run right-padded prompts (B, P) into the cache; logits of each row's last token (B, V)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, cache = model(tokens, positions, cache)
    return logits[jnp.arange(tokens.shape[0]), lengths - 1], cache


def decode_step(model, tokens: jax.Array, positions: jax.Array, cache):
    """One token per row at its own position: tokens, positions (B,) -> logits (B, V)."""
    logits, cache = model(tokens[:, None], positions[:, None], cache)
    return logits[:, 0], cache


@partial(jax.jit, static_argnames=("graphdef", "max_new", "cache_len"))
def _generate(
    graphdef,
    state,
    tokens,
    lengths,
    budgets,
    temperature,
    top_k,
    top_p,
    seeds,
    eos_id,
    *,
    max_new: int,
    cache_len: int,
):
    model = nnx.merge(graphdef, state)
    B = tokens.shape[0]
    cache = init_cache(model.cfg, B, cache_len)
    logits, cache = prefill(model, tokens, lengths, cache)
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


def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int | list[int],
    sampling: Sampling | list[Sampling] = Sampling(),
    eos_id: int = -1,
) -> dict:
    """Generate for a batch of prompts (token ids). Returns ids per row and timings."""
    cfg = model.cfg
    B = len(prompts)
    budgets = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (B,)).copy()
    samplings = sampling if isinstance(sampling, list) else [sampling] * B
    longest = max(len(p) for p in prompts)
    if longest == 0:
        raise ValueError("a prompt needs at least one token")
    if longest + int(budgets.max()) > cfg.max_seq_len:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({int(budgets.max())}) "
            f"exceeds the model's context of {cfg.max_seq_len}"
        )
    P = bucket(longest, cfg.max_seq_len)
    max_new = bucket(int(budgets.max()), cfg.max_seq_len)
    tokens = np.zeros((B, P), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    graphdef, state = nnx.split(model)
    args = (
        jnp.asarray(tokens),
        jnp.asarray([len(p) for p in prompts], jnp.int32),
        jnp.asarray(budgets),
        jnp.asarray([s.temperature for s in samplings], jnp.float32),
        jnp.asarray([s.top_k for s in samplings], jnp.int32),
        jnp.asarray([s.top_p for s in samplings], jnp.float32),
        jnp.asarray([s.seed for s in samplings], jnp.uint32),
        jnp.int32(eos_id),
    )
    start = time.perf_counter()
    out, steps = _generate(graphdef, state, *args, max_new=max_new, cache_len=P + max_new)
    out = np.asarray(out)
    seconds = time.perf_counter() - start
    rows = []
    for i in range(B):
        ids = [int(t) for t in out[i, : budgets[i]]]
        rows.append(ids[: ids.index(eos_id) + 1] if eos_id in ids else ids)
    generated = sum(len(r) for r in rows)
    return {
        "tokens": rows,
        "seconds": seconds,
        "steps": int(steps),
        "tokens_per_sec": generated / seconds if seconds > 0 else 0.0,
    }


@partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill_one(graphdef, state, tokens, length, *, cache_len: int):
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.cfg, tokens.shape[0], cache_len)
    return prefill(model, tokens, length, cache)


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _step_one(graphdef, state, logits, cache, position, key, temperature, top_k, top_p):
    model = nnx.merge(graphdef, state)
    token = sample(logits, key[None], temperature[None], top_k[None], top_p[None])
    logits, cache = decode_step(model, token, position[None], cache)
    return token[0], logits, cache


def stream(
    model, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(), eos_id: int = -1
):
    """Yield generated token ids one at a time, as they are produced.

    Two jitted programs (prefill, one decode step) per prompt-length bucket; sampling values
    and the step index are arrays, so a new request or token never recompiles. Tokens equal
    `generate`'s for the same inputs.
    """
    cfg = model.cfg
    if not prompt or len(prompt) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) "
            f"must be 1..{cfg.max_seq_len} (the model's context)"
        )
    P = bucket(len(prompt), cfg.max_seq_len)
    tokens = np.zeros((1, P), np.int32)
    tokens[0, : len(prompt)] = prompt
    graphdef, state = nnx.split(model)
    length = jnp.asarray([len(prompt)], jnp.int32)
    logits, cache = _prefill_one(
        graphdef,
        state,
        jnp.asarray(tokens),
        length,
        cache_len=P + bucket(max_new_tokens, cfg.max_seq_len),
    )
    base_key = jax.random.PRNGKey(np.uint32(sampling.seed))
    params = (
        jnp.float32(sampling.temperature),
        jnp.int32(sampling.top_k),
        jnp.float32(sampling.top_p),
    )
    for step in range(max_new_tokens):
        key = jax.random.fold_in(base_key, step)
        position = jnp.int32(len(prompt) + step)
        token, logits, cache = _step_one(graphdef, state, logits, cache, position, key, *params)
        token = int(token)
        yield token
        if token == eos_id:
            return


def compilations() -> int:
    """How many versions of the generate loop have been compiled in this process."""
    return _generate._cache_size() + _prefill_one._cache_size() + _step_one._cache_size()
