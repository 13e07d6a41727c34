"""Weight-only quantisation for inference (and for QLoRA's frozen base).

int8: one float32 scale per output channel. int4: one scale per group of `group` input rows
of each output channel, values in [-8, 7] stored in int8 containers (XLA has no packed int4 on
CPU; sizes are reported as if packed two to a byte). Weights are dequantised on the fly in the
forward pass; activations stay in the compute dtype.

For inference (`embeddings=True`) the token embedding, which is also the output head when tied,
is stored in int8 with one scale per token, in both modes: like llama.cpp's mixed formats, the
int4 mode keeps the vocabulary in 8 bits, where 4 bits cost the most quality. Norms, biases and
learned positions stay in float. `quality_report` measures what quantisation costs.
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


def quality_report(
    model_fn,
    tokens: np.ndarray,
    modes=MODES,
    seq_len: int = 128,
    batches: int = 8,
    batch_size: int = 8,
    prompts: int = 64,
    prompt_len: int = 32,
    new_tokens: int = 32,
) -> list[dict]:
    """What quantisation costs, measured against float32 on held-out tokens.

    `model_fn()` returns a fresh float model. For float32 and each mode: weight bytes, eval loss
    (next-token cross-entropy over `batches` x `batch_size` windows of `seq_len` tokens), the
    share of positions whose argmax next token equals float32's (teacher-forced, same windows),
    and the share of greedily generated tokens equal to float32's, position by position, over
    `prompts` prompts cut from the same tokens (a generation that diverges once scores its
    later positions as disagreements, so this is the stricter figure).
    """
    from pipeline.inference.generate import generate

    rng = np.random.default_rng(0)
    need = seq_len + 1
    if len(tokens) < need:
        raise ValueError(f"{len(tokens)} held-out tokens: need at least {need}")
    starts = rng.integers(0, len(tokens) - need + 1, batches * batch_size)
    windows = np.stack([tokens[s : s + need] for s in starts]).astype(np.int32)
    prompt_starts = rng.integers(0, len(tokens) - prompt_len + 1, prompts)
    prompt_ids = [[int(t) for t in tokens[s : s + prompt_len]] for s in prompt_starts]

    @nnx.jit
    def forward(model, x, y):
        logits, _ = model(x)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
        return nll.mean(), jnp.argmax(logits, axis=-1)

    results, reference = [], None
    for mode in ("float32", *modes):
        model = model_fn()
        if mode != "float32":
            quantize_model(model, mode, embeddings=True)
        losses, argmaxes = [], []
        for b in range(batches):
            rows = windows[b * batch_size : (b + 1) * batch_size]
            loss, argmax = forward(model, jnp.asarray(rows[:, :-1]), jnp.asarray(rows[:, 1:]))
            losses.append(float(loss))
            argmaxes.append(np.asarray(argmax))
        greedy = generate(model, prompt_ids, new_tokens)["tokens"]
        argmax = np.concatenate(argmaxes)
        if reference is None:
            reference = {"argmax": argmax, "greedy": greedy, "bytes": weight_bytes(model)}
        same = [
            a == b
            for ga, gb in zip(greedy, reference["greedy"], strict=True)
            for a, b in zip(ga, gb, strict=False)
        ]
        results.append(
            {
                "mode": mode,
                "weight_bytes": weight_bytes(model),
                "bytes_ratio": weight_bytes(model) / reference["bytes"],
                "eval_loss": float(np.mean(losses)),
                "next_token_agreement": float(np.mean(argmax == reference["argmax"])),
                "greedy_agreement": float(np.mean(same)),
            }
        )
    for r in results:
        r["eval_loss_delta"] = r["eval_loss"] - results[0]["eval_loss"]
    return results
