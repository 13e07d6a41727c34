"""Orbax checkpoints of the training state: asynchronous saves, keep-N, restore-latest.

The state is saved as host numpy arrays (replicated state is identical on every device), so a
checkpoint does not depend on the device count or the parallel strategy that wrote it.

Integrity: orbax writes a checkpoint into a temporary folder and renames it when complete, so a
crash mid-write leaves no half checkpoint, but it keeps no checksums of the array bytes (a
flipped byte in a stored chunk restores as a wrong value). Every save records a CRC-32 of each
array in the checkpoint's metadata (`meta["checksums"]`); a restore recomputes them and a
checkpoint that cannot be read or does not match is set aside (`<run dir>/corrupt/<step>`) and
the newest intact one is used instead, with a warning naming both.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from pipeline.config import ConfigError

log = logging.getLogger(__name__)


class CheckpointError(ConfigError):
    """A run directory whose checkpoints exist but cannot be used."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (a full disk, a read-only folder)."""


def checksums(tree: Any) -> dict[str, int]:
    """{array path: CRC-32 of its bytes} for every array of a pytree of host arrays."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): zlib.crc32(
            np.ascontiguousarray(x).view(np.uint8).reshape(-1)
        )
        for path, x in leaves
    }


def mismatches(tree: Any, expected: dict[str, int], prefix: str = "") -> list[str]:
    """The paths of `tree`'s arrays whose CRC-32 differs from the recorded one (an array the
    record lacks is not checked: a checkpoint written before checksums were kept)."""
    found = checksums(tree)
    return [prefix + n for n, crc in found.items() if expected.get(prefix + n, crc) != crc]


class Checkpointer:
    """Saves and restores `{"state": pytree, "meta": json}` under `<run dir>/checkpoints`."""

    def __init__(self, directory: str | Path, keep: int = 3, use_async: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=use_async, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.pending: int | None = None  # the step of the save that may still be running
        self.failed = False  # a write failed: already reported, not raised again at close

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start an asynchronous save; the next save (or `wait`) waits for it to finish.

        A write that fails (here or in the background, e.g. a full disk) raises
        `CheckpointWriteError` naming the step and the last complete checkpoint."""
        host_state = jax.tree.map(np.asarray, state)
        meta = {**meta, "checksums": checksums(host_state)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(host_state), meta=ocp.args.JsonSave(meta)
        )
        with _WriteGuard(self, self.pending):  # orbax waits for the previous save first
            self.manager.wait_until_finished()
        self.pending = step
        with _WriteGuard(self, step):
            self.manager.save(step, args=args, force=True)

    def restore(self, like: Any) -> tuple[Any, dict]:
        """Restore the newest intact checkpoint into the structure of `like` (arrays or shapes).

        A checkpoint that fails to read or whose arrays do not match their checksums is moved
        to `<run dir>/corrupt/<step>` (process 0) and the next older one is tried; a warning
        names both. None intact: `CheckpointError` naming each failure and `--fresh`."""
        target = jax.tree.map(lambda x: np.zeros(np.shape(x), x.dtype), like)
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
                    ),
                )
                bad = mismatches(restored.state, restored.meta.get("checksums", {}))
                if bad:
                    raise ValueError(f"checksum mismatch in {len(bad)} arrays, first {bad[0]}")
            except Exception as err:  # noqa: BLE001 - any failure means the same thing here
                reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                failures.append((step, reason))
                continue
            if failures:
                self._set_aside(failures, step)
            return restored.state, restored.meta
        raise CheckpointError(
            f"{self.directory}: no checkpoint can be restored ("
            + "; ".join(f"step {s}: {r}" for s, r in failures)
            + "); pass --fresh to start this run over, or use another run.dir"
        )

    def _set_aside(self, failures: list, used: int) -> None:
        corrupt = self.directory.parent / "corrupt"
        for step, reason in failures:
            log.warning(
                "checkpoint %d in %s is corrupt (%s); resuming from checkpoint %d; the "
                "corrupt one is moved to %s",
                step,
                self.directory,
                reason,
                used,
                corrupt / str(step),
            )
            if jax.process_index() == 0:
                corrupt.mkdir(exist_ok=True)
                shutil.rmtree(corrupt / str(step), ignore_errors=True)
                shutil.move(str(self.directory / str(step)), str(corrupt / str(step)))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("checkpoint_set_aside")
        self.manager.reload()

    def wait(self) -> None:
        with _WriteGuard(self, self.pending):
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            if not self.failed:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - a write that failed has been reported already
                if not self.failed:
                    raise


