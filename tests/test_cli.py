"""`pipeline info` end to end, as a user runs it. Run: pytest tests/test_cli.py"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_info_prints_config_size_and_data(tmp_path):
    proc = _run("info", "--config", "configs/tiny.yaml", f"data.cache_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "num_layers: 2" in out and "parameters:" in out and "flops per token:" in out
    assert "documents:         40 " in out and "tokens:            train" in out


def test_info_json(tmp_path):
    proc = _run(
        "info",
        "--config",
        "configs/tiny.yaml",
        "--json",
        "model.num_layers=3",
        f"data.cache_dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["config"]["model"]["num_layers"] == 3
    assert info["params"] > 0 and info["flops_per_token"] > 6 * info["params"] * 0.5
    assert info["data"]["train_tokens"] > 0 and info["data"]["val_docs"] >= 1


def test_missing_config_file_is_one_line():
    proc = _run("info", "--config", "configs/nope.yaml")
    assert (
        proc.returncode == 2 and proc.stderr == "error: config file not found: configs/nope.yaml\n"
    )


def test_finetune_without_a_base_run_is_one_line(tmp_path):
    proc = _run(
        "finetune",
        "--config",
        "configs/finetune_tiny.yaml",
        f"init.from={tmp_path / 'missing'}",
        f"run.dir={tmp_path / 'ft'}",
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: init.from:") and "not a run directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_export_of_a_run_being_trained_is_one_line_and_readers_share(tmp_path):
    """A training process holds its run exclusively; `pipeline export` / `export-hf` hold it
    shared: refused (one line) while a trainer holds it, many at once otherwise, and a trainer
    cannot start under a reader."""
    import pytest

    from pipeline.runtime import RunDirInUseError, run_dir_lock

    run = tmp_path / "run"
    with run_dir_lock(run):  # this process "trains" it
        proc = _run("export", "--run", str(run), "--out", str(tmp_path / "x.zip"))
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert f"process {os.getpid()}" in proc.stderr and "export it when it stops" in proc.stderr
        proc = _run("export-hf", str(run), "--out", str(tmp_path / "hf"))
        assert proc.returncode == 2 and "export it when it stops" in proc.stderr
    with (
        run_dir_lock(run, shared=True),
        run_dir_lock(run, shared=True),  # two readers at once
        pytest.raises(RunDirInUseError, match="an export reading it"),
        run_dir_lock(run),
    ):
        pass
    with run_dir_lock(run):  # all released
        pass


def test_bench_refuses_the_options_its_verb_does_not_read():
    """Each bench verb names an option it would ignore (one `error:` line, nothing run)."""
    for args, named in (
        (("bench", "quantize", "--run", "r", "--steps", "3"), "--steps"),
        (("bench", "generate", "--steps", "3"), "--steps"),
        (("bench", "serve", "--requests", "10"), "--requests"),
        (("bench", "distill", "--run", "r", "model.num_layers=2"), "key=value overrides"),
        (("bench", "soak", "--cases", "32"), "--cases"),
    ):
        proc = _run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith(f"error: bench {args[1]} does not use {named}"), proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
