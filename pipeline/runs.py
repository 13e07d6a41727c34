"""Reading and writing the model held by a run directory.

A run directory holds `config.yaml`, `tokenizer.json` and either training checkpoints
(`checkpoints/`, the latest is used) or final weights alone (`model/`, written by `merge` and by
full fine-tuning). LoRA runs hold adapters on top of the run named by their `init.from`.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from pipeline.checkpoint import Checkpointer
from pipeline.config import Config, ConfigError, dump_config, load_config
from pipeline.lora import ADAPTER_CONFIG, load_adapter
from pipeline.model import Transformer, create_model
from pipeline.tokenizer import Tokenizer

MODEL_DIR = "model"


def load_run_config(run_dir: str | Path, key: str = "init.from") -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{key}: {run_dir} is not a run directory (no config.yaml)")
    return load_config(path)


def load_model(
    run_dir: str | Path, key: str = "init.from"
) -> tuple[Config, Transformer, Tokenizer]:
    """The model of a run: its final weights, or its latest checkpoint, plus any adapter."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, key)
    if (run_dir / ADAPTER_CONFIG).is_file() and cfg.init.from_run:
        _, model, tokenizer = load_model(cfg.init.from_run, f"{run_dir}/config.yaml init.from")
        return cfg, load_adapter(model, run_dir), tokenizer
    model = create_model(cfg.model, seed=cfg.train.seed)
    graphdef, params = nnx.split(model)
    nnx.update(model, _load_params(run_dir, cfg, params, key))
    return cfg, model, Tokenizer.load(run_dir)


def _load_params(run_dir: Path, cfg: Config, params, key: str):
    if (run_dir / MODEL_DIR).is_dir():
        target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), params)
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore((run_dir / MODEL_DIR).absolute(), target)
    checkpoints = Checkpointer(run_dir / "checkpoints")
    try:
        if checkpoints.latest_step() is None:
            raise ConfigError(f"{key}: {run_dir} has no checkpoint and no final model yet")
        from pipeline.train import make_optimizer

        tx, _ = make_optimizer(cfg.optimizer, cfg.train.steps, params)
        like = {
            "step": np.zeros((), np.int32),
            "params": params,
            "opt_state": tx.init(params),
            "rng": np.zeros((2,), np.uint32),
            "frozen": {},
        }
        state, _ = checkpoints.restore(like)
        return state["params"]
    finally:
        checkpoints.close()


def save_model(cfg: Config, model: Transformer, tokenizer: Tokenizer, out: str | Path) -> Path:
    """Write a run directory holding final weights only (`model/`), loadable by `load_model`."""
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    tokenizer.save(out)
    params = jax.tree.map(np.asarray, nnx.state(model))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out / MODEL_DIR, params, force=True)
    return out
