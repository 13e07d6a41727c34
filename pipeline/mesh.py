"""The sharded strategy: the same training step under `jax.jit` over a device mesh.

Axes `data`, `fsdp` and `tensor`. Parameters, optimizer state and frozen weights are sharded
over `fsdp` (the largest dimension it divides) and, for matrices, over `tensor` (another
dimension it divides); the batch is split over `data` x `fsdp`. XLA's SPMD partitioner inserts
the all-gathers and reduce-scatters, so `train_step` runs unchanged, with no named axis (the
gradient of the global loss is already global). Checkpoints hold whole host arrays, so a run
saved under one strategy resumes under the other.

`fit` compiles the step ahead of time from shapes alone (nothing is allocated, no data read)
and reports XLA's per-device memory.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pipeline.config import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH = P(("data", "fsdp"))


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
    """Same four methods as `PmapStrategy`; the loop does not know which one it runs."""

    axis_name = None  # jit over global arrays: no named axis to sum over

    def __init__(self, sizes: tuple[int, int, int], num_devices: int | None = None):
        devices = jax.devices() if num_devices is None else jax.local_devices()[:num_devices]
        self.devices = devices
        self.num_devices = len(devices)
        self.shape = mesh_shape(tuple(sizes), self.num_devices)
        self.mesh = jax.sharding.Mesh(np.array(devices).reshape(self.shape), AXES)
        self.batch_sharding = NamedSharding(self.mesh, BATCH)
        self.replicated = NamedSharding(self.mesh, P())

    def sharding_of(self, x) -> NamedSharding:
        _, fsdp, tensor = self.shape
        return NamedSharding(self.mesh, spec_for(tuple(np.shape(x)), fsdp, tensor))

    def shardings(self, tree):
        return jax.tree.map(self.sharding_of, tree)

    def make_parallel_step(self, fn: Callable, donate_state: bool = True) -> Callable:
        """`fn(state, batch)` under jit: state sharded as `shardings`, metrics replicated."""
        compiled: dict = {}

        def jitted(state):
            key = jax.tree.structure(state)
            if key not in compiled:
                shardings = self.shardings(state)
                out = (shardings, self.replicated) if donate_state else self.replicated
                compiled[key] = jax.jit(
                    fn,
                    in_shardings=(shardings, self.batch_sharding),
                    out_shardings=out,
                    donate_argnums=(0,) if donate_state else (),
                )
            return compiled[key]

        def step(state, batch):
            return jitted(state)(state, batch)

        step.lower = lambda state, batch: jitted(state).lower(state, batch)
        return step

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
            parts = self.shape[0] * self.shape[1]
            if rows % parts:
                raise ValueError(f"a batch of {rows} rows does not split over {parts} shards")
            return jax.make_array_from_process_local_data(
                self.batch_sharding, x, (rows, *x.shape[1:])
            )

        return jax.tree.map(put, batch)


def make_strategy(train_cfg):
    """The strategy `train.parallelism` names."""
    from pipeline.train import PmapStrategy

    if train_cfg.parallelism == "mesh":
        sizes = (train_cfg.mesh_data, train_cfg.mesh_fsdp, train_cfg.mesh_tensor)
        return MeshStrategy(sizes, train_cfg.num_devices)
    return PmapStrategy(train_cfg.num_devices)
