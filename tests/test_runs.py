"""Loading a run for inference reads its parameters and nothing else.

Run: pytest tests/test_runs.py
"""

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import restore_final_state
from flax import nnx
from safetensors import safe_open

from pipeline.config import ConfigError, with_overrides
from pipeline.inference.runs import load_for_inference, load_model
from pipeline.training.pretrain import pretrain

pytestmark = pytest.mark.e2e  # whole stages, subprocesses or real servers


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The name of every array orbax reads from disk, in this test."""
    names: list[str] = []
    deserialize = ocp.type_handlers.NumpyHandler.deserialize

    async def spy(self, infos, args=None):
        names.extend(info.name for info in infos)
        return await deserialize(self, infos, args)

    monkeypatch.setattr(ocp.type_handlers.NumpyHandler, "deserialize", spy)
    return names


def _assert_same_params(model, params):
    loaded = jax.tree.leaves(nnx.state(model))
    expected = jax.tree.leaves(params)
    assert len(loaded) == len(expected)
    for a, b in zip(loaded, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_is_read_for_its_parameters_alone_then_model_dir(tiny_config, reads):
    cfg = with_overrides(
        tiny_config,
        train={"steps": 4, "stop_at": 2, "checkpoint_every": 2, "eval_every": 2},
        run={"progress": False},
    )
    pretrain(cfg)
    run_dir = Path(cfg.run.dir)
    assert not (run_dir / "model").exists()  # stopped early: checkpoints only
    reads.clear()
    _, model, _ = load_model(run_dir)
    # only the params item of the checkpoint: no Adam moments, no step or RNG
    assert reads and all(name.startswith("params.") for name in reads), reads
    assert len(reads) == len(jax.tree.leaves(nnx.state(model)))
    assert len(reads) * 3 < len(jax.tree.leaves(restore_final_state(cfg)))
    _assert_same_params(model, restore_final_state(cfg)["params"])

    pretrain(with_overrides(cfg, train={"stop_at": None}))  # finishes: writes model/
    assert (run_dir / "model" / "model.safetensors").is_file()
    reads.clear()
    _, model, _ = load_model(run_dir)
    assert reads == []  # model/model.safetensors alone: no checkpoint is opened
    _assert_same_params(model, restore_final_state(cfg)["params"])
    with safe_open(str(run_dir / "model" / "model.safetensors"), framework="numpy") as f:
        assert "blocks.0.attn.q.kernel" in set(f.keys())  # a standard file, our names


def test_a_run_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "config.yaml").write_text("model: {}\n")
    with pytest.raises(ConfigError, match="no checkpoint and no final model"):
        load_for_inference(tmp_path)
    with pytest.raises(ConfigError, match="not a run directory"):
        load_for_inference(tmp_path / "missing")