def _cause(err: Exception) -> str:
    """The operating system's reason for a failed write, however deep the library wrapped it:
    'No space left on device (errno 28)'."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror} (errno {err.errno})"
    found = re.search(r"([A-Z][\w ,'-]*?) \[os_error_code='?(\d+)'?\]", str(err))
    if found:
        return f"{found.group(1)} (errno {found.group(2)})"
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"


class _OrbaxWriteNoise(logging.Filter):
    """Drops the tracebacks orbax logs from its threads when a write fails: the exception
    reaches `Checkpointer`, which reports it in one line (`CheckpointWriteError`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname)


_WRITES_FAILED = []  # set once a checkpoint write has failed in this process


class _OrbaxTaskNoise(logging.Filter):
    """Drops asyncio's 'Task (or Future) exception was never retrieved' for orbax's other write
    tasks when a write fails (e.g. a full disk): the first failure is reported in one line, at
    exit the rest would follow it as tracebacks. A Future's record names no orbax source file,
    only the failed write (`...orbax-checkpoint-tmp...`, `OCDBT`): once a write has failed, every
    such record goes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if f"{os.sep}orbax{os.sep}" in message:
            return False
        return not (_WRITES_FAILED and "exception was never retrieved" in message)


logging.getLogger("absl").addFilter(_OrbaxWriteNoise())
logging.getLogger("asyncio").addFilter(_OrbaxTaskNoise())


def _quiet_closed_loop(hook):
    """`sys.unraisablehook` once a write has failed: orbax's write threads, finishing after the
    run stopped, call back into their closed event loop ('Event loop is closed', one traceback
    each, after the run's error line at exit: seen in the full-disk test); others go to `hook`."""

    def quiet(unraisable) -> None:
        err = unraisable.exc_value
        if not (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"):
            hook(unraisable)

    return quiet


class _WriteGuard:
    """Turns an error while writing checkpoint `step` into one `CheckpointWriteError`."""

    def __init__(self, ckpt: Checkpointer, step: int | None):
        self.ckpt, self.step = ckpt, step

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or isinstance(err, CheckpointError) or not isinstance(err, Exception):
            return False
        step, self.ckpt.failed = self.step, True
        if not _WRITES_FAILED:
            sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
        _WRITES_FAILED.append(step)
        # orbax renames a checkpoint's folder to its step only once it is complete
        folder = self.ckpt.directory
        names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
        complete = [int(n) for n in names if n.isdigit() and int(n) != step]
        last = max(complete) if complete else None
        # the incomplete write's folder goes: on a full disk it holds the room the run's
        # state.json ("failed") needs, and it could never be resumed from
        for name in names:
            if name == str(step) or name.startswith(f"{step}."):
                shutil.rmtree(folder / name, ignore_errors=True)
        raise CheckpointWriteError(
            f"checkpoint {step} could not be written to {self.ckpt.directory} ({_cause(err)}); "
            "the last complete "
            f"checkpoint is {'none' if last is None else f'step {last}'}: free space (or fix the "
            "folder), then rerun the same command to resume from it"
        ) from None


def read_params(directory: str | Path, like: Any) -> Any:
    """The `params` of the latest checkpoint under `directory`, restored on their own.

    Orbax's partial restore reads only the arrays named in the target: the optimizer state
    (twice the parameters' bytes under Adam) is never read, and no optimizer is built.
    `like` gives the structure, shapes and dtypes (arrays or `jax.ShapeDtypeStruct`s); the
    result holds host numpy arrays.
    """
    manager = ocp.CheckpointManager(Path(directory).absolute())
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"{directory} holds no complete checkpoint")
        target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)}
        restore_args = jax.tree.map(
            lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype), like
        )
        args = ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=target, restore_args={"params": restore_args}, partial_restore=True
            ),
            meta=ocp.args.JsonRestore(),
        )
        failures = []
        for step in steps:
            try:
                restored = manager.restore(step, args=args)
                params = restored.state["params"]
                bad = mismatches(params, restored.meta.get("checksums", {}), "params/")
                if bad:
                    raise ValueError(f"checksum mismatch in {len(bad)} arrays, first {bad[0]}")
            except Exception as err:  # noqa: BLE001 - any failure means the same thing here
                failures.append(f"{step} ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
                continue
            if failures:
                log.warning(
                    "%s: checkpoint %s cannot be used; read the parameters of checkpoint %d",
                    directory,
                    ", ".join(failures),
                    step,
                )
            return params
        raise CheckpointError(
            f"{directory}: the parameters of no checkpoint can be read: checkpoint "
            + "; ".join(failures)
        )
    finally:
        manager.close()


def has_checkpoints(directory: str | Path) -> bool:
    path = Path(directory)
    return path.is_dir() and any(p.name.isdigit() for p in path.iterdir())


def remove_checkpoints(directory: str | Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
