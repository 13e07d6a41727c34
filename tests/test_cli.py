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
