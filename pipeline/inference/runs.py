"""Reading and writing the model held by a run directory, for inference.

A run directory holds `config.yaml`, `tokenizer.json` and its final weights
(`model/model.safetensors`, written when a training stage finishes, by `merge` and by
`import-hf`), or, while a run is unfinished, training checkpoints (`checkpoints/`; the latest
is used). Loading reads parameters only: `model/`, else the `params` item of the latest
checkpoint restored on its own, never the optimizer state. LoRA runs hold adapters (PEFT
files) on top of the run named by `init.from`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from pipeline.checkpoint import has_checkpoints, read_params
from pipeline.config import Config, ConfigError, dump_config, load_config
from pipeline.lora import ADAPTER_CONFIG, load_adapter, merge
from pipeline.model import Transformer, abstract_model
from pipeline.quantize import quantize_model
from pipeline.tokenizer import Tokenizer
from pipeline.weights import load_state, save_state

MODEL_DIR = "model"
WEIGHTS_FILE = "model.safetensors"


def load_run_config(run_dir: str | Path, key: str = "init.from") -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{key}: {run_dir} is not a run directory (no config.yaml)")
    return load_config(path)


def load_model(
    run_dir: str | Path, key: str = "init.from", host: bool = False
) -> tuple[Config, Transformer, Tokenizer]:
    """The model of a run: its final weights, or its latest checkpoint's, plus any adapter.

    `host`: keep the weights as host arrays (training places each one straight onto its own
    devices and sharding: a model larger than one device never has to fit on the first);
    otherwise they go to the default device, ready for inference.
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, key)
    if (run_dir / ADAPTER_CONFIG).is_file() and cfg.init.from_run:
        base = cfg.init.from_run
        _, model, tokenizer = load_model(base, f"{run_dir}/config.yaml init.from", host)
        # a base that is itself a LoRA run (e.g. preference tuning after a LoRA fine-tune):
        # its adapters folded in first, then this run's
        return cfg, load_adapter(merge(model), run_dir), tokenizer
    # The structure alone (nothing allocated), then the stored arrays put in its place.
    graphdef, shapes = nnx.split(abstract_model(cfg.model))
    params = load_params(run_dir, shapes, key, place=None if host else jnp.asarray)
    model = nnx.merge(graphdef, params)
    return cfg, model, Tokenizer.load(run_dir)


def load_tokenizer(run_dir: str | Path, key: str = "--run") -> Tokenizer:
    """The tokenizer of a run alone (a LoRA run's is its base's)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, key)
    if (run_dir / ADAPTER_CONFIG).is_file() and cfg.init.from_run:
        return load_tokenizer(cfg.init.from_run, f"{run_dir}/config.yaml init.from")
    return Tokenizer.load(run_dir)


@dataclass
class Loaded:
    """A run ready for inference: its config, model (quantised if asked), tokenizer, draft."""

    cfg: Config
    model: Transformer
    tokenizer: Tokenizer
    draft: Transformer | None = None


def load_for_inference(
    run_dir: str | Path,
    quantize: str | None = None,
    draft: str | Path | None = None,
    key: str = "--run",
) -> Loaded:
    """The one way generation, serving, export and benchmarks load a run.

    The run's weights (plus its LoRA adapter, for a LoRA run), quantised in place when
    `quantize` names a mode ("none" and None leave float weights), and a draft model for
    speculative decoding, which must share the run's tokenizer.
    """
    cfg, model, tokenizer = load_model(run_dir, key)
    if quantize and quantize != "none":
        quantize_model(model, quantize, embeddings=True)
    draft_model = None
    if draft:
        _, draft_model, draft_tokenizer = load_model(draft, key="--draft")
        if draft_tokenizer.fingerprint() != tokenizer.fingerprint():
            raise ConfigError(f"--draft: {draft} has another tokenizer than {key} {run_dir}")
    return Loaded(cfg, model, tokenizer, draft_model)


def load_params(run_dir: Path, like, key: str = "init.from", place=None):
    """A run's parameters shaped like `like`: `model/`, else the last checkpoint. Host arrays,
    or each array passed to `place` (e.g. `jnp.asarray`) as it is read."""
    weights = run_dir / MODEL_DIR / WEIGHTS_FILE
    if weights.is_file():
        return load_state(weights, like, place)
    params = _load_stored(run_dir, like, key)
    return params if place is None else jax.tree.map(place, params)


def _load_stored(run_dir: Path, like, key: str):
    """Host arrays from an earlier version's orbax `model/`, else the latest checkpoint."""
    if (run_dir / MODEL_DIR).is_dir():  # written by an earlier version: an orbax checkpoint
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore((run_dir / MODEL_DIR).absolute(), target)
    checkpoints = run_dir / "checkpoints"
    if not has_checkpoints(checkpoints):
        raise ConfigError(f"{key}: {run_dir} has no checkpoint and no final model yet")
    return read_params(checkpoints, like)


def save_params(params, run_dir: str | Path) -> Path:
    """Write `model/model.safetensors` (the parameters alone, our names) into a run directory,
    a tensor at a time (an earlier `model/` is replaced)."""
    out = Path(run_dir).absolute() / MODEL_DIR
    if out.is_dir() and not (out / WEIGHTS_FILE).is_file():
        shutil.rmtree(out)  # an earlier version's orbax checkpoint
    save_state(params, out / WEIGHTS_FILE)
    return out


def save_model(cfg: Config, model: Transformer, tokenizer: Tokenizer, out: str | Path) -> Path:
    """Write a run directory holding final weights only (`model/`), loadable by `load_model`."""
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    tokenizer.save(out)
    save_params(nnx.state(model), out)
    return out
