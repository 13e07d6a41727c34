"""Sweeps, the run table and run comparison on real tiny runs.

Run: pytest tests/test_experiments.py
"""

import json
import os

import pytest
from conftest import ROOT

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.experiments import config_differences, find_runs, summarize

pytestmark = pytest.mark.e2e  # whole stages, subprocesses or real servers

CONFIG = os.path.join(ROOT, "configs", "pretrain_tiny.yaml")


def _common(tmp_path) -> list[str]:
    return [
        f"data.cache_dir={tmp_path / 'cache'}",
        "run.progress=false",
        "train.steps=4",
        "train.eval_every=4",
        "train.checkpoint_every=2",
        "train.eval_batches=1",
        "train.num_devices=1",
    ]


def test_a_sweep_runs_each_point_once_and_resumes_an_interrupted_one(tmp_path, capsys):
    root = tmp_path / "runs"
    grid = ["--grid", "optimizer.lr=1e-3,3e-3", "model.num_layers=1,2"]
    args = ["sweep", "--config", CONFIG, "--name", "s", "--root", str(root), *_common(tmp_path)]
    # one point interrupted at step 2 beforehand (as SIGTERM or a scheduler limit leaves it)
    first = root / "s-lr=1e-3-num_layers=1"
    assert (
        main([*args, "train.stop_at=2", "--grid", "optimizer.lr=1e-3", "model.num_layers=1"]) == 0
    )
    assert summarize(first)["status"] == "interrupted-resumable"
    capsys.readouterr()
    assert main([*args, *grid]) == 0
    out = capsys.readouterr().out
    assert f"{first}: resuming" in out
    dirs = sorted(p.name for p in find_runs(root))
    assert dirs == sorted(f"s-lr={lr}-num_layers={n}" for lr in ("1e-3", "3e-3") for n in (1, 2))
    for name in dirs:
        cfg = load_config(root / name / "config.yaml")
        assert f"lr={cfg.optimizer.lr:g}".replace("0.001", "1e-3").replace("0.003", "3e-3") in name
        assert f"num_layers={cfg.model.num_layers}" in name
        row = summarize(root / name)
        assert row["status"] == "finished" and row["steps"] == 4 and row["eval_loss"] > 0
    # the resumed point continued from its checkpoint: its metrics hold steps 1..4 once each
    steps = [
        r["step"]
        for r in map(json.loads, (first / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 4
    assert (root / "s.sweep" / "summary.txt").is_file() and (
        root / "s.sweep" / "compare.png"
    ).is_file()
    assert "s-lr=3e-3-num_layers=2" in out  # the summary table
    env = json.loads((first / "environment.json").read_text())
    assert {"git_commit", "jax", "flax", "device_kind", "device_count", "seed"} <= set(env)
    # again: nothing new runs
    mtimes = {d: (root / d / "metrics.jsonl").stat().st_mtime for d in dirs}
    assert main([*args, *grid]) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 4
    assert mtimes == {d: (root / d / "metrics.jsonl").stat().st_mtime for d in dirs}

    # compare: exactly the keys that differ, and a PNG
    pair = [str(root / "s-lr=1e-3-num_layers=1"), str(root / "s-lr=3e-3-num_layers=2")]
    assert set(config_differences(pair)) == {"optimizer.lr", "model.num_layers"}
    png = tmp_path / "cmp.png"
    assert main(["compare", *pair, "--out", str(png), "--x", "tokens", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["differences"]["model.num_layers"] == [1, 2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a corrupt run directory is listed with its problem
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text("model: [unclosed")
    assert main(["runs", str(root), "--sort", "eval_loss"]) == 0
    table = capsys.readouterr().out
    assert "broken" in table and "not valid YAML" in table
    assert main(["runs", str(root), "--json"]) == 0
    rows = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["broken"]["problem"] and len(rows) == 5
