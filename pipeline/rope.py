"""Rotary position embeddings and their context-extension schemes, as transformers computes them.

`rope_tables(cfg, positions)` gives the (cos, sin) tables of a forward pass, computed once and
shared by every layer. The inverse frequencies follow transformers' `modeling_rope_utils`:
`linear` (positions divided by the factor), `llama3` (Llama 3.1: low frequencies divided by the
factor, high ones kept, a smooth ramp between), `yarn` (a ramp between interpolated and
extrapolated frequencies per dimension, cos and sin scaled by an attention factor) and
`dynamic` (NTK: the base grows with the sequence length past the context, so its frequencies
depend on the longest position of the forward pass, as transformers recomputes them).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.config import ModelConfig


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    """theta^(-2i/dim), i < dim/2, in float32 as transformers computes it."""
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)


def _llama3(cfg: ModelConfig, inv_freq: np.ndarray) -> np.ndarray:
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    context = cfg.rope_original_max_len or cfg.max_seq_len
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high) & ~(wavelen > context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def yarn_attention_factor(cfg: ModelConfig) -> float:
    if cfg.rope_attention_factor is not None:
        return cfg.rope_attention_factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        return mscale(cfg.rope_factor, cfg.rope_mscale) / mscale(
            cfg.rope_factor, cfg.rope_mscale_all_dim
        )
    return mscale(cfg.rope_factor)


def _yarn(cfg: ModelConfig, dim: int) -> np.ndarray:
    base, factor = cfg.rope_theta, cfg.rope_factor
    context = cfg.rope_original_max_len or cfg.max_seq_len

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(context / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp.astype(np.float32)
    pos_freqs = np.power(np.float32(base), np.arange(0, dim, 2).astype(np.float32) / dim)
    inv_extrapolation = 1.0 / pos_freqs
    inv_interpolation = 1.0 / (factor * pos_freqs)
    mixed = inv_interpolation * (1 - extrapolation) + inv_extrapolation * extrapolation
    return mixed.astype(np.float32)


def inverse_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies (H/2,), the factor cos and sin are scaled by) for a static scheme."""
    dim = cfg.head_dim
    inv_freq = _base_inv_freq(cfg.rope_theta, dim)
    if cfg.rope_scaling == "linear":
        return inv_freq / np.float32(cfg.rope_factor), 1.0
    if cfg.rope_scaling == "llama3":
        return _llama3(cfg, inv_freq), 1.0
    if cfg.rope_scaling == "yarn":
        return _yarn(cfg, dim), yarn_attention_factor(cfg)
    return inv_freq, 1.0


def _dynamic_inv_freq(cfg: ModelConfig, seq_len: jax.Array) -> jax.Array:
    """NTK-aware scaling: the base grows once the sequence outgrows the original context."""
    dim, factor = cfg.head_dim, cfg.rope_factor
    context = cfg.rope_original_max_len or cfg.max_seq_len
    seq_len = jnp.maximum(seq_len.astype(jnp.float32), context)
    base = cfg.rope_theta * ((factor * seq_len / context) - (factor - 1)) ** (dim / (dim - 2))
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (base**exponents)


def rope_tables(
    cfg: ModelConfig, positions: jax.Array, seq_len: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """cos and sin of every position's angles: (B, T, H/2) float32 each.

    `seq_len`: the sequence length `dynamic` scales for (as transformers, the longest real
    position + 1 in the batch); None: from `positions` (no padding among them).
    """
    if cfg.rope_scaling == "dynamic":
        seq_len = jnp.max(positions) + 1 if seq_len is None else seq_len
        inv_freq, scale = _dynamic_inv_freq(cfg, seq_len), 1.0
    else:
        inv_freq, scale = inverse_frequencies(cfg)
        inv_freq = jnp.asarray(inv_freq)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, H/2)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate x (B, T, *, H) by the tables, half-split layout (as Hugging Face Llama)."""
    cos, sin = (t[:, :, None, :] for t in tables)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
