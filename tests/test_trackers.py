"""Experiment trackers (`run.trackers`): Weights & Biases offline, MLflow's file store, a
missing library, sweeps grouped. Real libraries, no network.

Run: pytest tests/test_trackers.py
"""

import json
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, with_overrides
from pipeline.training.loop import run_training
from pipeline.training.metrics import read_metrics
from pipeline.training.pretrain import build_stage


def _cfg(tiny_config, tmp_path, trackers, **run):
    return with_overrides(
        tiny_config,
        train={
            "steps": 6,
            "log_every": 2,
            "eval_every": 3,
            "eval_batches": 1,
            "checkpoint_every": 3,
        },
        run={
            "progress": False,
            "dir": str(tmp_path / "run"),
            "name": "tracked",
            "trackers": trackers,
            **run,
        },
    )


def _train(cfg, **train):
    cfg = with_overrides(cfg, train=train) if train else cfg
    return run_training(cfg, build_stage(cfg))


@pytest.mark.e2e
def test_wandb_offline_run_writes_its_files_and_a_resumed_run_keeps_its_id(
    tiny_config, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")  # from the environment, as users set it
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(tiny_config, tmp_path, ["jsonl", "wandb"], tags=["smoke"], group="g1")
    _train(cfg, stop_at=3)
    run_dir = Path(cfg.run.dir)
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    _train(cfg)  # resumed to the end
    assert json.loads((run_dir / "trackers.json").read_text())["wandb"] == run_id
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(d.name.endswith(run_id) for d in offline)
    for d in offline:  # the records wandb sync uploads: config, environment, group, metrics
        data = (d / f"run-{run_id}.wandb").read_bytes()
        for text in (b"embed_dim", b"environment", b"g1", b"smoke", b"eval_loss"):
            assert text in data, text
    assert not (run_dir / "tensorboard").exists()  # not asked for
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [2, 3, 4, 6]  # 3: the stop


@pytest.mark.e2e
def test_mlflow_file_store_holds_params_and_metric_history_across_a_resume(tiny_config, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    cfg = _cfg(tiny_config, tmp_path, ["mlflow"], mlflow_uri=uri, project="exp", tags=["a"])
    _train(cfg, stop_at=3)
    run_id = json.loads((Path(cfg.run.dir) / "trackers.json").read_text())["mlflow"]
    _train(cfg)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["model.embed_dim"] == str(tiny_config.model.embed_dim)
    assert run.data.params["optimizer.name"] == "adamw" and run.data.tags["a"] == "true"
    history = client.get_metric_history(run_id, "loss")
    expected = {r["step"]: r["loss"] for r in read_metrics(cfg.run.dir) if "loss" in r}
    assert {m.step for m in history} == set(expected) == {2, 3, 4, 6}
    for m in history:
        assert m.value == pytest.approx(expected[m.step])
    assert {m.step for m in client.get_metric_history(run_id, "eval_loss")} == {3, 6}
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "environment.json"} <= artifacts
    assert client.get_experiment(run.info.experiment_id).name == "exp"


def test_a_missing_tracker_library_is_one_clear_error(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import fails
    cfg = _cfg(tiny_config, tmp_path, ["jsonl", "wandb"])
    with pytest.raises(
        ConfigError, match=r"run.trackers: wandb needs the wandb package.*\[trackers\]"
    ):
        _train(cfg)
    with pytest.raises(ConfigError, match="run.trackers.*one of"):
        with_overrides(tiny_config, run={"trackers": ["jsonl", "neptune"]})


@pytest.mark.e2e
def test_a_sweep_groups_its_points_under_one_mlflow_parent_run(tmp_path):
    from conftest import ROOT
    from mlflow.tracking import MlflowClient

    from pipeline.experiments import sweep

    uri = (tmp_path / "mlruns").as_uri()
    overrides = [
        f"data.cache_dir={tmp_path / 'cache'}",
        "run.trackers=[jsonl,mlflow]",
        f"run.mlflow_uri={uri}",
        "run.progress=false",
        "train.steps=2",
        "train.eval_every=2",
        "train.checkpoint_every=2",
    ]
    dirs = sweep(
        f"{ROOT}/configs/tiny.yaml",
        ["optimizer.lr=1e-3,3e-3"],
        overrides,
        "sw",
        str(tmp_path),
        log=lambda _: None,
        stage="pretrain",
    )
    client = MlflowClient(uri)
    ids = [json.loads((d / "trackers.json").read_text())["mlflow"] for d in dirs]
    parents = {client.get_run(i).data.tags["mlflow.parentRunId"] for i in ids}
    assert len(parents) == 1
    assert client.get_run(parents.pop()).info.run_name == "sw"
