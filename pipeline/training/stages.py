"""The table of training stages: the one place that says which stages exist, which config
section each reads, how to run it, its `make` target and what its run directory holds.

The CLI builds its stage verbs from it, `sweep` runs the stage it names, `runs` reports the
stage a run directory records, and the docs' table of stages is checked against it. A stage's
module is imported only when the stage runs, so the CLI starts without JAX.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from pipeline.config import Config, ConfigError

# What every finished run directory holds, whatever its stage.
COMMON_FILES = (
    "config.yaml, tokenizer, metrics.jsonl, checkpoints/, tensorboard/, loss.png, state.json, "
    "environment.json, model/"
)


@dataclass(frozen=True)
class StageSpec:
    """One training stage: `run(cfg, fresh)` trains it in `cfg.run.dir`."""

    name: str
    summary: str  # one line: the CLI's help and the docs' table
    section: str | None  # the config section only this stage reads (None: the common ones)
    entry: str  # "module:function", the function taking (cfg, fresh=False) -> RunResult
    make_target: str
    writes: str = ""  # what its run directory holds beyond COMMON_FILES

    def run(self, cfg: Config, fresh: bool = False):
        module, function = self.entry.split(":")
        return getattr(importlib.import_module(module), function)(cfg, fresh=fresh)


_PEFT = "with LoRA: adapter_model.safetensors, adapter_config.json (PEFT's layout)"

STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            "pretrain",
            "pre-train a model (resumes the run in run.dir)",
            None,
            "pipeline.training.pretrain:pretrain",
            "make pretrain",
        ),
        StageSpec(
            "finetune",
            "fine-tune init.from with LoRA, QLoRA or fully",
            "finetune",
            "pipeline.training.finetune:finetune",
            "make finetune",
            _PEFT,
        ),
        StageSpec(
            "dpo",
            "preference-tune init.from on chosen/rejected pairs",
            "dpo",
            "pipeline.training.preference:dpo",
            "make dpo",
            _PEFT,
        ),
        StageSpec(
            "grpo",
            "reinforce init.from on a task with a verifiable reward",
            "grpo",
            "pipeline.training.grpo:grpo",
            "make grpo",
            _PEFT,
        ),
        StageSpec(
            "distill",
            "train a small student on a teacher run's outputs",
            "distill",
            "pipeline.training.distill:distill",
            "make distill",
        ),
    )
}


def stage_spec(name: str) -> StageSpec:
    """The stage called `name`; an unknown one is a `ConfigError` naming the stages."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name]


def stage_of(cfg: Config, named: str | None = None, where: str = "sweep") -> StageSpec:
    """The stage a config runs: `named` (a command-line choice), else the config's own
    `run.stage`; neither is an error, never a guess from the config's other keys."""
    name = named or cfg.run.stage
    if not name:
        raise ConfigError(
            f"{where}: which stage? pass --stage NAME or set run.stage in the config "
            f"(stages: {', '.join(STAGES)})"
        )
    return stage_spec(name)


def stages_table() -> str:
    """The docs' table of stages (Markdown), as the registry says."""
    rows = [
        "| stage | what it does | config section | `make` target | its run directory adds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in STAGES.values():
        section = f"`{s.section}`" if s.section else "(the common sections)"
        rows.append(
            f"| `{s.name}` | {s.summary} | {section} | `{s.make_target}` | {s.writes or '-'} |"
        )
    return "\n".join(rows)
