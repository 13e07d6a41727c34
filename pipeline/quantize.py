"""Weight-only quantisation for inference (and for QLoRA's frozen base).

int8: one float32 scale per output channel. int4: one scale per group of `group` input rows
of each output channel, values in [-8, 7] stored in int8 containers (XLA has no packed int4 on
CPU). Weights are dequantised on the fly in the forward pass; activations stay in the compute
dtype. The embedding (and a tied output head) stays in float.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


class QuantizedLinear(nnx.Module):
    """A frozen linear layer stored as int8 (or int4 values) with float32 scales."""

    def __init__(self, linear: nnx.Linear, bits: int = 8, group: int = 64):
        kernel = np.asarray(linear.kernel[...], np.float32)  # (in, out)
        d_in, d_out = kernel.shape
        self.bits = bits
        self.group = group if bits == 4 and d_in % group == 0 else d_in
        levels = 127.0 if bits == 8 else 7.0
        grouped = kernel.reshape(d_in // self.group, self.group, d_out)  # (G, g, out)
        scale = np.maximum(np.abs(grouped).max(axis=1, keepdims=True), 1e-12) / levels
        values = np.clip(np.round(grouped / scale), -levels - 1, levels).astype(np.int8)
        self.kernel_int8 = nnx.Variable(values)
        self.scale = nnx.Variable(scale.astype(np.float32))  # (G, 1, out)
        self.bias = linear.bias
        self.in_features, self.out_features = d_in, d_out
        self.dtype = linear.dtype or jnp.float32

    def __call__(self, x: jax.Array) -> jax.Array:
        # Dequantised on the fly: only the integer copy of the weight is kept.
        grouped = self.kernel_int8[...].astype(self.dtype) * self.scale[...].astype(self.dtype)
        kernel = grouped.reshape(self.in_features, self.out_features)
        y = x.astype(self.dtype) @ kernel
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


def quantize_model(model, mode: str, group: int = 64):
    """Replace every attention and MLP projection (and an untied head) in place."""
    if mode not in ("int8", "int4"):
        raise ValueError(f"--quantize: {mode!r} is not one of int8, int4")
    bits = 8 if mode == "int8" else 4
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name in PROJECTIONS:
                if isinstance(getattr(parent, name, None), nnx.Linear):
                    setattr(parent, name, QuantizedLinear(getattr(parent, name), bits, group))
    if isinstance(getattr(model, "lm_head", None), nnx.Linear):
        model.lm_head = QuantizedLinear(model.lm_head, bits, group)
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
