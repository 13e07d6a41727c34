"""Attention: the paths of a sequence over itself (training, evaluation), over the
contiguous KV cache (prefill and decode) and over the serving engine's paged cache.

Shapes as in `pipeline.model`: q (B, T, N, H), keys and values (B, S, K, H) for a sequence over
itself, (B, K, S, H) in the contiguous cache and (NB, K, bs, H) per block of a paged pool.
The paths compute the same thing (tested); which one runs is a backend choice (`attention_impl`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class PagedLayer(NamedTuple):
    """One layer's paged KV cache as the model sees it: the pools {k, v} (NB, K, bs, H) and
    the call's block table (B, W): position p of row b lives at offset p % bs of block
    table[b, p // bs]. A pytree, so it passes through `jit` like the contiguous cache's dicts."""

    k: jax.Array
    v: jax.Array
    table: jax.Array


def visible(q_positions: jax.Array, k_positions: jax.Array, window: int | None) -> jax.Array:
    """(B, T, S): which keys each query sees, causally and within the window if there is one."""
    q_pos, k_pos = q_positions[:, :, None], k_positions[:, None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def attention_impl(name: str, dtype, backend: str | None = None) -> str:
    """The training attention to use: `model.attention`, with "auto" resolved for the backend.

    auto: on CPU an explicit grouped einsum (faster there than XLA's dot_product_attention:
    forward plus backward at the small model's shape, 74 ms against 105 ms a layer); on GPUs in
    bfloat16 or float16, cuDNN's flash attention (fused, skips the masked blocks); otherwise
    (TPUs, float32 on GPUs) XLA's `jax.nn.dot_product_attention`.
    """
    backend = backend or jax.default_backend()
    if name == "cudnn" and backend not in ("gpu", "cuda", "rocm"):
        raise ValueError(f"model.attention=cudnn needs an NVIDIA GPU; this backend is {backend}")
    if name != "auto":
        return name
    if backend == "cpu":
        return "einsum"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if backend in ("gpu", "cuda") and half else "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    window: int | None = None,
    impl: str = "einsum",
    segments: jax.Array | None = None,
) -> jax.Array:
    """Causal softmax attention of a sequence over itself. q (B, T, N, H), k/v (B, T, K, H),
    positions (B, T) consecutive; `window`: each query sees only the last `window` keys.

    impl "einsum": `einsum_attention`; "xla" / "cudnn": `jax.nn.dot_product_attention` with that
    implementation, causal and windowed by its own arguments (no mask array, so cuDNN's flash
    kernel skips the blocks above the diagonal). All compute the same thing (tested).

    `segments` (B, T) int: packed rows, several documents each; a query sees only keys of its
    own segment (positions restart at each segment's start). An explicit mask then, on every
    path (cuDNN's kernel takes none: XLA's runs).
    """
    if segments is not None:
        mask = visible(positions, positions, window)
        mask &= segments[:, :, None] == segments[:, None, :]
        if impl == "einsum":
            return einsum_attention(q, k, v, mask)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")
    if impl == "einsum":
        mask = None if window is None else visible(positions, positions, window)
        return einsum_attention(q, k, v, mask)
    local = None if window is None else (window - 1, 0)
    call = lambda impl: jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, local_window_size=local, implementation=impl
    )
    if impl == "cudnn":
        try:
            return call("cudnn")
        except (ValueError, NotImplementedError, TypeError):
            # a shape or dtype cuDNN's kernel does not take (e.g. an odd head dim): XLA's
            return call("xla")
    return call(impl)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention over the KV cache, read in place. q (B, T, N, H), k/v (B, K, S, H) (the cache's
    layout), mask (B, T, S).

    The same grouped einsum on every backend: both batched matmuls read the cache where it lies
    (batch dims B, K leading), so decoding never transposes it. With S before K, XLA transposed
    the whole cache in every layer of every decode step (at batch 32 and 512 slots on CPU that
    was 25x slower than the matmuls); dot_product_attention wants (B, S, K, H) and would need
    that transpose too.
    """
    B, T, N, H = q.shape
    K = k.shape[1]
    q = q.reshape(B, T, K, N // K, H) * jnp.asarray(H**-0.5, q.dtype)
    q = q.transpose(0, 2, 3, 1, 4)  # (B, K, G, T, H): small, T is 1 when decoding
    scores = jnp.einsum("bkgth,bksh->bkgts", q, k).astype(jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->bkgth", probs, v)  # (B, K, G, T, H)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def paged_write(cache: PagedLayer, positions: jax.Array, k: jax.Array, v: jax.Array) -> PagedLayer:
    """Write keys/values (B, T, K, H) at their positions into a paged cache. A position
    outside the table, negative, or in a block numbered NB (none) is dropped."""
    table = cache.table
    NB, _, bs, _ = cache.k.shape
    W = table.shape[1]
    index = positions // bs
    block = jnp.take_along_axis(table, jnp.clip(index, 0, W - 1), axis=1)
    block = jnp.where((positions >= 0) & (index < W), block, NB)
    offset = positions % bs
    k, v = (
        pool.at[block, :, offset].set(new.astype(pool.dtype), mode="drop")
        for pool, new in ((cache.k, k), (cache.v, v))
    )
    return cache._replace(k=k, v=v)


def paged_attention(q: jax.Array, cache: PagedLayer, positions: jax.Array, window: int | None):
    """Attention of q (B, T, N, H) at `positions` (B, T) over the blocks of each row's table,
    the XLA path every backend runs: a loop over block columns (flash-decoding's online
    softmax), as many as the furthest position needs, each iteration reading `per` blocks per
    row. So a step reads the blocks that are live, not the table's width, and nothing
    recompiles as requests grow. A row sees the positions up to its query's (and within the
    window). A decode step (T = 1) reads one block per iteration (its rows' lengths differ);
    a prefill chunk up to 8 (fewer, longer iterations: 1.7-2.2x faster at T = 64-256 here)."""
    B, T, N, H = q.shape
    NB, K, bs, _ = cache.k.shape
    G, per = N // K, max(1, min(8, T // 8))
    W = -(-cache.table.shape[1] // per) * per
    table = jnp.pad(cache.table, ((0, 0), (0, W - cache.table.shape[1])), constant_values=NB)
    q = (q.reshape(B, T, K, G, H) * jnp.asarray(H**-0.5, q.dtype)).transpose(0, 2, 3, 1, 4)
    lowest = jnp.finfo(jnp.float32).min

    def body(j, carry):
        top, total, acc = carry
        block = jax.lax.dynamic_slice_in_dim(table, j * per, per, axis=1)  # (B, per)
        k, v = (
            pool[block].astype(q.dtype).transpose(0, 2, 1, 3, 4).reshape(B, K, per * bs, H)
            for pool in (cache.k, cache.v)
        )
        scores = jnp.einsum("bkgth,bksh->bkgts", q, k).astype(jnp.float32)
        k_pos = jnp.broadcast_to(j * per * bs + jnp.arange(per * bs), (B, per * bs))
        seen = visible(positions, k_pos, window)[:, None, None]  # (B, 1, 1, T, per * bs)
        scores = jnp.where(seen, scores, lowest)
        new_top = jnp.maximum(top, scores.max(-1))
        p = jnp.where(seen, jnp.exp(scores - new_top[..., None]), 0.0)
        rescale = jnp.exp(top - new_top)
        total = total * rescale + p.sum(-1)
        acc = acc * rescale[..., None] + jnp.einsum("bkgts,bksh->bkgth", p.astype(v.dtype), v)
        return new_top, total, acc

    columns = jnp.clip(jnp.max(positions) // (bs * per) + 1, 1, W // per)
    init = (
        jnp.full((B, K, G, T), lowest, jnp.float32),
        jnp.zeros((B, K, G, T), jnp.float32),
        jnp.zeros((B, K, G, T, H), jnp.float32),
    )
    _, total, acc = jax.lax.fori_loop(0, columns, body, init)
    out = acc / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]
    return out.astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


# Causal attention over itself, queries this many at a time: the block of queries i sees keys
# up to its own end only, so the scores above the diagonal's blocks are never computed.
QUERY_BLOCK = 64


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None):
    """`attention` as explicit einsums over (B, K, G, T, S) with G = N / K query heads per K.

    A sequence over itself (T == S) of at least two `QUERY_BLOCK`s goes a block of queries at a
    time (the last one may be shorter) against the keys up to the block's end: (n + 1) / 2n of
    the work of the whole square for n blocks (53% at 1,024 positions), and of the float32
    scores kept for the backward pass.
    """
    T, S = q.shape[1], k.shape[1]
    if T != S or T < 2 * QUERY_BLOCK:
        return _einsum_attention(q, k, v, mask)
    outputs = []
    for start in range(0, T, QUERY_BLOCK):
        end = min(start + QUERY_BLOCK, T)
        if mask is None:
            block_mask = (jnp.arange(end)[None] <= jnp.arange(start, end)[:, None])[None]
        else:
            block_mask = mask[:, start:end, :end]
        outputs.append(_einsum_attention(q[:, start:end], k[:, :end], v[:, :end], block_mask))
    return jnp.concatenate(outputs, axis=1)


def _einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None):
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    q = q.reshape(B, T, K, N // K, H) * jnp.asarray(H**-0.5, q.dtype)  # (B, T, K, G, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k).astype(jnp.float32)  # (B, K, G, T, S)
    if mask is None:
        mask = jnp.tril(jnp.ones((T, S), bool))[None]
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(B, T, N, H)
