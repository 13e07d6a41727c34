"""Parallelism: one `Strategy` interface, two implementations, and nothing else knows either.

`PmapStrategy` is data parallelism with `jax.pmap`: the state replicated on every device, the
batch split, gradients summed over the named axis. `MeshStrategy` runs the same training step
under `jax.jit` over a `data` x `fsdp` x `tensor` mesh: parameters, optimizer state and frozen
weights sharded over `fsdp` (the largest dimension it divides) and, for matrices, over `tensor`
(another dimension it divides); the batch split over `data` x `fsdp`. XLA's SPMD partitioner
inserts the all-gathers and reduce-scatters, so `train_step` runs unchanged, with no named axis
(the gradient of the global loss is already global). Checkpoints hold whole host arrays, so a
run saved under one strategy resumes under the other.

The loop and `fit` use the `Strategy` protocol only; `make_strategy` picks the implementation
that `train.parallelism` names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pipeline.config import ConfigError

AXIS = "devices"  # the one pmap axis name; replicate with the same name or pmap compiles twice
MESH_AXES = ("data", "fsdp", "tensor")
BATCH = P(("data", "fsdp"))


class Strategy(Protocol):
    """How a per-device training step runs over the devices, and where its data live."""

    num_devices: int
    axis_name: str | None  # the axis the step sums gradients over; None under jit
    batch_shards: int  # how many parts the global batch is split into
    mesh_shape: tuple[int, ...] | None  # (data, fsdp, tensor), or None without a mesh

    def make_parallel_step(
        self, fn: Callable, state_like: Any, donate_state: bool = True
    ) -> Callable:
        """`fn(state, batch) -> (state, metrics)` (or metrics alone) over the devices, for a
        state shaped like `state_like` (host arrays or shapes). The result has `.lower`."""
        ...

    def replicate(self, tree: Any) -> Any:
        """Place a host tree (whole arrays, identical on every process) on the devices."""
        ...

    def unreplicate(self, tree: Any) -> Any:
        """Whole host values of a placed tree."""
        ...

    def shard_batch(self, batch: dict) -> dict:
        """Place this process's rows of the global batch."""
        ...

    def abstract(self, state: Any, rows_per_shard: int, width: int) -> tuple[Any, dict]:
        """The step's (state, batch) arguments as shapes: compile without allocating."""
        ...

    def per_device_bytes(self, tree: Any) -> int:
        """Bytes of `tree` (host shapes) that each device holds under this strategy."""
        ...


def _nbytes(x) -> int:
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


class PmapStrategy:
    """Data parallelism with `jax.pmap`: the state replicated on every device, the batch split.

    The only code that knows about pmap.
    """

    axis_name = AXIS
    mesh_shape = None

    def __init__(self, num_devices: int | None = None):
        local = jax.local_devices()
        if num_devices is not None and jax.process_count() > 1 and num_devices != len(local):
            raise ConfigError("train.num_devices: must be unset in a multi-process run")
        self.local_devices = local[: num_devices or len(local)]
        everything = len(self.local_devices) == len(local)
        # Every process's devices, in pmap's order, or the requested subset of a single process.
        self.devices = jax.devices() if everything else self.local_devices
        self.num_devices = self.batch_shards = len(self.devices)
        mesh = jax.sharding.Mesh(np.array(self.devices), (AXIS,))
        # Leading axis split over the devices, with pmap's axis name: no second compilation.
        self.sharding = NamedSharding(mesh, P(AXIS))

    def make_parallel_step(
        self, fn: Callable, state_like: Any = None, donate_state: bool = True
    ) -> Callable:
        """Wrap a per-device `fn(state, batch)` in `jax.pmap` over this strategy's devices."""
        donate = (0,) if donate_state else ()
        # devices=None spans every process's devices; naming them keeps pmap to this process.
        devices = None if self.devices == jax.devices() else self.devices
        return jax.pmap(fn, axis_name=AXIS, devices=devices, donate_argnums=donate)

    def _global(self, local: np.ndarray) -> jax.Array:
        """A global array from this process's slices (local devices, ...)."""
        shape = (self.num_devices, *local.shape[1:])
        return jax.make_array_from_process_local_data(self.sharding, local, shape)

    def replicate(self, tree):
        """One copy of `tree` per device (leading axis = devices)."""
        n = len(self.local_devices)

        def put(x):
            x = np.asarray(x)
            return self._global(np.broadcast_to(x, (n, *x.shape)))

        return jax.tree.map(put, tree)

    def unreplicate(self, tree):
        """The first local device's copy of a replicated tree (identical on every device).

        Reads the local shard: indexing the global array would be a collective in a
        multi-process run, which the other processes never join.
        """
        return jax.tree.map(lambda x: x.addressable_data(0)[0], tree)

    def shard_batch(self, batch: dict) -> dict:
        """This process's rows split evenly over its devices: (devices, rows / devices, ...)."""
        n = len(self.local_devices)

        def put(x):
            if x.shape[0] % n:
                raise ValueError(f"a batch of {x.shape[0]} rows does not split over {n} devices")
            return self._global(x.reshape(n, -1, *x.shape[1:]))

        return jax.tree.map(put, batch)

    def abstract(self, state, rows_per_shard: int, width: int):
        n = self.num_devices
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n, *x.shape), x.dtype), state)
        return state, {"tokens": jax.ShapeDtypeStruct((n, rows_per_shard, width), jnp.int32)}

    def per_device_bytes(self, tree) -> int:
        return sum(_nbytes(x) for x in jax.tree.leaves(tree))  # a whole copy on every device


