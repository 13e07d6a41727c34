"""LoRA: low-rank adapters on named projections of the one Transformer, and their files.

A target projection `W` (an `nnx.Linear`, or its int8 `QuantizedLinear` under QLoRA) becomes
`LoRALinear`: y = W x + (alpha / rank) * B A dropout(x), with A (in, r) random and B (r, out)
zero, so the adapted model starts exactly equal to the base. A and B are `nnx.LoRAParam`s:
`nnx.split(model, nnx.LoRAParam, ...)` separates the adapters (trained, and the only state the
optimizer sees) from everything else (frozen). Dropout keys are `DropoutKey` variables set per
step by `set_dropout_keys`, so the forward stays a pure function of its inputs.

Files follow Hugging Face PEFT: `adapter_model.safetensors` with
`base_model.model.<module path>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), and
`adapter_config.json`. `merge` folds the adapters back into plain weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipeline.config import LoraConfig
from pipeline.model import Transformer
from pipeline.quantize import QuantizedLinear, quantize_model

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ATTENTION_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")


class DropoutKey(nnx.Variable):
    """A PRNG key for LoRA dropout; frozen state, replaced every step."""


class LoRALinear(nnx.Module):
    """`base(x) + scale * dropout(x) @ A @ B`, with B = 0 at initialisation."""

    def __init__(self, base: nnx.Module, rank: int, alpha: float, dropout: float, *, rngs):
        self.base = base
        self.scale = alpha / rank
        self.dropout = dropout
        init = nnx.initializers.normal(1.0 / base.in_features**0.5)
        self.lora_a = nnx.LoRAParam(init(rngs.params(), (base.in_features, rank), jnp.float32))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, base.out_features), jnp.float32))
        self.key = DropoutKey(jax.random.PRNGKey(0)) if dropout > 0 else None
        self.active = nnx.Variable(jnp.zeros((), jnp.bool_)) if dropout > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        h = x.astype(jnp.float32)
        if self.key is not None:
            keep = jax.random.bernoulli(self.key[...], 1.0 - self.dropout, h.shape)
            dropped = jnp.where(keep, h / (1.0 - self.dropout), 0.0)
            h = jnp.where(self.active[...], dropped, h)
        rows = h.reshape(-1, h.shape[-1])  # as rows, for the reason `cpu_forms.Linear` gives
        delta = (rows @ self.lora_a[...]) @ self.lora_b[...] * self.scale
        return y + delta.reshape(y.shape).astype(y.dtype)


def target_modules(model: Transformer, targets: tuple[str, ...]):
    """(parent module, attribute name, dotted path) of every projection named in `targets`."""
    found = []
    for i, block in enumerate(model.blocks):
        for name in targets:
            parent = block.attn if name in ATTENTION_TARGETS else block.mlp
            if name in (*ATTENTION_TARGETS, *MLP_TARGETS) and hasattr(parent, name):
                kind = "attn" if name in ATTENTION_TARGETS else "mlp"
                found.append((parent, name, f"blocks.{i}.{kind}.{name}"))
    if "lm_head" in targets and hasattr(model, "lm_head"):
        found.append((model, "lm_head", "lm_head"))
    return found


def add_lora(model: Transformer, cfg: LoraConfig, seed: int = 0) -> Transformer:
    """Wrap every target projection of `model` (in place) in a `LoRALinear`."""
    rngs = nnx.Rngs(params=seed)
    targets = target_modules(model, cfg.targets)
    if not targets:
        raise ValueError(f"lora.targets {list(cfg.targets)} names no projection of this model")
    for parent, name, _ in targets:
        base = getattr(parent, name)
        if cfg.base_quantize == "int8":
            base = QuantizedLinear(base)
        setattr(parent, name, LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout, rngs=rngs))
    if cfg.base_quantize == "int8":
        quantize_model(model, "int8")  # QLoRA: the projections without adapters too
    return model


def set_dropout_keys(model: Transformer, rng: jax.Array | None) -> None:
    """Give each LoRA layer its own dropout key for this step; None turns dropout off."""
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, LoRALinear) and m.key]
    for i, layer in enumerate(layers):
        layer.active[...] = jnp.asarray(rng is not None)
        if rng is not None:
            layer.key[...] = jax.random.fold_in(rng, i)


def lora_arrays(model: Transformer, targets: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The adapters as PEFT-named arrays: lora_A.weight (r, in), lora_B.weight (out, r)."""
    out = {}
    for parent, name, path in target_modules(model, targets):
        layer = getattr(parent, name)
        key = f"base_model.model.{path}"
        out[f"{key}.lora_A.weight"] = np.asarray(layer.lora_a[...]).T.copy()
        out[f"{key}.lora_B.weight"] = np.asarray(layer.lora_b[...]).T.copy()
    return out


def save_adapter(model: Transformer, cfg: LoraConfig, directory: str | Path, base: str | None):
    """Write adapter_model.safetensors and adapter_config.json (PEFT layout) into `directory`."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(lora_arrays(model, cfg.targets), str(directory / ADAPTER_WEIGHTS))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": base,
        "inference_mode": True,
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def load_adapter(model: Transformer, directory: str | Path) -> Transformer:
    """Add the adapters saved in `directory` to a base `model` (in place)."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    cfg = LoraConfig(
        rank=config["r"], alpha=config["lora_alpha"], targets=tuple(config["target_modules"])
    )
    add_lora(model, cfg)
    arrays = load_file(str(directory / ADAPTER_WEIGHTS))
    for parent, name, path in target_modules(model, cfg.targets):
        layer = getattr(parent, name)
        layer.lora_a[...] = jnp.asarray(arrays[f"base_model.model.{path}.lora_A.weight"].T)
        layer.lora_b[...] = jnp.asarray(arrays[f"base_model.model.{path}.lora_B.weight"].T)
    return model


def merge(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight (in place): W + scale * A B, plain nnx.Linear."""
    modules = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)]
    for module in modules:
        for name, child in list(vars(module).items()):
            if isinstance(child, LoRALinear):
                if not isinstance(child.base, nnx.Linear):
                    raise ValueError("merge needs a float base; this one is int8 (QLoRA)")
                kernel = child.base.kernel
                delta = child.lora_a[...] @ child.lora_b[...] * child.scale
                kernel[...] = kernel[...] + delta.astype(kernel.dtype)
                setattr(module, name, child.base)
    return model
