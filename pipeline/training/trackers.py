"""Where a run's metrics go besides metrics.jsonl (always written): `run.trackers`.

- `tensorboard`: event files in RUN/tensorboard (tensorboardX).
- `wandb`: a Weights & Biases run (the `wandb` library, the `trackers` extra) named run.name in
  run.project / run.entity with run.tags and run.group; its mode from run.wandb_mode, else
  WANDB_MODE, else wandb's own default (offline needs no network: `wandb sync RUN/wandb/...`
  uploads later). Its files live in RUN/wandb.
- `mlflow`: an MLflow run (`mlflow-skinny`, the same extra) in the experiment run.project at
  run.mlflow_uri; by default a file store in ./mlruns (MLflow 3 keeps that backend in
  maintenance mode and asks for MLFLOW_ALLOW_FILE_STORE, which is set for it here; a server,
  `mlflow server --backend-store-uri sqlite:///mlflow.db`, takes run.mlflow_uri=http://...).
  A run with run.group is the child of a parent run of that name (one per sweep).

Both get the resolved config (W&B's config, MLflow's params, flattened) and environment.json,
and their run ids are kept in RUN/trackers.json, so a resumed run continues the same W&B and
MLflow runs. A tracker whose library is missing is one ConfigError naming the extra.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

from pipeline.config import Config, flat_keys, optional_import

TRACKERS_FILE = "trackers.json"
MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value


def open_trackers(cfg: Config, run_dir: Path) -> list:
    """The trackers run.trackers names, opened (jsonl is the metrics logger's own)."""
    opened = []
    try:
        for name in cfg.run.trackers:
            if name == "tensorboard":
                opened.append(TensorBoard(run_dir))
            elif name == "wandb":
                opened.append(WandB(cfg, run_dir))
            elif name == "mlflow":
                opened.append(MLflow(cfg, run_dir))
    except BaseException:
        for tracker in opened:
            tracker.close("failed")
        raise
    return opened


def _ids(run_dir: Path) -> dict:
    path = run_dir / TRACKERS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _keep_id(run_dir: Path, tracker: str, run_id: str) -> None:
    (run_dir / TRACKERS_FILE).write_text(json.dumps({**_ids(run_dir), tracker: run_id}))


def _environment(run_dir: Path) -> dict:
    path = run_dir / "environment.json"
    return json.loads(path.read_text()) if path.is_file() else {}


class TensorBoard:
    def __init__(self, run_dir: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, scalars: dict) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self, status: str) -> None:
        self.writer.close()


class WandB:
    def __init__(self, cfg: Config, run_dir: Path):
        wandb = optional_import("wandb", "run.trackers: wandb", "trackers")
        r = cfg.run
        run_id = _ids(run_dir).get("wandb") or secrets.token_hex(4)  # W&B: 8 characters
        self.run = wandb.init(
            project=r.project,
            entity=r.entity,
            name=r.name,
            group=r.group,
            tags=list(r.tags),
            id=run_id,
            resume="allow",  # the same id again: the same run, continued
            dir=str(run_dir),
            mode=r.wandb_mode,
            config={**cfg.to_dict(), "environment": _environment(run_dir)},
            reinit="create_new",  # runs one after another in a process (wandb 0.19.10+)
        )
        _keep_id(run_dir, "wandb", run_id)

    def log(self, step: int, scalars: dict) -> None:
        self.run.log(scalars, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status != "failed" else 1)


class MLflow:
    def __init__(self, cfg: Config, run_dir: Path):
        optional_import("mlflow", "run.trackers: mlflow", "trackers")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        r = cfg.run
        uri = r.mlflow_uri or (Path.cwd() / "mlruns").as_uri()
        if uri.startswith("file:"):  # MLflow 3's file store: kept, in maintenance mode
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(r.project)
        exp_id = experiment.experiment_id if experiment else client.create_experiment(r.project)
        self.run_id = _ids(run_dir).get("mlflow")
        if self.run_id:  # resumed: the same run, running again
            client.update_run(self.run_id, status="RUNNING")
            return
        tags = {tag: "true" for tag in r.tags}
        if r.group:
            tags["mlflow.parentRunId"] = self._parent(exp_id, r.group)
        self.run_id = client.create_run(exp_id, run_name=r.name, tags=tags).info.run_id
        _keep_id(run_dir, "mlflow", self.run_id)
        params = [
            Param(key, str(value)[:MLFLOW_PARAM_CHARS])
            for key, value in sorted(flat_keys(cfg.to_dict()).items())
        ]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 per batch
            client.log_batch(self.run_id, params=params[start : start + 100])
        for name in ("config.yaml", "environment.json"):
            if (run_dir / name).is_file():
                client.log_artifact(self.run_id, str(run_dir / name))

    def _parent(self, exp_id: str, group: str) -> str:
        """The id of the parent run named `group` (a sweep's), made on first use."""
        found = self.client.search_runs(
            [exp_id], filter_string=f"tags.`pipeline.group` = '{group}'", max_results=1
        )
        if found:
            return found[0].info.run_id
        parent = self.client.create_run(exp_id, run_name=group, tags={"pipeline.group": group})
        self.client.set_terminated(parent.info.run_id)
        return parent.info.run_id

    def log(self, step: int, scalars: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str) -> None:
        state = {"finished": "FINISHED", "failed": "FAILED"}.get(status, "KILLED")
        self.client.set_terminated(self.run_id, status=state)
