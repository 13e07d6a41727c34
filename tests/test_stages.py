"""The stage registry: one table for the CLI, sweep, runs and the docs.

Run: pytest tests/test_stages.py
"""

from pathlib import Path

import pytest
from conftest import ROOT as _ROOT

from pipeline.cli import build_parser
from pipeline.config import ConfigError, load_config
from pipeline.training.stages import STAGES, stage_of, stages_table

ROOT = Path(_ROOT)


def test_every_stage_is_a_command_and_a_make_target():
    parser = build_parser()
    verbs = next(a for a in parser._actions if a.dest == "command").choices
    makefile = (ROOT / "Makefile").read_text()
    for name, spec in STAGES.items():
        assert name in verbs
        assert spec.make_target.startswith("make ")
        assert f"\n{spec.make_target.split()[1]}: " in makefile


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_a_config_names_a_known_stage_or_none(path):
    stage = load_config(path).run.stage
    assert stage is None or stage in STAGES


def test_the_stage_of_a_config_is_declared_never_guessed():
    # a DPO config extends the fine-tuning one, and says it is DPO
    assert stage_of(load_config(ROOT / "configs/dpo_tiny.yaml")).name == "dpo"
    assert stage_of(load_config(ROOT / "configs/grpo_tiny.yaml")).name == "grpo"
    assert stage_of(load_config(ROOT / "configs/distill_tiny.yaml")).name == "distill"
    # a command-line choice wins over the config's own
    assert stage_of(load_config(ROOT / "configs/dpo_tiny.yaml"), "finetune").name == "finetune"
    # a model preset names no stage: an error naming both ways to say it, not a guess
    tiny = load_config(ROOT / "configs/tiny.yaml", ["init.from=runs/x"])
    with pytest.raises(ConfigError, match=r"--stage NAME or set run\.stage.*pretrain"):
        stage_of(tiny)
    with pytest.raises(ConfigError, match="unknown stage 'sft'"):
        stage_of(tiny, "sft")


def test_the_docs_table_of_stages_is_the_registry():
    page = Path(ROOT / "docs/getting-started.md").read_text()
    assert stages_table() in page
