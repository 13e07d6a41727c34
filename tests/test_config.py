"""Config loading, inheritance, overrides, one-line errors. Run: pytest tests/test_config.py"""

import dataclasses
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, ModelConfig, config_from_dict, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_loads(path):
    cfg = load_config(path)
    assert (
        cfg.model.head_dim * cfg.model.num_heads == cfg.model.embed_dim
        or "head_dim" in Path(path).read_text()
    )


def test_presets_exist():
    names = {os.path.basename(p) for p in CONFIG_FILES}
    assert {"tiny.yaml", "small.yaml", "gpt2-124m.yaml", "llama-100m.yaml"} <= names


def test_overrides_apply_and_convert(tmp_path):
    cfg = load_config(
        os.path.join(ROOT, "configs", "tiny.yaml"),
        ["model.num_layers=3", "optimizer.lr=1e-3", "model.family=llama", "data.max_docs=null"],
    )
    assert cfg.model.num_layers == 3
    assert cfg.optimizer.lr == pytest.approx(1e-3) and isinstance(cfg.optimizer.lr, float)
    # family defaults fill the architecture options the file left unset
    assert (cfg.model.positions, cfg.model.norm, cfg.model.mlp) == ("rope", "rmsnorm", "swiglu")
    assert cfg.model.tied_embeddings is False
    assert cfg.data.max_docs is None


def test_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "model:\n  num_layers: 5\n  embed_dim: 64\nrun:\n  name: b\n"
    )
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel:\n  embed_dim: 128\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.model.num_layers, cfg.model.embed_dim, cfg.run.name) == (5, 128, "b")
    assert cfg.run.dir == "runs/b"


def test_dump_load_round_trip(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "llama-100m.yaml"), ["train.steps=7"])
    (tmp_path / "resolved.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


def _error(tmp_path, text: str, overrides=()) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_file_and_suggestion(tmp_path):
    msg = _error(tmp_path, "model:\n  num_layer: 4\n")
    assert "model.num_layer" in msg and "bad.yaml" in msg and "model.num_layers" in msg


def test_unknown_section(tmp_path):
    msg = _error(tmp_path, "modle:\n  num_layers: 4\n")
    assert "'modle'" in msg and "did you mean model" in msg


def test_unknown_override_names_command_line(tmp_path):
    msg = _error(tmp_path, "{}", ["optimizer.learning_rate=1e-3"])
    assert "optimizer.learning_rate" in msg and "command line" in msg and "optimizer." in msg


def test_wrong_type(tmp_path):
    msg = _error(tmp_path, "model:\n  num_layers: four\n")
    assert "model.num_layers" in msg and "expected int" in msg and "'four'" in msg
    msg = _error(tmp_path, "{}", ["model.use_bias=3"])
    assert "model.use_bias" in msg and "bool" in msg and "command line" in msg
    msg = _error(tmp_path, "model:\n  family: gpt3\n")
    assert "'gpt2'" in msg and "'llama'" in msg


def test_impossible_values(tmp_path):
    msg = _error(tmp_path, "model:\n  embed_dim: 30\n  num_heads: 4\n")
    assert msg.startswith("model.num_heads") and "bad.yaml" in msg and "embed_dim=30" in msg
    msg = _error(tmp_path, "model:\n  num_heads: 4\n  num_kv_heads: 3\n")
    assert msg.startswith("model.num_kv_heads") and "does not divide" in msg
    msg = _error(tmp_path, "{}", ["data.seq_len=1000"])
    assert msg.startswith("data.seq_len") and "max_seq_len" in msg


def test_missing_and_cyclic_base(tmp_path):
    assert "not found" in _error(tmp_path, "base: nowhere.yaml\n")
    (tmp_path / "a.yaml").write_text("base: bad.yaml\n")
    assert "cycle" in _error(tmp_path, "base: a.yaml\n")


def test_cli_prints_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "info",
            "--config",
            "configs/tiny.yaml",
            "model.num_layer=3",
            "--no-data",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "model.num_layers" in proc.stderr and "Traceback" not in proc.stderr


REAL_SHAPES = {
    "llama-3.2-1b": 1235.8,
    "qwen2.5-0.5b": 494.0,
    "qwen3-0.6b": 596.0,
    "smollm2-135m": 134.5,
}


@pytest.mark.parametrize(("preset", "millions"), REAL_SHAPES.items())
def test_presets_have_the_real_models_parameter_counts(preset, millions):
    from pipeline.model import count_params

    cfg = load_config(os.path.join(ROOT, "configs", f"{preset}.yaml"))
    assert count_params(cfg.model) / 1e6 == pytest.approx(millions, abs=0.1)


def test_replacing_the_family_gives_the_new_familys_options():
    """Family defaults are re-resolved by `dataclasses.replace`; options set by hand stay."""
    gpt2 = ModelConfig(family="gpt2", embed_dim=32, num_heads=4)
    llama = dataclasses.replace(gpt2, family="llama")
    assert llama == ModelConfig(family="llama", embed_dim=32, num_heads=4)
    assert (llama.positions, llama.norm, llama.mlp) == ("rope", "rmsnorm", "swiglu")
    assert not llama.use_bias and not llama.tied_embeddings and llama.mlp_dim == 128
    wider = dataclasses.replace(gpt2, embed_dim=64)
    assert (wider.head_dim, wider.mlp_dim) == (16, 256)  # derived again from the new width
    by_hand = ModelConfig(family="llama", use_bias=True, num_kv_heads=2)
    back = dataclasses.replace(by_hand, family="gpt2")
    assert back.use_bias and back.num_kv_heads == 2 and back.positions == "learned"
    assert "filled" not in load_config(os.path.join(ROOT, "configs/tiny.yaml")).to_dict()["model"]
