"""Pre-training: next-token prediction on a corpus, from randomly initialised weights.

A thin entry point: it builds the `Stage` (model, data, loss) and hands it to the shared loop.
"""

from __future__ import annotations

from functools import partial

from flax import nnx

from pipeline.config import Config
from pipeline.data import Dataset, Sampler, lm_batch, prepare_dataset
from pipeline.model import create_model, flops_per_token
from pipeline.training.loop import run_training
from pipeline.training.train import Stage, lm_loss, token_losses


def build_stage(cfg: Config, dataset: Dataset | None = None) -> Stage:
    dataset = dataset or prepare_dataset(cfg)
    graphdef, params = nnx.split(create_model(cfg.model, seed=cfg.train.seed))

    def apply(params, frozen, tokens, rng=None, segments=None, targets=None):
        model = nnx.merge(graphdef, params)
        if targets is not None:
            return token_losses(model, tokens, targets, segments)
        return model(tokens, segments=segments)[0]

    eos = dataset.tokenizer.eos_id if cfg.data.document_masking else None

    seq_len, batch = cfg.data.seq_len, cfg.train.batch_size
    train = Sampler(dataset.train, seq_len, batch, cfg.train.seed)
    evaluate = None
    if dataset.val.size > seq_len:
        evaluate = Sampler(dataset.val, seq_len, batch, cfg.train.seed, shuffle=False)
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
        bytes_per_token=1.0 if dataset.tokenizer.is_byte_level else None,
        tokenizer=dataset.tokenizer,
    )


def pretrain(cfg: Config, fresh: bool = False) -> dict:
    return run_training(cfg, build_stage(cfg), fresh=fresh)
