"""Distillation: the KL term falls, the teacher helps, tokenizers must match.

Run: pytest tests/test_distill.py
"""

import json
import os

import pytest
from conftest import ROOT

from pipeline.config import ConfigError, load_config
from pipeline.training.distill import distill
from pipeline.training.pretrain import pretrain

pytestmark = pytest.mark.e2e  # whole stages, subprocesses or real servers


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = load_config(
        os.path.join(ROOT, "configs", "pretrain_tiny.yaml"),
        [
            f"run.dir={tmp / 'run'}",
            f"data.cache_dir={tmp / 'cache'}",
            "run.progress=false",
            "train.steps=60",
            "model.embed_dim=64",
            "train.num_devices=1",
        ],
    )
    pretrain(cfg)
    return cfg


def _student(teacher, tmp_path, name, *extra):
    return load_config(
        os.path.join(ROOT, "configs", "distill_tiny.yaml"),
        [
            f"distill.teacher={teacher.run.dir}",
            f"run.dir={tmp_path / name}",
            f"data.cache_dir={teacher.data.cache_dir}",
            "run.progress=false",
            "train.steps=30",
            "train.eval_every=30",
            "train.num_devices=1",
            *extra,
        ],
    )


def _losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def test_alpha_one_drives_the_kl_down_with_an_int8_teacher(teacher, tmp_path):
    cfg = _student(
        teacher,
        tmp_path,
        "kl",
        "distill.alpha=1.0",
        "train.log_every=1",
        "distill.teacher_quantize=int8",
    )
    distill(cfg)
    assert (tmp_path / "kl" / "model").is_dir()  # every finished stage writes its weights
    losses = _losses(tmp_path / "kl")
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses


def test_the_teacher_beats_training_the_student_alone(teacher, tmp_path):
    taught = distill(
        _student(teacher, tmp_path, "taught", "distill.alpha=0.5", "distill.temperature=1.0")
    )
    alone_cfg = _student(teacher, tmp_path, "alone")
    alone = pretrain(alone_cfg)
    assert taught.eval_loss < alone.eval_loss, (taught.eval_loss, alone.eval_loss)


def test_a_different_tokenizer_is_refused(teacher, tmp_path):
    cfg = _student(teacher, tmp_path, "bpe", "tokenizer.kind=bpe")
    with pytest.raises(ConfigError, match="they must share one tokenizer"):
        distill(cfg)


def test_bench_distill_reports_both_models_and_speculative_decoding(teacher, tmp_path):
    from pipeline.bench.inference import bench_distill

    distill(_student(teacher, tmp_path, "student", "train.steps=5"))
    results = {
        r["case"]: r for r in bench_distill(tmp_path / "student", ks=(2,), prompts=1, new_tokens=8)
    }
    assert results["distill/teacher"]["eval_loss"] < results["distill/student"]["eval_loss"]
    spec = results["distill/speculative/k2"]
    assert spec["same_tokens"] and 0 <= spec["acceptance"] <= 1 and spec["tokens_per_sec"] > 0
