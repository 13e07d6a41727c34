"""Pre-training as a user runs it, in real processes: kill -9, SIGTERM, two-process runs.

Run: pytest -m slow tests/test_pretrain.py
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ROOT, restore_final_state

from pipeline.config import load_config
from pipeline.training.metrics import read_metrics

pytestmark = pytest.mark.slow
TINY = os.path.join(ROOT, "configs", "pretrain_tiny.yaml")


def _args(tmp_path, name, *overrides):
    return [
        f"run.dir={tmp_path / name}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "run.progress=false",
        *overrides,
    ]


def _start(args, devices=4, env=None):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        **(env or {}),
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "pretrain", "--config", TINY, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(args, **kw):
    proc = _start(args, **kw)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def test_cli_runs_and_reports(tmp_path):
    out = _run(_args(tmp_path, "run"))
    assert out.strip().endswith(f"run directory {tmp_path / 'run'}")
    assert "finished at step 40; final eval loss" in out
    losses = [loss for _, loss in _losses(tmp_path / "run")]
    assert losses[-1] < losses[0] - 1.0  # it learns


def _kill_during_a_write(tmp_path, name: str, args) -> bool:
    """Start a run, SIGKILL it while a checkpoint after the first is being written (orbax
    writes into a temporary folder, renamed when complete); False if no write was seen."""
    proc = _start(_args(tmp_path, name, *args))
    ckpt_dir = tmp_path / name / "checkpoints"
    deadline = time.time() + 120
    caught_writing = False
    while proc.poll() is None and time.time() < deadline:
        names = [p.name for p in ckpt_dir.iterdir()] if ckpt_dir.is_dir() else []
        if any(not n.isdigit() for n in names) and any(n.isdigit() for n in names):
            caught_writing = True
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return caught_writing


def test_kill_9_during_checkpoint_write_then_resume(tmp_path):
    common = [
        "train.steps=60",
        "train.checkpoint_every=3",
        "train.log_every=3",
        "train.eval_every=1000",
    ]
    _run(_args(tmp_path, "whole", *common))
    # a write takes milliseconds: try again (a fresh run each time) until the kill lands in one
    name = next(
        (f"killed{i}" for i in range(6) if _kill_during_a_write(tmp_path, f"killed{i}", common)),
        None,
    )
    assert name is not None, "six runs were never caught writing a checkpoint"
    _run(_args(tmp_path, name, *common))  # the same command resumes
    cfg = load_config(TINY, _args(tmp_path, "whole", *common))
    whole = restore_final_state(cfg)
    resumed = restore_final_state(load_config(TINY, _args(tmp_path, name, *common)))
    assert int(resumed["step"]) == 60
    jax.tree.map(np.testing.assert_array_equal, whole, resumed)
    assert _losses(tmp_path / "whole")[-1] == _losses(tmp_path / name)[-1]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    args = _args(
        tmp_path, "run", "train.steps=100000", "train.checkpoint_every=100000", "train.log_every=1"
    )
    proc = _start(args)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and len(_losses(tmp_path / "run")) < 3:
        time.sleep(0.05)
    assert metrics.is_file(), proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "interrupted (SIGTERM)" in out
    state = (tmp_path / "run" / "state.json").read_text()
    assert '"status": "interrupted (SIGTERM)"' in state
    steps = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and steps[0] >= 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("parallelism", ["pmap", "mesh"])
def test_two_processes_match_one_process_with_four_devices(tmp_path, parallelism):
    common = [
        "train.steps=10",
        "train.log_every=2",
        "train.eval_every=10",
        "train.checkpoint_every=5",
        f"train.parallelism={parallelism}",
        *(["train.mesh_data=2", "train.mesh_fsdp=2"] if parallelism == "mesh" else []),
    ]
    _run(_args(tmp_path, "one", *common), devices=4)
    port = _free_port()
    procs = [
        _start(
            _args(tmp_path, "two", *common),
            devices=2,
            env={
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(i),
            },
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    assert "finished at step 10" in outs[0][0] and "finished" not in outs[1][0]  # process 0 reports
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == [2, 4, 6, 8, 10]
    np.testing.assert_allclose([x for _, x in one], [x for _, x in two], atol=1e-5)
    assert Path(tmp_path / "two" / "checkpoints" / "10").is_dir()


def test_a_second_process_on_a_run_directory_is_refused_and_kill_9_frees_it(tmp_path):
    """`make pretrain` started twice: the second process stops at once with one line naming
    the first's pid and host, and touches nothing; after the first is killed with -9 the lock
    is gone (the OS dropped it) and the same command resumes the run."""
    common = ["train.steps=100000", "train.checkpoint_every=5", "train.eval_every=100000"]
    first = _start(_args(tmp_path, "run", *common))
    lock = tmp_path / "run" / ".lock"
    deadline = time.time() + 120
    while not (tmp_path / "run" / "checkpoints").is_dir() and time.time() < deadline:
        assert first.poll() is None, first.communicate()[1][-3000:]
        time.sleep(0.05)
    config = (tmp_path / "run" / "config.yaml").read_text()
    second = _start(_args(tmp_path, "run", "train.steps=3", "--fresh"))
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and f"process {first.pid} on {socket.gethostname()}" in line[0]
    assert first.poll() is None  # the first runs on, its files untouched (--fresh did nothing)
    assert (tmp_path / "run" / "config.yaml").read_text() == config
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert lock.is_file()  # the file stays; its lock went with the process
    _run(_args(tmp_path, "run", "train.steps=10", "train.checkpoint_every=5"))
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["status"] == "finished" and state["step"] == 10


def _tmpfs_allowed(tmp_path) -> bool:
    """Whether this machine lets a process mount a tmpfs in a mount namespace of its own."""
    mnt = tmp_path / "probe"
    mnt.mkdir()
    try:
        probe = subprocess.run(
            ["unshare", "-r", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt}"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def test_a_full_disk_stops_the_run_with_one_line_and_the_last_checkpoint_resumes(tmp_path):
    """A run directory on a tmpfs with room for one checkpoint and not two: the second write
    fails (ENOSPC), the run stops with one `error:` line naming the step, the cause and the last
    complete checkpoint; that checkpoint, copied to a disk with room, resumes the run, which
    ends bit-identical to an uninterrupted one."""
    if not _tmpfs_allowed(tmp_path):
        pytest.skip(
            "no mount namespaces here (unshare -r -m); test_train covers an injected ENOSPC"
        )
    common = ["train.steps=9", "train.checkpoint_every=3", "train.eval_every=1000"]
    _run(_args(tmp_path, "whole", *common))
    one = sum(
        f.stat().st_size for f in (tmp_path / "whole/checkpoints/3").rglob("*") if f.is_file()
    )
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    args = " ".join(_args(tmp_path, "unused", *common)[1:])  # run.dir is on the tmpfs
    script = (
        f"mount -t tmpfs -o size={int(one * 1.5) + 256 * 1024} tmpfs {mnt} && "
        f"{sys.executable} -m pipeline pretrain --config {TINY} run.dir={mnt}/run {args}; "
        f"rc=$?; cp -a {mnt}/run {out}/run; exit $rc"
    )
    flags = "--xla_force_host_platform_device_count=4"  # as _start: the same run as "whole"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    full = subprocess.run(
        ["unshare", "-r", "-m", "sh", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert full.returncode == 2, full.stderr[-3000:]
    errors = [x for x in full.stderr.splitlines() if x.startswith("error:")]
    # the last line; no traceback through our code (orbax's threads may print their own)
    assert len(errors) == 1 and full.stderr.splitlines()[-1] == errors[0], full.stderr[-3000:]
    assert f"{os.sep}pipeline{os.sep}" not in full.stderr, full.stderr[-3000:]
    assert "checkpoint 6 could not be written" in errors[0]
    assert (
        "No space left on device" in errors[0] and "last complete checkpoint is step 3" in errors[0]
    )
    state = json.loads((out / "run" / "state.json").read_text())
    assert state["status"] == "failed"
    _run([f"run.dir={out / 'run'}", *_args(tmp_path, "unused", *common)[1:]])
    cfg = lambda name: load_config(TINY, [f"run.dir={name}", *common])  # noqa: E731
    whole, resumed = (
        restore_final_state(cfg(tmp_path / "whole")),
        restore_final_state(cfg(out / "run")),
    )
    assert int(resumed["step"]) == 9
    jax.tree.map(np.testing.assert_array_equal, whole, resumed)


def test_three_kill_9s_at_random_moments_then_resume_give_the_uninterrupted_losses(tmp_path):
    """kill -9 three times at random moments (a seeded draw: before, during or after a
    checkpoint write), resuming with the same command each time: every logged loss and the
    final state are bit-identical to an uninterrupted run."""
    common = ["train.steps=60", "train.checkpoint_every=4", "train.log_every=2"]
    common += ["train.eval_every=1000"]
    _run(_args(tmp_path, "whole", *common))
    rng, reached = np.random.default_rng(3), []
    for _ in range(3):
        proc = _start(_args(tmp_path, "killed", *common))
        deadline, before = time.time() + 120, len(_losses(tmp_path / "killed"))
        while len(_losses(tmp_path / "killed")) <= before and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.01)  # until this process has trained a step
        time.sleep(float(rng.uniform(0.0, 1.0)))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
        reached.append(max((s for s, _ in _losses(tmp_path / "killed")), default=0))
    assert reached[-1] > reached[0], reached  # the kills fell at different points of the run
    _run(_args(tmp_path, "killed", *common))
    whole, killed = _losses(tmp_path / "whole"), _losses(tmp_path / "killed")
    # a resumed run drops what was logged after its checkpoint and logs those steps again
    assert killed == whole and len(whole) == 30
    cfg = lambda name: load_config(TINY, _args(tmp_path, name, *common))  # noqa: E731
    jax.tree.map(
        np.testing.assert_array_equal,
        restore_final_state(cfg("whole")),
        restore_final_state(cfg("killed")),
    )
