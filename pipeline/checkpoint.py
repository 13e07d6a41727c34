"""Orbax checkpoints of the training state: asynchronous saves, keep-N, restore-latest.

The state is saved as host numpy arrays (replicated state is identical on every device), so a
checkpoint does not depend on the device count or the parallel strategy that wrote it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from pipeline.config import ConfigError


class CheckpointError(ConfigError):
    """A run directory whose checkpoints exist but cannot be used."""


class Checkpointer:
    """Saves and restores `{"state": pytree, "meta": json}` under `<run dir>/checkpoints`."""

    def __init__(self, directory: str | Path, keep: int = 3, use_async: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=use_async, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start an asynchronous save; the next save (or `wait`) waits for it to finish."""
        host_state = jax.tree.map(np.asarray, state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(host_state), meta=ocp.args.JsonSave(meta)
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, like: Any) -> tuple[Any, dict]:
        """Restore the latest checkpoint into the structure of `like` (arrays or shapes)."""
        step = self.latest_step()
        target = jax.tree.map(lambda x: np.zeros(np.shape(x), x.dtype), like)
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as err:  # noqa: BLE001 - any failure means the same thing to the user
            raise CheckpointError(
                f"{self.directory}: checkpoint {step} cannot be restored "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                "pass --fresh to start this run over, or use another run.dir"
            ) from None
        return restored.state, restored.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_params(directory: str | Path, like: Any) -> Any:
    """The `params` of the latest checkpoint under `directory`, restored on their own.

    Orbax's partial restore reads only the arrays named in the target: the optimizer state
    (twice the parameters' bytes under Adam) is never read, and no optimizer is built.
    `like` gives the structure, shapes and dtypes (arrays or `jax.ShapeDtypeStruct`s); the
    result holds host numpy arrays.
    """
    manager = ocp.CheckpointManager(Path(directory).absolute())
    try:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"{directory} holds no complete checkpoint")
        target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)}
        restore_args = jax.tree.map(
            lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype), like
        )
        args = ocp.args.PyTreeRestore(
            item=target, restore_args={"params": restore_args}, partial_restore=True
        )
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=args))
        except Exception as err:  # noqa: BLE001 - any failure means the same thing to the user
            raise CheckpointError(
                f"{directory}: the parameters of checkpoint {step} cannot be read "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]})"
            ) from None
        return restored.state["params"]
    finally:
        manager.close()


def has_checkpoints(directory: str | Path) -> bool:
    path = Path(directory)
    return path.is_dir() and any(p.name.isdigit() for p in path.iterdir())


def remove_checkpoints(directory: str | Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
