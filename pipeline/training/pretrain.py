"""Pre-training: next-token prediction on a corpus, from randomly initialised weights.

A thin entry point: it builds the `Stage` (model, data, loss) and hands it to the shared loop.
"""

from __future__ import annotations

from functools import partial

from flax import nnx

from pipeline.config import Config
from pipeline.data import (
    Dataset,
    MixturePart,
    MixtureSampler,
    PackedSampler,
    Sampler,
    lm_batch,
    prepare_dataset,
    prepare_mixture,
)
from pipeline.model import create_model, flops_per_token
from pipeline.training.loop import run_training
from pipeline.training.train import RunResult, Stage, lm_loss, token_losses


def build_stage(cfg: Config, dataset: Dataset | None = None) -> Stage:
    if cfg.data.mixture and dataset is None:
        return _mixture_stage(cfg, prepare_mixture(cfg))
    dataset = dataset or prepare_dataset(cfg)
    train, evaluate = _samplers(cfg, dataset, cfg.train.seed)
    return _stage(cfg, dataset.tokenizer, train, evaluate)


def _samplers(cfg: Config, dataset: Dataset, seed: int):
    """(train, validation or None) samplers of one source, as `data.packing` says."""
    seq_len, batch = cfg.data.seq_len, cfg.train.batch_size
    if cfg.data.packing == "best_fit":
        tok = dataset.tokenizer
        make = partial(PackedSampler, eos_id=tok.eos_id, pad_id=tok.pad_id, seq_len=seq_len)
    else:
        make = partial(Sampler, seq_len=seq_len)
    train = make(dataset.train, global_batch=batch, seed=seed)
    evaluate = None
    if dataset.val.size > seq_len:
        evaluate = make(dataset.val, global_batch=batch, seed=seed, shuffle=False)
    return train, evaluate


def _mixture_stage(cfg: Config, parts: list[MixturePart]) -> Stage:
    """Rows from each source by weight; an evaluation loss per source (and their weighted
    mean as eval_loss)."""
    seed = cfg.train.seed
    pairs = [_samplers(cfg, p.dataset, seed + 7919 * i) for i, p in enumerate(parts)]
    train = MixtureSampler([t for t, _ in pairs], [p.weight for p in parts], seed)
    eos = parts[0].dataset.tokenizer.eos_id if cfg.data.document_masking else None
    eval_sets = {
        p.name: (partial(lm_batch, evaluate, eos_id=eos), p.weight)
        for p, (_, evaluate) in zip(parts, pairs, strict=True)
        if evaluate is not None
    }
    stage = _stage(cfg, parts[0].dataset.tokenizer, train, None)
    stage.eval_sets = eval_sets or None
    return stage


def _stage(cfg: Config, tokenizer, train, evaluate) -> Stage:
    graphdef, params = nnx.split(create_model(cfg.model, seed=cfg.train.seed))

    def apply(params, frozen, tokens, rng=None, segments=None, targets=None):
        model = nnx.merge(graphdef, params)
        if targets is not None:
            return token_losses(model, tokens, targets, segments)
        return model(tokens, segments=segments)[0]

    eos = tokenizer.eos_id if cfg.data.document_masking else None
    seq_len = cfg.data.seq_len
    return Stage(
        name="pretrain",
        graphdef=graphdef,
        params=params,
        frozen={},
        loss_fn=partial(lm_loss, apply),
        train_batch=partial(lm_batch, train, eos_id=eos),
        eval_batch=partial(lm_batch, evaluate, eos_id=eos) if evaluate else None,
        flops_per_token=flops_per_token(cfg.model, seq_len),
        tokens_per_example=seq_len,
        bytes_per_token=1.0 if tokenizer.is_byte_level else None,
        tokenizer=tokenizer,
    )


def pretrain(cfg: Config, fresh: bool = False) -> RunResult:
    return run_training(cfg, build_stage(cfg), fresh=fresh)
