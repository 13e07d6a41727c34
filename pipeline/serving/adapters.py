"""Many LoRA adapters of one base in one server, as S-LoRA and punica serve them.

Every target projection of the base becomes a `MultiLoRALinear`: the base weight, plus a stack
of `capacity` adapters (A: (capacity, in, r), B: (capacity, r, out), their scales), index 0
being "no adapter" (zeros). A batch mixes adapters: each row carries an adapter index, and its
update is `scale[i] * x A[i] B[i]` with A[i], B[i] gathered per row (the XLA path of punica's
batched gather matmul); a batch with no adapter row skips the work. The stacks have fixed
shapes, so loading or unloading an adapter at run time writes arrays and compiles nothing.

Adapters are LoRA runs of this base (PEFT files: `adapter_model.safetensors`,
`adapter_config.json`); a rank above `max_rank` or a target the base lacks is refused.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipeline.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRALinear, target_modules

ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")


class AdapterStack(nnx.Variable):
    """Stacked adapter weights: frozen state, rewritten when an adapter is loaded."""


class MultiLoRALinear(nnx.Module):
    """`base(x)` plus, per row b, `scale[i_b] * x A[i_b] B[i_b]` (i_b = `rows[b]`, set for the
    call by `set_rows`; 0 or unset: the base alone)."""

    def __init__(self, base: nnx.Module, capacity: int, rank: int):
        self.base = base
        self.a = AdapterStack(jnp.zeros((capacity, base.in_features, rank), jnp.float32))
        self.b = AdapterStack(jnp.zeros((capacity, rank, base.out_features), jnp.float32))
        self.scale = AdapterStack(jnp.zeros((capacity,), jnp.float32))
        self.rows = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        rows = self.rows
        if rows is None:
            return y

        def update():
            h = jnp.einsum("bti,bir->btr", x.astype(jnp.float32), self.a[...][rows])
            delta = jnp.einsum("btr,bro->bto", h, self.b[...][rows])
            return (delta * self.scale[...][rows][:, None, None]).astype(y.dtype)

        return y + jax.lax.cond(jnp.any(rows > 0), update, lambda: jnp.zeros_like(y))


def set_rows(model, rows: jax.Array | None) -> None:
    """Each row's adapter index for the next call (inside the traced program)."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, MultiLoRALinear):
            module.rows = rows


class Adapters:
    """The adapters a server holds: names, their stack indices and their files."""

    def __init__(self, model, capacity: int, max_rank: int):
        """Wrap every projection of `model` (in place) with room for `capacity` adapters."""
        for parent, name, _ in target_modules(model, ALL_TARGETS):
            layer = getattr(parent, name)
            if isinstance(layer, LoRALinear):
                raise ValueError("serve the base run with --adapter NAME=RUN, not a LoRA run")
            setattr(parent, name, MultiLoRALinear(layer, capacity + 1, max_rank))
        self.model, self.capacity, self.max_rank = model, capacity, max_rank
        self.index: dict[str, int] = {}  # name -> stack index (1..capacity)
        self.runs: dict[str, str] = {}
        self.loads = 0  # a fresh salt per load: cached prefixes never outlive their weights
        self.salts: dict[str, str] = {}
        self._lock = threading.Lock()

    def load(self, name: str, run: str | Path) -> int:
        """Read the adapter of LoRA run `run` into a free index under `name`: its index. A
        ValueError (a message for the client) when it cannot be served."""
        run = Path(run)
        if not (run / ADAPTER_CONFIG).is_file():
            raise ValueError(f"{run} is not a LoRA run (no {ADAPTER_CONFIG})")
        config = json.loads((run / ADAPTER_CONFIG).read_text())
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
        if rank > self.max_rank:
            raise ValueError(
                f"adapter {name!r} has rank {rank}; serve.max_lora_rank is {self.max_rank}"
            )
        from safetensors.numpy import load_file

        arrays = load_file(str(run / ADAPTER_WEIGHTS))
        with self._lock:
            if name in self.index:
                raise ValueError(f"an adapter named {name!r} is loaded already")
            free = sorted(set(range(1, self.capacity + 1)) - set(self.index.values()))
            if not free:
                raise ValueError(
                    f"all {self.capacity} adapter slots are taken (serve.max_adapters)"
                )
            i = free[0]
            self._write(i, arrays, rank, alpha / rank, name)
            self.index[name], self.runs[name] = i, str(run)
            self.loads += 1
            self.salts[name] = f"{name}#{self.loads}"
        return i

    def _write(self, i: int, arrays: dict, rank: int, scale: float, name: str) -> None:
        layers = {
            path: getattr(parent, attr)
            for parent, attr, path in target_modules(self.model, ALL_TARGETS)
        }
        found = {k.split("base_model.model.")[1].rsplit(".lora_", 1)[0] for k in arrays}
        missing = sorted(found - set(layers))
        if missing:
            raise ValueError(f"adapter {name!r} targets {missing[0]}, which this base lacks")
        for path, layer in layers.items():
            a = np.zeros(layer.a.shape[1:], np.float32)
            b = np.zeros(layer.b.shape[1:], np.float32)
            key = f"base_model.model.{path}"
            if path in found:
                A, B = arrays[f"{key}.lora_A.weight"].T, arrays[f"{key}.lora_B.weight"].T
                if A.shape[0] != a.shape[0] or B.shape[1] != b.shape[1]:
                    raise ValueError(f"adapter {name!r}: {path} does not fit this base's shapes")
                a[:, :rank], b[:rank] = A, B
            layer.a[...] = layer.a[...].at[i].set(a)
            layer.b[...] = layer.b[...].at[i].set(b)
            layer.scale[...] = layer.scale[...].at[i].set(scale if path in found else 0.0)

    def unload(self, name: str) -> int:
        """Forget `name` (its index is free again): the index it had."""
        with self._lock:
            if name not in self.index:
                raise KeyError(name)
            i = self.index.pop(name)
            self.runs.pop(name)
            self.salts.pop(name)
        for _, module in nnx.iter_graph(self.model):
            if isinstance(module, MultiLoRALinear):
                module.scale[...] = module.scale[...].at[i].set(0.0)
        return i

    def params(self) -> list:
        """The model's weights now, as the engine's programs take them (`programs.split`)."""
        return jax.tree.leaves(nnx.state(self.model))
