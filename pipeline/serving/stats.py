"""Where the engine loop's time goes: the host's own work, the time it waits for the device, and
the device's time per decode step.

An engine iteration admits requests, runs a prefill call and dispatches a decode step, and
delivers the previous step's tokens (detokenised and streamed by the callers' callbacks). Its
wall time splits into the time the host was blocked on the device's results (`wait`) and the
rest (`host`): with a fast device the host is what limits the server, and these figures say
by how much. The device time of a decode step is sampled: one step in `SAMPLE_EVERY` runs alone
(the previous step delivered first, the host blocking on its result), so its wall time is the
device's (with the dispatch); the other steps overlap the host's work and cannot be timed
without costing that overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

SAMPLE_EVERY = 64  # decode steps between two timed alone


@dataclass
class LoopStats:
    """Running totals since the engine started (read them with `snapshot`, compare two with
    `per_iteration`)."""

    iterations: int = 0
    busy_s: float = 0.0  # wall time of the iterations (waiting for work excluded)
    wait_s: float = 0.0  # of which the host was blocked on the device's results
    tokens: int = 0  # tokens delivered
    steps: int = 0  # decode calls dispatched
    steps_run: int = 0  # decode steps those calls ran (a call runs one or several)
    row_steps: int = 0  # live rows x steps over those calls: the batch the decode steps ran
    prefills: int = 0  # prefill calls
    timed_steps: int = 0  # decode steps timed alone
    timed_s: float = 0.0  # their wall time

    def snapshot(self) -> dict:
        return dict(vars(self))  # (asdict copies deeply: slower, and the fields are numbers)


def per_iteration(before: dict, after: dict) -> dict:
    """The figures of the iterations between two snapshots: milliseconds of host work and of
    waiting per iteration, tokens per iteration, the device's milliseconds per decode step
    (sampled; None when no step was timed), and the host's share of the busy time."""
    d = {k: after[k] - before[k] for k in after}
    n = d["iterations"]
    per = lambda x: x / n if n else 0.0  # noqa: E731
    host = d["busy_s"] - d["wait_s"]
    return {
        "engine_iterations": n,
        "engine_host_ms_per_iteration": per(host) * 1e3,
        "engine_wait_ms_per_iteration": per(d["wait_s"]) * 1e3,
        "engine_tokens_per_iteration": per(d["tokens"]),
        "engine_device_ms_per_step": (
            d["timed_s"] / d["timed_steps"] * 1e3 if d["timed_steps"] else None
        ),
        "engine_host_share": host / d["busy_s"] if d["busy_s"] else 0.0,
        # the running requests a decode step advanced, on average (the batch's occupancy)
        "engine_rows_per_step": (d["row_steps"] / d["steps_run"] if d["steps_run"] else None),
        "engine_prefills_per_iteration": per(d["prefills"]),
    }