def mesh_shape(sizes: tuple[int, int, int], devices: int) -> tuple[int, int, int]:
    """Resolve one -1 among (data, fsdp, tensor) so the product is the device count."""
    if sizes.count(-1) > 1:
        raise ConfigError("train.mesh_*: at most one of data, fsdp, tensor may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes) or devices % known:
        raise ConfigError(f"train.mesh_*: {sizes} does not divide {devices} devices")
    shape = tuple(devices // known if s == -1 else s for s in sizes)
    if int(np.prod(shape)) != devices:
        raise ConfigError(
            f"train.mesh_*: data x fsdp x tensor = {shape} uses {int(np.prod(shape))} of "
            f"{devices} devices"
        )
    return shape


def spec_for(shape: tuple[int, ...], fsdp: int, tensor: int) -> P:
    """Shard the largest dimension `fsdp` divides over fsdp, another that `tensor` divides
    (matrices only) over tensor; replicate the rest (scalars, small vectors)."""
    axes: list = [None] * len(shape)
    if len(shape) >= 2 and tensor > 1:
        for dim in reversed(range(len(shape))):
            if shape[dim] % tensor == 0:
                axes[dim] = "tensor"
                break
    if fsdp > 1:
        order = sorted(range(len(shape)), key=lambda d: -shape[d])
        for dim in order:
            if axes[dim] is None and shape[dim] % fsdp == 0 and shape[dim] >= fsdp:
                axes[dim] = "fsdp"
                break
    return P(*axes)


class MeshStrategy:
    """The training step under `jax.jit` over a data x fsdp x tensor mesh."""

    axis_name = None  # jit over global arrays: no named axis to sum over

    def __init__(self, sizes: tuple[int, int, int], num_devices: int | None = None):
        devices = jax.devices() if num_devices is None else jax.local_devices()[:num_devices]
        self.devices = devices
        self.num_devices = len(devices)
        self.mesh_shape = mesh_shape(tuple(sizes), self.num_devices)
        self.batch_shards = self.mesh_shape[0] * self.mesh_shape[1]
        self.mesh = jax.sharding.Mesh(np.array(devices).reshape(self.mesh_shape), MESH_AXES)
        self.batch_sharding = NamedSharding(self.mesh, BATCH)
        self.replicated = NamedSharding(self.mesh, P())

    def sharding_of(self, x) -> NamedSharding:
        _, fsdp, tensor = self.mesh_shape
        return NamedSharding(self.mesh, spec_for(tuple(np.shape(x)), fsdp, tensor))

    def shardings(self, tree):
        return jax.tree.map(self.sharding_of, tree)

    def make_parallel_step(
        self, fn: Callable, state_like: Any, donate_state: bool = True
    ) -> Callable:
        """`fn(state, batch)` under jit: state sharded as `shardings`, metrics replicated."""
        shardings = self.shardings(state_like)
        return jax.jit(
            fn,
            in_shardings=(shardings, self.batch_sharding),
            out_shardings=(shardings, self.replicated) if donate_state else self.replicated,
            donate_argnums=(0,) if donate_state else (),
        )

    def replicate(self, tree):
        """Place a host tree (whole arrays, identical on every process) with its shardings."""

        def put(x):
            x = np.asarray(x)
            sharding = self.sharding_of(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree.map(put, tree)

    def unreplicate(self, tree):
        """Whole host arrays (gathered across processes where needed)."""

        def get(x):
            if not isinstance(x, jax.Array) or x.is_fully_addressable:
                return np.asarray(x)
            if x.sharding.is_fully_replicated:  # metrics: every process holds the value
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))

        return jax.tree.map(get, tree)

    def shard_batch(self, batch: dict) -> dict:
        """This process's rows as one global batch split over data x fsdp."""

        def put(x):
            rows = x.shape[0] * jax.process_count()
            if rows % self.batch_shards:
                raise ValueError(
                    f"a batch of {rows} rows does not split over {self.batch_shards} shards"
                )
            return jax.make_array_from_process_local_data(
                self.batch_sharding, x, (rows, *x.shape[1:])
            )

        return jax.tree.map(put, batch)

    def abstract(self, state, rows_per_shard: int, width: int):
        state = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.sharding_of(x)), state
        )
        rows = rows_per_shard * self.batch_shards
        tokens = jax.ShapeDtypeStruct((rows, width), jnp.int32, sharding=self.batch_sharding)
        return state, {"tokens": tokens}

    def per_device_bytes(self, tree) -> int:
        sizes = dict(zip(MESH_AXES, self.mesh_shape, strict=True))
        total = 0
        for x in jax.tree.leaves(tree):
            shards = int(np.prod([sizes[a] for a in self.sharding_of(x).spec if a is not None]))
            total += _nbytes(x) // shards
        return total


def make_strategy(train_cfg) -> Strategy:
    """The strategy `train.parallelism` names."""
    if train_cfg.parallelism == "mesh":
        sizes = (train_cfg.mesh_data, train_cfg.mesh_fsdp, train_cfg.mesh_tensor)
        return MeshStrategy(sizes, train_cfg.num_devices)
    return PmapStrategy(train_cfg.num_devices)
