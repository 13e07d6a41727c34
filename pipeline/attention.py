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
    forward plus backward at the small model's shape, 74 ms against 105 ms a layer); on NVIDIA
    GPUs in bfloat16 or float16, cuDNN's flash attention (fused, skips the masked blocks); on
    TPUs, Pallas's splash attention (the same, in Pallas's TPU kernel, as MaxText runs it);
    otherwise (float32 on GPUs, a backend this does not know) XLA's `dot_product_attention`.
    """
    backend = backend or jax.default_backend()
    if name == "cudnn" and backend not in ("gpu", "cuda", "rocm"):
        raise ValueError(f"model.attention=cudnn needs an NVIDIA GPU; this backend is {backend}")
    if name == "splash" and backend != "tpu":
        raise ValueError(f"model.attention=splash needs a TPU; this backend is {backend}")
    if name != "auto":
        return name
    if backend == "cpu":
        return "einsum"
    if backend == "tpu":
        return "splash"
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
    kernel skips the blocks above the diagonal); "splash": `splash_attention`. All compute the
    same thing (tested).

    `segments` (B, T) int: packed rows, several documents each; a query sees only keys of its
    own segment (positions restart at each segment's start). An explicit mask then, on every
    path (cuDNN's kernel takes none: XLA's runs).
    """
    if impl == "splash":
        return splash_attention(q, k, v, window, segments)
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


SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the (padded) length is used


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    window: int | None = None,
    segments: jax.Array | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """`attention` through Pallas's splash attention kernel for TPUs (causal or sliding-window
    masks as block structure, packed rows as segment ids). Grouped heads run as multi-query
    attention per key-value head. The sequence is padded to a multiple of 128 at the end (a
    causal query never sees the keys after it, so the padding changes nothing before it).
    `interpret` (default: off a TPU) runs the kernel in Pallas's interpreter, as the tests do.
    """
    # Pallas's TPU kernels: imported on the path that uses them
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    padded = -(-T // 128) * 128
    block = next(b for b in SPLASH_BLOCKS if padded % b == 0)

    def pad(x, value=0):
        widths = [(0, 0), (0, padded - T)] + [(0, 0)] * (x.ndim - 2)
        return jnp.pad(x, widths, constant_values=value)

    shape = (padded, padded)
    if window is None:
        mask = splash.CausalMask(shape)
    else:
        mask = splash.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    sizes = {
        f"block_{name}": block
        for name in ("q", "kv", "kv_compute", "q_dkv", "kv_dkv", "kv_dkv_compute", "q_dq", "kv_dq")
    }
    kernel = splash.make_splash_mqa_single_device(
        splash.MultiHeadMask([mask] * G),
        block_sizes=splash.BlockSizes(**sizes),
        interpret=jax.default_backend() != "tpu" if interpret is None else interpret,
    )
    # the kernel takes unscaled logits: the 1/sqrt(H) goes on the queries
    q = pad(q * jnp.asarray(H**-0.5, q.dtype)).reshape(B, padded, K, G, H)
    q = q.transpose(0, 2, 3, 1, 4)  # (B, K, G, T, H)
    k, v = (pad(x).transpose(0, 2, 1, 3) for x in (k, v))  # (B, K, T, H)
    if segments is None:
        per_head = jax.vmap(kernel)  # over the key-value heads
        out = jax.vmap(per_head)(q, k, v)
    else:
        ids = pad(segments.astype(jnp.int32), -1)  # the padding: a segment of its own

        def row(q, k, v, ids):
            seg = splash.SegmentIds(q=ids, kv=ids)
            return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=seg))(q, k, v)

        out = jax.vmap(row)(q, k, v, ids)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, padded, N, H)[:, :T]


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


