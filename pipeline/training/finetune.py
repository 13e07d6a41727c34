"""Fine-tuning: LoRA, QLoRA or full, on instruction data, from a pre-trained run.

A thin entry point: it loads the base named by `init.from`, adds adapters (or not), builds the
instruction batches with their loss masks, and hands the `Stage` to the shared loop.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import jax
from flax import nnx

from pipeline.config import Config, ConfigError
from pipeline.inference.runs import load_model
from pipeline.lora import add_lora, merge, save_adapter, set_dropout_keys
from pipeline.model import flops_per_token
from pipeline.training.instruct import Examples, ExampleSampler, build_examples, read_examples
from pipeline.training.loop import model_differences, run_training
from pipeline.training.tasks import TaskEval
from pipeline.training.train import RunResult, Stage, lm_loss, token_losses


def check_same_model(cfg: Config, base: Config) -> None:
    """A fine-tune must describe the same model as its base."""
    diffs = model_differences(base.to_dict()["model"], cfg.to_dict()["model"])
    if diffs:
        raise ConfigError(
            f"init.from: {cfg.init.from_run} is a different model (base -> here: {diffs})"
        )


def load_base(cfg: Config):
    """(model, tokenizer) of the run init.from names, checked against this config's model."""
    if not cfg.init.from_run:
        raise ConfigError("init.from: fine-tuning needs a base run directory (init.from=runs/X)")
    base_cfg, model, tokenizer = load_model(cfg.init.from_run, host=True)
    check_same_model(cfg, base_cfg)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"init.from: the tokenizer of {cfg.init.from_run} has {tokenizer.vocab_size} tokens "
            f"(with the chat markers), more than model.vocab_size={cfg.model.vocab_size}; "
            "pre-train the base again with this version"
        )
    # a LoRA run as the base: its adapters folded into the weights, new ones trained on top
    return merge(model), tokenizer


def build_stage(cfg: Config) -> Stage:
    model, tokenizer = load_base(cfg)
    train, held_out = read_examples(cfg.finetune, cfg.grpo.digits)
    embedded = cfg.finetune.data == "stdlib-docstrings"
    build = partial(
        build_examples,
        tokenizer,
        seq_len=cfg.data.seq_len,
        packing=cfg.finetune.packing,
        drop_long=embedded,
    )
    # held-out examples one per row whatever the packing: the same evaluation either way
    held = build(held_out, packing=False)
    stage = stage_for_model(cfg, model, tokenizer, build(train), held)
    if cfg.finetune.data.startswith("task:"):  # beside the loss: the held-out pass rate
        task = cfg.finetune.data.removeprefix("task:")
        lora = cfg.finetune.method == "lora"
        scorer = TaskEval(cfg, task, tokenizer, stage.graphdef, stage.frozen, lora)
        scorer.check_fits(scorer.held_prompts)
        stage = replace(stage, evaluate=scorer.evaluate)
    return stage


def stage_for_model(cfg: Config, model, tokenizer, train: Examples, held_out: Examples) -> Stage:
    """The fine-tuning stage of an in-memory base `model` on tokenized examples."""
    lora = cfg.finetune.method == "lora"
    if lora:
        add_lora(model, cfg.lora, seed=cfg.train.seed)
    graphdef, params, frozen, apply = trainable_split(model, lora)
    train_sampler = ExampleSampler(train, cfg.train.batch_size, cfg.train.seed)
    eval_sampler = ExampleSampler(held_out, cfg.train.batch_size, 0, shuffle=False)
    return Stage(
        name=f"finetune-{cfg.finetune.method}",
        graphdef=graphdef,
        params=params,
        frozen=frozen,
        loss_fn=partial(lm_loss, apply),
        train_batch=partial(process_rows, train_sampler),
        eval_batch=partial(process_rows, eval_sampler),
        flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len, "frozen" if lora else "train"),
        tokens_per_example=cfg.data.seq_len,
        tokenizer=tokenizer,
        # the loop writes model/ (the trained parameters); a LoRA run adds PEFT's files
        export=partial(export_adapter, cfg, graphdef, frozen) if lora else None,
    )


def trainable_split(model, lora: bool):
    """(graphdef, trained params, frozen state, apply(params, frozen, tokens, rng) -> logits, or
    with targets= the per-token losses):
    with LoRA the adapters train and everything else is frozen; otherwise the whole model."""
    if lora:
        graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    else:
        (graphdef, params), frozen = nnx.split(model), {}

    def apply(params, frozen, tokens, rng=None, segments=None, targets=None):
        if not lora:
            model = nnx.merge(graphdef, params)
        else:
            model = nnx.merge(graphdef, params, frozen)
            set_dropout_keys(model, rng)
        if targets is not None:  # (B, T) per-token losses
            return token_losses(model, tokens, targets, segments)
        return model(tokens, segments=segments)[0]

    return graphdef, params, frozen, apply


def process_rows(sampler: ExampleSampler, step: int) -> dict:
    """This process's rows of the step's global batch."""
    return sampler.batch(step, jax.process_index(), jax.process_count())


def export_adapter(cfg: Config, graphdef, frozen, params, run_dir: Path) -> None:
    """The adapter in PEFT's layout, beside the checkpoints."""
    save_adapter(nnx.merge(graphdef, params, frozen), cfg.lora, run_dir, cfg.init.from_run)


def finetune(cfg: Config, fresh: bool = False) -> RunResult:
    if cfg.finetune.method != "lora" and cfg.lora.base_quantize != "none":
        raise ConfigError("lora.base_quantize: an int8 base needs finetune.method=lora")
    return run_training(cfg, build_stage(cfg), fresh=fresh)
