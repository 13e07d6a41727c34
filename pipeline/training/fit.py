"""`pipeline fit`: will this training config fit, per device, before anything runs?

The training step is compiled ahead of time for the configured strategy from shapes alone: the
model is built abstractly (`nnx.eval_shape`), no parameter is allocated and no data is read.
Reported per device: parameter and optimizer-state bytes (from the shardings), and XLA's memory
analysis of the compiled step (arguments, outputs, temporaries: the activations, which
`model.remat` trades for recomputation). With a budget, the largest per-device batch that fits
is searched by compiling a few batch sizes. `--stage finetune` models fine-tuning as
`finetune.method` says: full, or LoRA (adapters trained, the base frozen).
"""

from __future__ import annotations

from functools import partial

import jax
from flax import nnx

from pipeline.config import Config, ConfigError
from pipeline.lora import add_lora
from pipeline.model import create_model, flops_per_token
from pipeline.training.finetune import trainable_split
from pipeline.training.train import Stage, Trainer, create_trainer, lm_loss


def _abstract_stage(cfg: Config, stage: str = "pretrain") -> Stage:
    """The stage's parameters as shapes: the whole model, or (fine-tuning with LoRA) the
    adapters trained and the base frozen."""
    lora = stage == "finetune" and cfg.finetune.method == "lora"
    if lora and cfg.lora.base_quantize != "none":
        raise ConfigError("fit: QLoRA (lora.base_quantize) is not modelled; use LoRA's figures")

    def build():
        model = create_model(cfg.model)
        return add_lora(model, cfg.lora) if lora else model

    graphdef, params, frozen, apply = trainable_split(nnx.eval_shape(build), lora)
    return Stage(
        name=f"fit-{stage}",
        graphdef=graphdef,
        params=params,
        frozen=frozen,
        loss_fn=partial(lm_loss, apply),
        train_batch=None,
        eval_batch=None,
        flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len, "frozen" if lora else "train"),
        tokens_per_example=cfg.data.seq_len,
    )


def _compile(cfg: Config, trainer: Trainer, rows_per_shard: int):
    args = trainer.strategy.abstract(trainer.state, rows_per_shard, cfg.data.seq_len + 1)
    return trainer.train_step.lower(*args).compile()


def fit(
    cfg: Config, budget_bytes: int | None = None, max_rows: int = 4096, stage: str = "pretrain"
) -> dict:
    """Per-device memory of `cfg`'s training step (pre-training, or fine-tuning as
    `finetune.method` says), and the largest batch within budget."""
    abstract = _abstract_stage(cfg, stage)
    trainer = create_trainer(abstract, cfg, abstract=True)
    strategy = trainer.strategy
    opt_state = jax.eval_shape(trainer.tx.init, abstract.params)
    rows = max(cfg.train.batch_size // max(strategy.batch_shards, 1), 1)

    def analyse(rows_per_device: int) -> dict:
        memory = _compile(cfg, trainer, rows_per_device).memory_analysis()
        figures = {
            name: int(getattr(memory, f"{name}_size_in_bytes", 0) or 0)
            for name in ("argument", "output", "temp", "alias", "generated_code")
        }
        figures["total"] = (
            figures["argument"] + figures["output"] - figures["alias"] + figures["temp"]
        )
        return figures

    result = {
        "strategy": cfg.train.parallelism,
        "mesh": list(strategy.mesh_shape) if strategy.mesh_shape else None,
        "devices": strategy.num_devices,
        "device_kind": jax.devices()[0].device_kind,
        "remat": cfg.model.remat,
        "rows_per_device": rows,
        "stage": stage,
        "param_bytes": strategy.per_device_bytes(abstract.params),
        "frozen_bytes": strategy.per_device_bytes(abstract.frozen),
        "optimizer_bytes": strategy.per_device_bytes(opt_state),
        "xla": analyse(rows),
        "budget_bytes": budget_bytes,
    }
    if budget_bytes:
        result["fits"] = result["xla"]["total"] <= budget_bytes
        best, size = None, 1
        while size <= max_rows:
            total = analyse(size)["total"]
            if total > budget_bytes:
                break
            best, size = size, size * 2
        result["max_rows_per_device"] = best
    return result


def device_budget() -> int | None:
    """The first device's memory limit, where the backend reports one (GPUs, TPUs)."""
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def format_fit(r: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    x = r["xla"]
    lines = [
        f"strategy {r['strategy']}"
        + (f" mesh (data, fsdp, tensor) = {tuple(r['mesh'])}" if r["mesh"] else "")
        + f" on {r['devices']} {r['device_kind']} device(s), remat {r['remat']}",
        f"per device, {r['rows_per_device']} rows of the batch:",
        f"  parameters        {mib(r['param_bytes'])} trained"
        + (f", {mib(r['frozen_bytes'])} frozen" if r.get("frozen_bytes") else ""),
        f"  optimizer state   {mib(r['optimizer_bytes'])}",
        f"  XLA arguments     {mib(x['argument'])}",
        f"  XLA temporaries   {mib(x['temp'])}   (activations, gradients in flight)",
        f"  XLA outputs       {mib(x['output'])} ({mib(x['alias'])} aliased to the inputs)",
        f"  total             {mib(x['total'])}",
    ]
    if r.get("budget_bytes"):
        verdict = "fits" if r["fits"] else "WILL NOT FIT"
        lines.append(f"budget {mib(r['budget_bytes'])}: {verdict}")
        best = r.get("max_rows_per_device")
        lines.append(
            f"largest per-device batch within the budget: {best} rows"
            if best
            else "not even 1 row per device fits the budget"
        )
    return "\n".join(lines)