def take(array: jax.Array, index: jax.Array) -> jax.Array:
    """`array[index]` (rows along the first axis). A bfloat16 or float16 array on CPU is
    gathered as its bits (uint16): XLA's CPU compiler computes in float32 and moves a
    conversion ahead of a gather, so `pool[block]` converted every layer's whole KV pool, and an
    embedding lookup the whole table, to float32 first (2.1 GB and 1 GB of temporaries in a
    1.24B bfloat16 model's prefill of 16 x 256 tokens); an integer gather it leaves alone."""
    array = jnp.asarray(array)  # a host array (numpy) indexes with a traced index too
    if not _narrow_float_on_cpu(array.dtype):
        return array[index]
    bits = jax.lax.bitcast_convert_type(array, jnp.uint16)[index]
    return jax.lax.bitcast_convert_type(bits, array.dtype)


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
    at = (block, slice(None), offset)
    k, v = (_put(pool, at, new) for pool, new in ((cache.k, k), (cache.v, v)))
    return cache._replace(k=k, v=v)


def _narrow_float_on_cpu(dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and jax.default_backend() == "cpu"


def pool_dtype(dtype) -> jnp.dtype:
    """The type a paged KV pool of `dtype` values is stored as: on CPU a bfloat16 or float16
    pool holds their bits (uint16). XLA's CPU compiler scatters narrow floats in float32, into
    a float32 copy of the whole pool (every layer's at once: 2.1 GB in a 1.24B bfloat16 model's
    prefill with a 1 GB pool), and a pool converted to bits for each write and back was still
    copied per layer (half the pool's bytes in the decode call's temporaries): a pool of bits
    is written in place and read a gathered block at a time (`read_blocks`)."""
    return jnp.dtype(jnp.uint16) if _narrow_float_on_cpu(dtype) else jnp.dtype(dtype)


def read_blocks(pool: jax.Array, blocks: jax.Array, dtype) -> jax.Array:
    """`pool[blocks]` as `dtype` values (a pool of bits holds values of that 16-bit type)."""
    if pool.dtype != jnp.uint16:
        return take(pool, blocks).astype(dtype)
    return jax.lax.bitcast_convert_type(pool[blocks], _narrow(dtype)).astype(dtype)


def _narrow(dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    return dtype if dtype in (jnp.bfloat16, jnp.float16) else jnp.dtype(jnp.bfloat16)


def _put(pool: jax.Array, index: tuple, new: jax.Array) -> jax.Array:
    """`pool.at[index].set(new)`, out-of-range rows dropped; a pool of bits (`pool_dtype`)
    takes the values' bits."""
    if pool.dtype == jnp.uint16:
        new = jax.lax.bitcast_convert_type(new.astype(_narrow(new.dtype)), jnp.uint16)
    return pool.at[index].set(new.astype(pool.dtype), mode="drop")


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
            read_blocks(pool, block, q.dtype).transpose(0, 2, 1, 3, 4).reshape(B, K, per * bs, H)
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


# Causal attention over itself, queries at least this many at a time: the block of queries i
# sees keys up to its own end only, so the scores above the diagonal's blocks are never computed.
QUERY_BLOCK = 64
# ... in at most this many blocks per layer (the blocks are unrolled in the program: 64 of them
# per layer at 4,096 positions made a 1B model's prompt-scoring program 13 MB of HLO, 0.3 GB
# held by its executable; 16 blocks keep (n + 1) / 2n of the square's work at 53%).
MAX_QUERY_BLOCKS = 16


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None):
    """`attention` as explicit einsums over (B, K, G, T, S) with G = N / K query heads per K.

    A sequence over itself (T == S) of at least two `QUERY_BLOCK`s goes a block of queries at a
    time (the last one may be shorter; blocks longer than `QUERY_BLOCK` past
    `MAX_QUERY_BLOCKS` of them) against the keys up to the block's end: (n + 1) / 2n of the
    work of the whole square for n blocks (53% at 1,024 positions), and of the float32 scores
    kept for the backward pass.
    """
    T, S = q.shape[1], k.shape[1]
    if T != S or T < 2 * QUERY_BLOCK:
        return _einsum_attention(q, k, v, mask)
    size = max(QUERY_BLOCK, -(-T // MAX_QUERY_BLOCKS))
    outputs = []
    for start in range(0, T, size):
        end = min(start + size, T)
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
