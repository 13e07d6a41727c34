"""Weight-only quantisation for inference (and for QLoRA's frozen base).

int8: one float32 scale per output channel. int4: one scale per group of `group` input rows
of each output channel, values in [-8, 7] stored in int8 containers (XLA has no packed int4 on
CPU; sizes are reported as if packed two to a byte). Weights are dequantised on the fly in the
forward pass; activations stay in the compute dtype.

For inference (`embeddings=True`) the token embedding, which is also the output head when tied,
is stored in int8 with one scale per token, in both modes: like llama.cpp's mixed formats, the
int4 mode keeps the vocabulary in 8 bits, where 4 bits cost the most quality. Norms, biases and
learned positions stay in float. What it costs is measured by
`pipeline bench quantize` (`pipeline/bench/inference.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
MODES = ("int8", "int4")


def quantize_array(kernel: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(d_in, d_out) float -> int8 values (G, g, d_out) and float32 scales (G, 1, d_out)."""
    d_in, d_out = kernel.shape
    levels = 127.0 if bits == 8 else 7.0
    grouped = np.asarray(kernel, np.float32).reshape(d_in // group, group, d_out)
    scale = np.maximum(np.abs(grouped).max(axis=1, keepdims=True), 1e-12) / levels
    values = np.clip(np.round(grouped / scale), -levels - 1, levels).astype(np.int8)
    return values, scale.astype(np.float32)


class QuantizedLinear(nnx.Module):
    """A frozen linear layer stored as int8 (or int4 values) with float32 scales."""

    def __init__(self, linear: nnx.Linear, bits: int = 8, group: int = 64):
        kernel = np.asarray(linear.kernel[...], np.float32)  # (in, out)
        d_in, d_out = kernel.shape
        self.bits = bits
        self.group = group if bits == 4 and d_in % group == 0 else d_in
        values, scale = quantize_array(kernel, bits, self.group)
        self.kernel_int8 = nnx.Variable(values)
        self.scale = nnx.Variable(scale)  # (G, 1, out)
        self.bias = linear.bias
        self.in_features, self.out_features = d_in, d_out
        self.dtype = linear.dtype or jnp.float32

    def __call__(self, x: jax.Array) -> jax.Array:
        # Dequantised on the fly: only the integer copy of the weight is kept.
        grouped = self.kernel_int8[...].astype(self.dtype) * self.scale[...].astype(self.dtype)
        kernel = grouped.reshape(self.in_features, self.out_features)
        y = x.astype(self.dtype) @ kernel
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class QuantizedEmbed(nnx.Module):
    """A frozen token embedding in int8 with one scale per token; `attend` is the tied head."""

    def __init__(self, embed: nnx.Embed):
        table = np.asarray(embed.embedding[...], np.float32)  # (V, D)
        values, scale = quantize_array(table.T, 8, table.shape[1])  # per token
        self.bits = 8
        self.embedding_int8 = nnx.Variable(values[0].T.copy())  # (V, D)
        self.scale = nnx.Variable(scale[0, 0].copy())  # (V,)
        self.dtype = embed.dtype or jnp.float32

    def __call__(self, ids: jax.Array) -> jax.Array:
        rows = self.embedding_int8[...][ids].astype(self.dtype)
        return rows * self.scale[...][ids][..., None].astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        table = self.embedding_int8[...].astype(self.dtype) * self.scale[...][:, None]
        return x.astype(self.dtype) @ table.T.astype(self.dtype)


def quantize_model(model, mode: str, group: int = 64, embeddings: bool = False):
    """Replace every attention and MLP projection (and an untied head) in place.

    `embeddings=True` (inference) also stores the token embedding in int8.
    """
    if mode not in MODES:
        raise ValueError(f"--quantize: {mode!r} is not one of {', '.join(MODES)}")
    bits = 8 if mode == "int8" else 4
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name in PROJECTIONS:
                if isinstance(getattr(parent, name, None), nnx.Linear):
                    setattr(parent, name, QuantizedLinear(getattr(parent, name), bits, group))
    if isinstance(getattr(model, "lm_head", None), nnx.Linear):
        model.lm_head = QuantizedLinear(model.lm_head, bits, group)
    if embeddings and isinstance(model.embed, nnx.Embed):
        model.embed = QuantizedEmbed(model.embed)
    return model


def weight_bytes(model) -> int:
    """Bytes of every array the model holds (int4 values counted at half a byte)."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model)):
        packed = "kernel_int8" in jax.tree_util.keystr(path) and _is_int4(model, path)
        total += leaf.size // 2 if packed else leaf.nbytes
    return int(total)


def _is_int4(model, path) -> bool:
    node = model
    for key in path[:-2]:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
        node = node[name] if isinstance(name, int) else getattr(node, name)
    return getattr(node, "bits", 8) == 4
