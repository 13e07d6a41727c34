"""Starting the engine core process (`core.py`), from a module that imports nothing heavy:
`pipeline serve` starts the engine's process first, so that it imports JAX and loads the model
while the server's process imports its HTTP stack and reads the tokenizer (on two cores, in
parallel, instead of one after the other)."""

from __future__ import annotations

import logging
import multiprocessing


def _core(*args) -> None:
    from pipeline.serving.core import core_main

    core_main(*args)


def spawn_engine(run_dir, cfg, adapter_runs: dict | None = None, background: bool = True):
    """The engine core process, started on `run_dir` (or a ModelConfig: random weights) with
    the serve config `cfg` (its compilation cache included): (our end of its pipe, the
    process). `core.connect` waits for it to be ready."""
    context = multiprocessing.get_context("spawn")  # never fork a process that may run XLA
    ours, theirs = context.Pipe()
    level = logging.getLogger("pipeline").getEffectiveLevel()
    process = context.Process(
        target=_core,
        args=(theirs, run_dir, cfg, adapter_runs, level, background),
        name="engine-core",
        daemon=True,
    )
    process.start()
    theirs.close()
    return ours, process
