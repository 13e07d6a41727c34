"""Distillation: a student model learns from a teacher run's output distribution.

loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy, where _T is the
softmax at temperature T. The teacher (optionally int8) rides in the training state's frozen
part, so its forward runs inside the same jitted, pmapped step, with no gradient. The data are
the teacher run's corpus, read with the teacher's tokenizer. Evaluation reports the student's
cross-entropy, comparable with the teacher's and with pre-training's eval loss.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pipeline.config import Config, ConfigError, with_overrides
from pipeline.data import Sampler, lm_batch, prepare_dataset
from pipeline.inference.runs import load_model
from pipeline.model import create_model, flops_per_token
from pipeline.quantize import quantize_model
from pipeline.training.loop import run_training
from pipeline.training.train import RunResult, Stage


def distill_loss(student, teacher, alpha: float, T: float, params, frozen, batch, rng):
    tokens = batch["tokens"]
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    logits = student(params, inputs)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    count = jnp.asarray(ce.size, jnp.float32)
    if rng is None:  # evaluation: the student's cross-entropy
        return jnp.sum(ce), count
    teacher_logits = jax.lax.stop_gradient(teacher(frozen["teacher"], inputs))
    t_logp = jax.nn.log_softmax(teacher_logits / T, axis=-1)
    s_logp = jax.nn.log_softmax(logits / T, axis=-1)
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
    return jnp.sum(alpha * T**2 * kl + (1 - alpha) * ce), count


def build_stage(cfg: Config) -> Stage:
    d = cfg.distill
    if not d.teacher:
        raise ConfigError("distill.teacher: set it to the teacher's run directory")
    teacher_cfg, teacher_model, tokenizer = load_model(d.teacher, "distill.teacher", host=True)
    if teacher_cfg.tokenizer != cfg.tokenizer:
        raise ConfigError(
            f"tokenizer: the student's ({cfg.tokenizer}) differs from the teacher's "
            f"({teacher_cfg.tokenizer}, {d.teacher}); they must share one tokenizer"
        )
    if teacher_cfg.model.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: the student has {cfg.model.vocab_size}, the teacher "
            f"{teacher_cfg.model.vocab_size}; a shared tokenizer needs the same vocabulary"
        )
    if d.teacher_quantize == "int8":
        quantize_model(teacher_model, "int8", embeddings=True)
    teacher_graphdef, teacher_params = nnx.split(teacher_model)
    graphdef, params = nnx.split(create_model(cfg.model, seed=cfg.train.seed))
    data_cfg = with_overrides(teacher_cfg, data={"seq_len": cfg.data.seq_len})
    dataset = prepare_dataset(data_cfg, tokenizer)

    def student(params, tokens):
        return nnx.merge(graphdef, params)(tokens)[0]

    def teacher(params, tokens):
        return nnx.merge(teacher_graphdef, params)(tokens)[0]

    seq_len, batch = cfg.data.seq_len, cfg.train.batch_size
    train = Sampler(dataset.train, seq_len, batch, cfg.train.seed)
    evaluate = None
    if dataset.val.size > seq_len:
        evaluate = Sampler(dataset.val, seq_len, batch, cfg.train.seed, shuffle=False)
    # the student's training FLOPs plus the teacher's forward
    flops = flops_per_token(cfg.model, seq_len) + flops_per_token(
        teacher_cfg.model, seq_len, "forward"
    )
    return Stage(
        name="distill",
        graphdef=graphdef,
        params=params,
        frozen={"teacher": teacher_params},
        loss_fn=partial(distill_loss, student, teacher, d.alpha, d.temperature),
        train_batch=partial(lm_batch, train),
        eval_batch=partial(lm_batch, evaluate) if evaluate else None,
        flops_per_token=flops,
        tokens_per_example=seq_len,
        bytes_per_token=1.0 if tokenizer.is_byte_level else None,
        tokenizer=tokenizer,
    )


def distill(cfg: Config, fresh: bool = False) -> RunResult:
    return run_training(cfg, build_stage(cfg), fresh=fresh)
