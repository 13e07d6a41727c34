"""Shared fixtures: 4 simulated CPU devices (set before jax is imported) and a tiny config.

Run: make test   (or .venv/bin/pytest -q tests/)
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, shared by the pytest-xdist workers and the
# subprocesses the tests start (they inherit this environment): the same tiny programs compile
# in many of them (test_pretrain.py + test_cli.py on 2 cores: 235 -> 185 s). Set
# JAX_COMPILATION_CACHE_DIR to keep one across sessions.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _compilation_cache = tempfile.mkdtemp(prefix="pipeline-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _compilation_cache
    atexit.register(shutil.rmtree, _compilation_cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from pipeline.config import Config, load_config  # noqa: E402

# Tests compile many small programs; skipping XLA's optimisation passes makes that much faster.
jax.config.update("jax_disable_most_optimizations", True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def optimized():
    """XLA's optimisation passes back on for one test: for the tests whose time goes into
    running programs (long training chains), not into compiling them."""
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture
def tiny_config(tmp_path) -> Config:
    """configs/tiny.yaml with its data cache and run directory inside the test's temp dir."""
    return load_config(
        os.path.join(ROOT, "configs", "tiny.yaml"),
        [f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={tmp_path / 'run'}"],
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One briefly pre-trained tiny model (10 steps of pretrain_tiny), built once per session
    and shared by the tests that need a trained run: treat it as read-only."""
    from pipeline.training.pretrain import pretrain

    tmp = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config(
        os.path.join(ROOT, "configs", "pretrain_tiny.yaml"),
        [
            f"run.dir={tmp / 'run'}",
            f"data.cache_dir={tmp / 'cache'}",
            "train.steps=10",
            "run.progress=false",
        ],
    )
    pretrain(cfg)
    return tmp / "run"


_FORWARDS: dict = {}


def full_logits(model, rows: list[list[int]]) -> list[np.ndarray]:
    """The model's full forward over each row of token ids: float32 logits (len(row), V) each,
    in one compiled call over the rows right-padded to a shared power-of-two length (a causal
    model: what follows a position changes none of its logits). The reference computation of
    the tests that check served numbers; eager calls cost seconds each."""
    graphdef, state = nnx.split(model)
    if graphdef not in _FORWARDS:
        _FORWARDS[graphdef] = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
    width = max(16, 1 << (max(map(len, rows)) - 1).bit_length())
    tokens = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    logits = np.asarray(_FORWARDS[graphdef](state, tokens), np.float32)
    return [logits[i, : len(row)] for i, row in enumerate(rows)]


def restore_final_state(cfg: Config, stage=None) -> dict:
    """The latest checkpointed training state of the run `cfg` describes (its `stage`; default:
    pre-training's)."""
    from pipeline.checkpoint import Checkpointer
    from pipeline.training.pretrain import build_stage
    from pipeline.training.train import create_trainer

    stage = stage or build_stage(cfg)
    checkpointer = Checkpointer(f"{cfg.run.dir}/checkpoints")
    state, _ = checkpointer.restore(create_trainer(stage, cfg).state)
    checkpointer.close()
    return state


def make_tiny_runs(tmp_path, overrides: tuple[str, ...] = ()) -> tuple[str, str]:
    """A 2-step pretrain_tiny run and a 2-step LoRA fine-tune of it: (base dir, LoRA dir)."""
    from pipeline.training.finetune import finetune
    from pipeline.training.pretrain import pretrain

    common = [
        f"data.cache_dir={tmp_path / 'cache'}",
        "run.progress=false",
        "train.steps=2",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "train.eval_batches=1",
        *overrides,
    ]
    base, lora = str(tmp_path / "base"), str(tmp_path / "ft")
    pretrain(
        load_config(
            os.path.join(ROOT, "configs", "pretrain_tiny.yaml"), [f"run.dir={base}", *common]
        )
    )
    finetune(
        load_config(
            os.path.join(ROOT, "configs", "finetune_tiny.yaml"),
            [f"run.dir={lora}", f"init.from={base}", "finetune.max_examples=50", *common],
        )
    )
    return base, lora


def imported_finetune_config(run, tmp_path, *overrides: str) -> Config:
    """A 2-step LoRA fine-tune (finetune_tiny) of an imported run, repeating its model section
    as a fine-tune's config must; writes to tmp_path / "ft"."""
    import yaml

    model = yaml.safe_load((Path(run) / "config.yaml").read_text())["model"]
    return load_config(
        os.path.join(ROOT, "configs", "finetune_tiny.yaml"),
        [
            f"init.from={run}",
            f"run.dir={tmp_path / 'ft'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.seq_len=256",
            "run.progress=false",
            "train.steps=2",
            "train.eval_every=2",
            "train.checkpoint_every=2",
            "train.eval_batches=1",
            *(f"model.{k}={v}" for k, v in model.items() if v is not None),
            *overrides,
        ],
    )
