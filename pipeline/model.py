"""The one decoder-only Transformer, shared by pre-training, fine-tuning, distillation and serving.

`Transformer(cfg)(tokens, positions, cache) -> (logits, cache)` covers the GPT-2 family (learned
positions, LayerNorm, GELU, biases, tied embeddings), the Llama family (RoPE with its scaling
schemes, RMSNorm, SwiGLU, grouped-query attention, untied head) and its relatives: Qwen2 (q/k/v
biases), Qwen3 (per-head q/k RMSNorm, its own head dim), Mistral (sliding-window attention) and
Gemma (GeGLU, (1 + w) RMSNorm, embeddings scaled by sqrt(D)), chosen by `ModelConfig`.

Dimensions, named once: B batch, T query length, S key length (cache length), D model width,
N query heads, K key/value heads, H head dim, F mlp width, V vocabulary.

The KV cache is an explicit pytree: one `{"k": [B, K, S, H], "v": [B, K, S, H]}` per layer, where
slot s holds the key/value of position s. A forward pass writes its tokens at their positions and
lets each query at position p see slots 0..p, so training (no cache), prefill (T tokens) and
decode (T=1, each row at its own position) are the same code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pipeline.config import ModelConfig
from pipeline.rope import apply_rope, rope_tables

Cache = list[dict[str, jax.Array]]


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


class Attention(nnx.Module):
    """Multi-head / grouped-query self-attention with an optional KV cache.

    `window`: a query at position p sees keys at positions p - window + 1 .. p (Mistral's
    sliding window); None: every earlier position.
    """

    def __init__(self, cfg: ModelConfig, window: int | None = None, *, rngs: nnx.Rngs):
        self.cfg, self.window = cfg, window
        N, K, H, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
        self.q = _linear(cfg, D, N * H, rngs, bias=cfg.qkv_bias)
        self.k = _linear(cfg, D, K * H, rngs, bias=cfg.qkv_bias)
        self.v = _linear(cfg, D, K * H, rngs, bias=cfg.qkv_bias)
        self.o = _linear(cfg, N * H, D, rngs, residual=True)
        if cfg.qk_norm:
            self.q_norm = _norm(cfg, rngs, H)
            self.k_norm = _norm(cfg, rngs, H)

    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: dict | None, rope=None, segments=None
    ):
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q(x).reshape(B, T, cfg.num_heads, cfg.head_dim)  # (B, T, N, H)
        k = self.k(x).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)  # (B, T, K, H)
        v = self.v(x).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:  # per head, before the rotation (Qwen3)
            q, k = self.q_norm(q).astype(q.dtype), self.k_norm(k).astype(k.dtype)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is None:  # training and evaluation: keys are this sequence, causal
            impl = attention_impl(cfg.attention, q.dtype)
            out = attention(q, k, v, positions, self.window, impl, segments)
        elif "table" in cache:  # the serving engine's paged cache: a pool of blocks
            cache = paged_write(cache, positions, k, v)
            out = paged_attention(q, cache, positions, self.window)
        else:
            rows = jnp.arange(B)[:, None]
            # Write each token at its own position; positions past the cache are dropped.
            cache = {
                name: cache[name]
                .at[rows, :, positions]
                .set(new.astype(cache[name].dtype), mode="drop")
                for name, new in (("k", k), ("v", v))
            }
            # A cache may hold more rows than this batch (a server's slots): rows 0..B-1 are ours.
            k, v = (cache[name][:B].astype(q.dtype) for name in ("k", "v"))
            slots = jnp.broadcast_to(jnp.arange(k.shape[2]), (B, k.shape[2]))
            out = cached_attention(q, k, v, _visible(positions, slots, self.window))
        return self.o(out.reshape(B, T, -1)), cache


def _visible(q_positions: jax.Array, k_positions: jax.Array, window: int | None) -> jax.Array:
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
        mask = _visible(positions, positions, window)
        mask &= segments[:, :, None] == segments[:, None, :]
        if impl == "einsum":
            return einsum_attention(q, k, v, mask)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")
    if impl == "einsum":
        mask = None if window is None else _visible(positions, positions, window)
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


def paged_write(cache: dict, positions: jax.Array, k: jax.Array, v: jax.Array) -> dict:
    """Write keys/values (B, T, K, H) at their positions into a paged cache: a pool
    {"k", "v": (NB, K, bs, H)} and a block table (B, W) of pool blocks (position p of row b
    lives at offset p % bs of block table[b, p // bs]). A position outside the table, negative,
    or in a block numbered NB (none) is dropped."""
    table = cache["table"]
    NB, _, bs, _ = cache["k"].shape
    W = table.shape[1]
    index = positions // bs
    block = jnp.take_along_axis(table, jnp.clip(index, 0, W - 1), axis=1)
    block = jnp.where((positions >= 0) & (index < W), block, NB)
    offset = positions % bs
    return {
        **cache,
        **{
            name: cache[name].at[block, :, offset].set(new.astype(cache[name].dtype), mode="drop")
            for name, new in (("k", k), ("v", v))
        },
    }


def paged_attention(q: jax.Array, cache: dict, positions: jax.Array, window: int | None):
    """Attention of q (B, T, N, H) at `positions` (B, T) over the blocks of each row's table,
    the XLA path every backend runs: a loop over block columns (flash-decoding's online
    softmax), as many as the furthest position needs, each iteration reading `per` blocks per
    row. So a step reads the blocks that are live, not the table's width, and nothing
    recompiles as requests grow. A row sees the positions up to its query's (and within the
    window). A decode step (T = 1) reads one block per iteration (its rows' lengths differ);
    a prefill chunk up to 8 (fewer, longer iterations: 1.7-2.2x faster at T = 64-256 here)."""
    B, T, N, H = q.shape
    NB, K, bs, _ = cache["k"].shape
    G, per = N // K, max(1, min(8, T // 8))
    W = -(-cache["table"].shape[1] // per) * per
    table = jnp.pad(cache["table"], ((0, 0), (0, W - cache["table"].shape[1])), constant_values=NB)
    q = (q.reshape(B, T, K, G, H) * jnp.asarray(H**-0.5, q.dtype)).transpose(0, 2, 3, 1, 4)
    lowest = jnp.finfo(jnp.float32).min

    def body(j, carry):
        top, total, acc = carry
        block = jax.lax.dynamic_slice_in_dim(table, j * per, per, axis=1)  # (B, per)
        k, v = (
            cache[name][block].astype(q.dtype).transpose(0, 2, 1, 3, 4).reshape(B, K, per * bs, H)
            for name in ("k", "v")
        )
        scores = jnp.einsum("bkgth,bksh->bkgts", q, k).astype(jnp.float32)
        k_pos = jnp.broadcast_to(j * per * bs + jnp.arange(per * bs), (B, per * bs))
        seen = _visible(positions, k_pos, window)[:, None, None]  # (B, 1, 1, T, per * bs)
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


class MLP(nnx.Module):
    """GELU (GPT-2), SwiGLU (Llama) or GeGLU (Gemma) feed-forward block."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.kind = cfg.mlp
        if self.kind != "gelu":
            self.gate = _linear(cfg, cfg.embed_dim, cfg.mlp_dim, rngs)
        self.up = _linear(cfg, cfg.embed_dim, cfg.mlp_dim, rngs)
        self.down = _linear(cfg, cfg.mlp_dim, cfg.embed_dim, rngs, residual=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "swiglu":
            return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
        if self.kind == "geglu":  # tanh GELU on the gate, as Gemma's gelu_pytorch_tanh
            return self.down(jax.nn.gelu(self.gate(x), approximate=True) * self.up(x))
        return self.down(jax.nn.gelu(self.up(x), approximate=True))  # GPT-2's tanh GELU


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, window: int | None = None, *, rngs: nnx.Rngs):
        self.attn_norm = _norm(cfg, rngs)
        self.attn = Attention(cfg, window, rngs=rngs)
        self.mlp_norm = _norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, cache, rope=None, segments=None):
        h, cache = self.attn(self.attn_norm(x), positions, cache, rope, segments)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache


class Transformer(nnx.Module):
    """The decoder-only language model: `(tokens, positions, cache) -> (logits, cache)`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(cfg.init_std)
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.embed_dim, embedding_init=init, rngs=rngs, **_dtypes(cfg)
        )
        if cfg.positions == "learned":
            self.pos_embed = nnx.Embed(
                cfg.max_seq_len, cfg.embed_dim, embedding_init=init, rngs=rngs, **_dtypes(cfg)
            )
        self.blocks = nnx.List(
            [
                Block(cfg, cfg.sliding_window if cfg.uses_window(i) else None, rngs=rngs)
                for i in range(cfg.num_layers)
            ]
        )
        self.final_norm = _norm(cfg, rngs)
        if not cfg.tied_embeddings:
            self.lm_head = Linear(
                cfg.embed_dim,
                cfg.vocab_size,
                use_bias=False,
                kernel_init=init,
                rngs=rngs,
                **_dtypes(cfg),
            )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        cache: Cache | None = None,
        only: jax.Array | None = None,
        segments: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """tokens (B, T) int, positions (B, T) int -> float32 logits (B, T, V), updated cache.

        `only` (B,) int: the logits of that one index per row, (B, 1, V) (a prefill needs the
        last prompt token's alone; the output projection is a large share of the work).
        `segments` (B, T) int (training, no cache): packed rows; attention stays within a
        segment and positions (unless given) restart at each segment's start.
        """
        x, new_cache = self.hidden(tokens, positions, cache, only, segments)
        return self.head(x), new_cache

    def hidden(self, tokens, positions=None, cache=None, only=None, segments=None):
        """`__call__` without the output projection: the final-normed states (B, T, D)."""
        cfg = self.cfg
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
            if segments is not None:
                positions = segment_positions(segments)
        x = self.embed(tokens)  # (B, T, D)
        if cfg.embed_scale:  # Gemma: sqrt(D) in the compute dtype, as transformers rounds it
            x = x * jnp.asarray(cfg.embed_dim**0.5, x.dtype)
        rope = None
        if cfg.positions == "learned":
            x = x + self.pos_embed(positions)
        else:  # once per forward, shared by every layer
            # a prefill's rows are right-padded: its real length ends at the `only` positions
            real = None if only is None else jnp.take_along_axis(positions, only[:, None], 1)
            rope = rope_tables(cfg, positions, None if real is None else jnp.max(real) + 1)
        step = _remat(_block_step, cfg.remat)
        new_cache = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[i]
            x, layer_cache = step(block, x, positions, layer_cache, rope, segments)
            new_cache.append(layer_cache)
        if only is not None:
            x = x[jnp.arange(x.shape[0]), only][:, None]
        return self.final_norm(x), (None if cache is None else new_cache)

    def head(self, x: jax.Array) -> jax.Array:
        """Final-normed states (..., D) -> float32 logits (..., V)."""
        if self.cfg.tied_embeddings:  # as rows, for the reasons `Linear` gives
            logits = _attend(self.embed, x.reshape(-1, x.shape[-1]))
            logits = logits.reshape(*x.shape[:-1], logits.shape[-1])
        else:  # a `Linear`, or an adapter around one that needs the rows of the batch apart
            logits = self.lm_head(x)
        return logits.astype(jnp.float32)


def _attend(embed: nnx.Module, rows: jax.Array) -> jax.Array:
    """The tied head, rows (N, D) -> (N, V): `nnx.Embed.attend`'s product through
    `rows_dot_general`; another embedding (int8's) with its own `attend`."""
    if not isinstance(embed, nnx.Embed):
        return embed.attend(rows)
    rows, table = embed.promote_dtype((rows, embed.embedding[...]), dtype=embed.dtype)
    return rows_dot_general(rows, table.T, _ROWS)


def _block_step(block: Block, x, positions, cache, rope, segments=None):
    return block(x, positions, cache, rope, segments)


def segment_positions(segments: jax.Array) -> jax.Array:
    """(B, T) segment ids of packed rows -> each token's position within its segment."""
    index = jnp.broadcast_to(jnp.arange(segments.shape[1]), segments.shape)
    new = jnp.concatenate(
        [jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1
    )
    starts = jax.lax.cummax(jnp.where(new, index, 0), axis=1)
    return index - starts


def _remat(fn, policy: str):
    """`fn(block, *arrays)` recomputed in the backward pass instead of keeping its activations.

    The block goes in as (graph, state) and is merged again inside `jax.checkpoint`, a pure
    function of arrays: `nnx.remat` would update the block's variables in place, which fails
    when they come from an outer transform (LoRA's frozen base under `jax.grad`).
    """
    if policy == "none":
        return fn
    # "dots": keep matmul outputs, recompute the cheap elementwise work in the backward pass.
    kept = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if policy == "dots" else None

    def step(block, *args):
        graphdef, state = nnx.split(block)
        inner = lambda state, *args: fn(nnx.merge(graphdef, state), *args)  # noqa: E731
        if policy == "block" and jax.default_backend() == "cpu":
            return _recomputed_after_cotangent(inner)(state, *args)
        return jax.checkpoint(inner, policy=kept)(state, *args)

    return step


def _recomputed_after_cotangent(f):
    """`jax.checkpoint(f)` that also saves memory on XLA's CPU compiler.

    `jax.checkpoint` keeps the recomputation apart from the forward pass with optimization
    barriers; the CPU compiler drops them and merges the two again (same temporaries with and
    without remat: jax-ml/jax#19822). Here the recomputation's input depends on the incoming
    cotangent (x + 0 * one of its elements): it cannot be merged with the forward pass nor
    run before the backward pass reaches this block. `f(state, x, *rest)` -> (x, aux).
    """

    @jax.custom_vjp
    def g(state, x, *rest):
        return f(state, x, *rest)

    def fwd(state, x, *rest):
        return f(state, x, *rest), (state, x, rest)

    def bwd(saved, cotangent):
        state, x, rest = saved
        x = x + jax.tree.leaves(cotangent)[0].ravel()[0].astype(x.dtype) * 0
        return jax.vjp(f, state, x, *rest)[1](cotangent)

    g.defvjp(fwd, bwd)
    return g


def _dtypes(cfg: ModelConfig) -> dict:
    return {"dtype": dtype_of(cfg.compute_dtype), "param_dtype": dtype_of(cfg.param_dtype)}


class Linear(nnx.Linear):
    """`nnx.Linear` applied to its inputs as rows (N, features), then reshaped back.

    The same product, but autodiff of the (B, T, D) form contracts the weight gradient over
    two dimensions, which XLA's CPU compiler runs through transposed copies of the activations
    and gradients and a slower kernel: the small model's training step went from 3,608-3,691 to
    4,372-4,472 tokens/s with the rows form (`bench train --cases small`).
    A widening projection's gradients take the forms `rows_dot_general` gives.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("dot_general", rows_dot_general)
        super().__init__(*args, **kwargs)

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if inputs.ndim <= 2 or out_sharding is not None:
            return super().__call__(inputs, out_sharding)
        y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
        return y.reshape(*inputs.shape[:-1], y.shape[-1])


_ROWS = (((1,), (0,)), ((), ()))
# The largest matrix (elements) whose gradients take `_widening_matmul`'s forms: they copy w,
# x^T and dx^T, memory traffic and memory that the faster kernels repay at `small`'s output
# layer (2.6M) but not at gpt2-124m's (38.6M: that layer alone 2-3% faster, its step no faster
# and its process up to 8.1 GiB RSS against 6.0-6.5, alternated runs).
WIDENING_MAX = 1 << 22


def rows_dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs) -> jax.Array:
    """`lax.dot_general`, except (N, D_in) rows times a widening (D_in, D_out > D_in) matrix
    of at most `WIDENING_MAX` elements on CPU, whose gradients `_widening_matmul` takes in the
    forms XLA's CPU kernels run fastest.
    """
    plain = (
        lhs.ndim != 2
        or rhs.ndim != 2
        or rhs.shape[1] <= rhs.shape[0]
        or rhs.size > WIDENING_MAX
        or dimension_numbers != _ROWS
        or precision is not None
        or any(v is not None for v in kwargs.values())
        or jax.default_backend() != "cpu"
    )
    if plain:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)
    return _widening_matmul(lhs, rhs)


@jax.custom_vjp
def _widening_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (N, D_in) @ w (D_in, D_out), with D_out > D_in (an MLP's up-projection, the output
    layer).

    Autodiff's gradients are dx = g w^T, contracting over the wide D_out, and dw = x^T g. XLA's
    CPU compiler folds transposes into its matmuls, and for these shapes the folded forms run
    slowly: the small model's output layer ([4096, 320] x [320, 8192]) took 200 ms forward and
    backward. Here w and x^T are made as arrays of their own, dx comes out transposed,
    (w g^T)^T, and barriers keep the compiler from folding the transposes back: 160 ms, and an
    up-projection's 26.5 ms become 24. The values are the same up to float32 summation order.
    """
    return x @ w


def _widening_fwd(x, w):
    return x @ w, (x, w)


def _widening_bwd(residuals, g):
    x, w = residuals
    barrier = jax.lax.optimization_barrier
    dx_t = barrier(jax.lax.dot_general(barrier(w), g, (((1,), (1,)), ((), ()))))  # (D_in, N)
    dw = barrier(barrier(x.T) @ g)
    return dx_t.T, dw


_widening_matmul.defvjp(_widening_fwd, _widening_bwd)


def _linear(
    cfg: ModelConfig, d_in: int, d_out: int, rngs, residual: bool = False, bias: bool | None = None
) -> Linear:
    # GPT-2 scales the init of projections that write into the residual stream by 1/sqrt(2L).
    std = cfg.init_std / (2 * cfg.num_layers) ** 0.5 if residual else cfg.init_std
    return Linear(
        d_in,
        d_out,
        use_bias=cfg.use_bias if bias is None else bias,
        kernel_init=nnx.initializers.normal(std),
        rngs=rngs,
        **_dtypes(cfg),
    )


def _norm(cfg: ModelConfig, rngs, features: int | None = None) -> nnx.Module:
    # Normalisation statistics always in float32, whatever the compute dtype.
    features = features or cfg.embed_dim
    kw = {"epsilon": cfg.norm_eps, "param_dtype": dtype_of(cfg.param_dtype), "rngs": rngs}
    if cfg.norm == "gemma_rmsnorm":
        return GemmaRMSNorm(features, cfg.norm_eps, dtype_of(cfg.param_dtype))
    if cfg.norm == "rmsnorm":
        return nnx.RMSNorm(features, dtype=jnp.float32, **kw)
    return nnx.LayerNorm(features, use_bias=cfg.use_bias, dtype=jnp.float32, **kw)


class GemmaRMSNorm(nnx.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + scale), scale starting at zero, all in float32."""

    def __init__(self, features: int, epsilon: float, param_dtype):
        self.epsilon = epsilon
        self.scale = nnx.Param(jnp.zeros((features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.epsilon)
        return normed * (1.0 + self.scale[...].astype(jnp.float32))


def init_cache(cfg: ModelConfig, batch: int, max_len: int | None = None, dtype=None) -> Cache:
    """An empty KV cache; every buffer is allocated separately so the cache can be donated."""
    S = max_len or cfg.max_seq_len
    dtype = dtype or dtype_of(cfg.compute_dtype)
    shape = (batch, cfg.num_kv_heads, S, cfg.head_dim)
    return [
        {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers)
    ]


def init_paged_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype=None) -> Cache:
    """An empty paged KV cache: per layer a pool {"k", "v": (num_blocks, K, block_size, H)};
    the caller adds each call's block table ("table": (B, W)) to every layer's dict."""
    dtype = dtype or dtype_of(cfg.compute_dtype)
    shape = (num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
    return [
        {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers)
    ]


def create_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model's structure with shape-only parameters (no memory, no compute)."""
    return nnx.eval_shape(lambda: create_model(cfg))


def count_params(cfg: ModelConfig) -> int:
    """Parameter count from the model's own structure (exact, allocates nothing)."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return sum(int(x.size) for x in jax.tree.leaves(state))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), as in PaLM appendix B.

    6 * (parameters used in matmuls: everything but the embedding lookups, with the output
    projection counted even when it is tied) + 12 * layers * width * seq_len for attention.
    """
    D, V = cfg.embed_dim, cfg.vocab_size
    lookups = V * D + (cfg.max_seq_len * D if cfg.positions == "learned" else 0)
    matmul_params = count_params(cfg) - lookups + (V * D if cfg.tied_embeddings else 0)
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return 6.0 * matmul_params + attention
