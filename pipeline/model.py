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

from pipeline.attention import (
    PagedLayer,
    attention,
    attention_impl,
    cached_attention,
    paged_attention,
    paged_write,
    pool_dtype,
    take,
    visible,
)
from pipeline.config import ModelConfig
from pipeline.cpu_forms import Linear, after, attend, remat
from pipeline.rope import apply_rope, rope_tables

# Per layer: {"k", "v": (B, K, S, H)} (contiguous), or a `PagedLayer` (the serving engine's).
Cache = list[dict[str, jax.Array]] | list[PagedLayer]


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
        elif isinstance(cache, PagedLayer):  # the serving engine's paged cache
            # (in the queries' type: a pool of bits holds values of the compute type)
            cache = paged_write(cache, positions, k.astype(q.dtype), v.astype(q.dtype))
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
            out = cached_attention(q, k, v, visible(positions, slots, self.window))
        return self.o(out.reshape(B, T, -1)), cache


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
        x = _lookup(self.embed, tokens)  # (B, T, D)
        if cfg.embed_scale:  # Gemma: sqrt(D) in the compute dtype, as transformers rounds it
            x = x * jnp.asarray(cfg.embed_dim**0.5, x.dtype)
        rope = None
        if cfg.positions == "learned":
            x = x + _lookup(self.pos_embed, positions)
        else:  # once per forward, shared by every layer
            # a prefill's rows are right-padded: its real length ends at the `only` positions
            real = None if only is None else jnp.take_along_axis(positions, only[:, None], 1)
            rope = rope_tables(cfg, positions, None if real is None else jnp.max(real) + 1)
        step = remat(_block_step, cfg.remat)
        new_cache = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[i]
            block = after(block, x)  # on CPU, narrow weights converted as the layer runs
            x, layer_cache = step(block, x, positions, layer_cache, rope, segments)
            new_cache.append(layer_cache)
        if only is not None:
            x = x[jnp.arange(x.shape[0]), only][:, None]
        return self.final_norm(x), (None if cache is None else new_cache)

    def head(self, x: jax.Array, float32: bool = True) -> jax.Array:
        """Final-normed states (..., D) -> float32 logits (..., V) (or, `float32=False`, in the
        dtype the projection computes in)."""
        if self.cfg.tied_embeddings:  # as rows, for the reasons `Linear` gives
            # on CPU, a narrow table converted for the product here (a slice at a time), not
            # held from the start
            logits = attend(self.embed, x.reshape(-1, x.shape[-1]))
            logits = logits.reshape(*x.shape[:-1], logits.shape[-1])
        else:  # a `Linear`, or an adapter around one that needs the rows of the batch apart
            logits = self.lm_head(x)
        logits = logits.astype(jnp.float32) if float32 else logits
        used = self.cfg.vocab_used
        if used is not None and used < logits.shape[-1]:  # padding rows: never a token
            real = jnp.arange(logits.shape[-1]) < used
            logits = jnp.where(real, logits, jnp.finfo(logits.dtype).min)
        return logits


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


def _dtypes(cfg: ModelConfig) -> dict:
    return {"dtype": dtype_of(cfg.compute_dtype), "param_dtype": dtype_of(cfg.param_dtype)}


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
    """An empty paged KV cache's pools: per layer {"k", "v": (num_blocks, K, block_size, H)};
    a call passes each layer as a `PagedLayer` of its pools and the call's block table."""
    dtype = pool_dtype(dtype or dtype_of(cfg.compute_dtype))  # (on CPU, narrow floats as bits)
    shape = (num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
    return [
        {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers)
    ]


def _lookup(embed: nnx.Module, ids: jax.Array) -> jax.Array:
    """`embed(ids)`, with `nnx.Embed`'s table gathered by `take` (rows as bits on CPU: no
    float32 copy of the whole table) and then cast to its compute dtype, as `nnx.Embed` does
    in the other order; another embedding (int8's) through its own call."""
    if not isinstance(embed, nnx.Embed) or embed.num_embeddings == 1:
        return embed(ids)
    rows = take(embed.embedding[...], ids)
    return rows if embed.dtype is None else rows.astype(embed.dtype)


def create_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model's structure with shape-only parameters (no memory, no compute)."""
    return nnx.eval_shape(lambda: create_model(cfg))


def count_params(cfg: ModelConfig) -> int:
    """Parameter count from the model's own structure (exact, allocates nothing)."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return sum(int(x.size) for x in jax.tree.leaves(state))


# What a pass costs relative to a training step of the whole model (PaLM's 6 = 2 forward +
# 2 input gradients + 2 weight gradients per matmul parameter): a frozen base (LoRA's) skips
# its weight gradients, a forward pass (a reference's, a teacher's) is a third.
PASS_SHARE = {"train": 1.0, "frozen": 2 / 3, "forward": 1 / 3}


def flops_per_token(
    cfg: ModelConfig, seq_len: int, kind: str = "train", causal: bool = False
) -> float:
    """FLOPs per token, as in PaLM appendix B: a training step (forward + backward) by default,
    `kind` "frozen" (trained through, its weights frozen: LoRA's base) or "forward".

    6 * (parameters used in matmuls: everything but the embedding lookups, with the output
    projection counted even when it is tied) + 12 * layers * width * seq_len for attention
    (every query against every key, as PaLM counts; `causal` halves it, as MaxText counts).
    """
    D, V = cfg.embed_dim, cfg.vocab_size
    lookups = V * D + (cfg.max_seq_len * D if cfg.positions == "learned" else 0)
    matmul_params = count_params(cfg) - lookups + (V * D if cfg.tied_embeddings else 0)
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    attention *= 0.5 if causal else 1.0
    return (6.0 * matmul_params + attention) * PASS_SHARE[kind]
