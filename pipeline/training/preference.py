"""Preference tuning (`pipeline dpo`): DPO, IPO or SimPO on pairs of responses to one prompt.

A pair is `{"prompt" | "messages", "chosen", "rejected"}`: the conversation so far and two
assistant replies, the first preferred. Both are rendered with the chat template, and only the
reply's tokens (and the end marker closing it) count. The loss compares how much more likely the
policy makes each reply than the reference does:

    sigmoid (DPO):  -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
    ipo:            (h - 1 / (2 beta))^2 with h that difference over per-token mean log-probs
    simpo:          -log sigmoid(beta * (mean pi_c - mean pi_r) - gamma), no reference

where pi_c is the policy's log-probability of the chosen reply (summed over its tokens). The
reference is the model as training starts: under LoRA the same weights with the adapters
switched off (zeroed), so there is no second copy; under full fine-tuning a frozen copy in the
training state (`dpo.reference_quantize: int8` keeps it in int8). Logged beside the loss (and
as eval_* on the held-out pairs): the reward margin and accuracy (beta times the log-ratio to
the reference, chosen over rejected; a tie counts half), the chosen and rejected
log-probabilities, and (in evaluation) the KL to the reference over the whole vocabulary at
each reply position.

The embedded sets use the fine-tuning set's prompts (a standard-library function's source, asked
for a one-line summary) and the first line of its own docstring as the chosen reply; rejected is
the first line of another function's docstring from the same split (`stdlib-docstring-pairs`,
the default) or the chosen line with its words shuffled (`stdlib-docstring-shuffled`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipeline.config import Config, ConfigError, DpoConfig
from pipeline.data import json_object
from pipeline.lora import add_lora
from pipeline.model import flops_per_token
from pipeline.quantize import quantize_model
from pipeline.tokenizer import Tokenizer, render
from pipeline.training.finetune import (
    export_adapter,
    load_base,
    process_rows,
    trainable_split,
)
from pipeline.training.instruct import (
    Examples,
    ExampleSampler,
    is_conversation,
    stdlib_docstring_examples,
)
from pipeline.training.loop import run_training
from pipeline.training.train import RunResult, Stage, token_losses

EMBEDDED = "stdlib-docstring-pairs"  # rejected: another function's docstring line
SHUFFLED = "stdlib-docstring-shuffled"  # rejected: the same line, its words shuffled


def read_pairs(cfg: DpoConfig) -> tuple[list[dict], list[dict]]:
    """Train and held-out pairs, each {"messages" (the prompt), "chosen", "rejected"}."""
    if cfg.data in (EMBEDDED, SHUFFLED):
        train, held_out = stdlib_docstring_examples(cfg.val_fraction, cfg.max_examples)
        make = docstring_pairs if cfg.data == EMBEDDED else shuffled_pairs
        return make(train), make(held_out)
    path = Path(cfg.data)
    if not path.is_file():
        raise ConfigError(f"dpo.data: file not found: {path}")
    with path.open(encoding="utf-8") as f:
        pairs = [_parse_pair(f"{path}:{n}", line) for n, line in enumerate(f, 1) if line.strip()]
    pairs = pairs[: cfg.max_examples] if cfg.max_examples else pairs
    if len(pairs) < 2:
        raise ConfigError(f"dpo.data: {path} needs at least 2 pairs, has {len(pairs)}")
    order = np.random.default_rng(0).permutation(len(pairs))
    num_val = max(1, int(round(len(pairs) * cfg.val_fraction)))
    return [pairs[i] for i in sorted(order[num_val:])], [pairs[i] for i in sorted(order[:num_val])]


def docstring_pairs(examples: list[dict]) -> list[dict]:
    """Each instruction example with its own reply chosen and, rejected, the reply of the next
    example in a fixed shuffle of the same split (skipped where the two are the same text)."""
    order = np.random.default_rng(0).permutation(len(examples))
    pairs = []
    for k, i in enumerate(order):
        *prompt, reply = examples[i]["messages"]
        other = examples[order[(k + 1) % len(order)]]["messages"][-1]["content"]
        if other != reply["content"]:
            pairs.append(
                {
                    "messages": prompt,
                    "chosen": reply["content"],
                    "rejected": other,
                    "where": examples[i]["where"],
                }
            )
    return pairs


def shuffled_pairs(examples: list[dict]) -> list[dict]:
    """Each instruction example with its own reply chosen and, rejected, the same reply with its
    words in a fixed random order (replies of fewer than 3 words skipped): a preference for
    well-formed text that a small model can learn, where telling its own docstring from
    another function's needs more than it has."""
    pairs = []
    for n, example in enumerate(examples):
        *prompt, reply = example["messages"]
        words = reply["content"].split()
        if len(words) < 3:
            continue
        rng = np.random.default_rng([0, n])
        shuffled = words
        for _ in range(10):
            shuffled = [words[i] for i in rng.permutation(len(words))]
            if shuffled != words:
                break
        if shuffled != words:
            pairs.append(
                {
                    "messages": prompt,
                    "chosen": reply["content"],
                    "rejected": " ".join(shuffled),
                    "where": example["where"],
                }
            )
    return pairs


def _parse_pair(where: str, line: str) -> dict:
    record = json_object(where, line)
    if isinstance(record.get("prompt"), str):
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        messages = record.get("messages")
        if not is_conversation(messages):
            raise ConfigError(
                f"{where}: needs a string 'prompt' or a 'messages' list of {{role, content}}"
            )
    replies = [_reply(where, record, key) for key in ("chosen", "rejected")]
    return {"messages": messages, "chosen": replies[0], "rejected": replies[1], "where": where}


def _reply(where: str, record: dict, key: str) -> str:
    """A reply given as a string or as a one-message assistant list (TRL's conversational)."""
    value = record.get(key)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0].get("content") if value[0].get("role") == "assistant" else None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key!r} must be a non-empty string (the assistant's reply)")
    return value


def build_pairs(
    tokenizer: Tokenizer, pairs: list[dict], seq_len: int, drop_long: bool = False
) -> Examples:
    """Rows (N, 2, seq_len + 1) of [chosen, rejected] and their reply masks (N, 2, seq_len).

    `drop_long` skips pairs whose either side does not fit whole (the embedded set); otherwise
    a long reply is truncated, and a pair with a side left without a reply token is an error."""
    tokens, masks = [], []
    for pair in pairs:
        sides = []
        for key in ("chosen", "rejected"):
            messages = [*pair["messages"], {"role": "assistant", "content": pair[key]}]
            try:
                ids, trained = render(tokenizer, messages)
            except ValueError as err:
                raise ConfigError(f"{pair.get('where', 'a pair')}: {err}") from None
            sides.append((ids, trained))
        if drop_long and any(len(ids) > seq_len + 1 for ids, _ in sides):
            continue
        if not all(any(trained[1 : seq_len + 1]) for _, trained in sides):
            raise ConfigError(
                f"{pair.get('where', 'a pair')}: a reply has no token within "
                f"data.seq_len={seq_len}; shorten the prompt or raise data.seq_len"
            )
        row = np.full((2, seq_len + 1), tokenizer.pad_id, np.int32)
        mask = np.zeros((2, seq_len + 1), np.float32)
        for j, (ids, trained) in enumerate(sides):
            row[j, : min(len(ids), seq_len + 1)] = ids[: seq_len + 1]
            mask[j, : min(len(trained), seq_len + 1)] = trained[: seq_len + 1]
        tokens.append(row)
        masks.append(mask[:, 1:])  # mask[t]: whether target t (= token t + 1) counts
    if not tokens:
        raise ConfigError(f"dpo.data: no pair fits data.seq_len={seq_len}")
    return Examples(np.stack(tokens), np.stack(masks))


def preference_loss(policy, reference, cfg: DpoConfig, params, frozen, batch: dict, rng):
    """(sum of the pairs' losses, number of pairs, sums of the logged metrics).

    `policy(params, frozen, tokens, rng, targets=)` and `reference(params, frozen, tokens,
    targets=)` give (B, T) per-token cross-entropies."""
    tokens, mask = batch["tokens"], batch["mask"]  # (B, 2, T + 1), (B, 2, T)
    pairs = tokens.shape[0]
    flat, mask = tokens.reshape(2 * pairs, -1), mask.reshape(2 * pairs, -1)
    inputs, targets = flat[:, :-1], flat[:, 1:]
    logp = -policy(params, frozen, inputs, rng, targets=targets)
    ref = jax.lax.stop_gradient(-reference(params, frozen, inputs, targets=targets))
    lengths = mask.sum(-1).reshape(pairs, 2)
    seq = (logp * mask).sum(-1).reshape(pairs, 2)
    ref_seq = (ref * mask).sum(-1).reshape(pairs, 2)
    rewards = cfg.beta * (seq - ref_seq)
    if cfg.loss == "sigmoid":
        losses = -jax.nn.log_sigmoid(rewards[:, 0] - rewards[:, 1])
    elif cfg.loss == "ipo":
        ratio = (seq - ref_seq) / lengths
        losses = (ratio[:, 0] - ratio[:, 1] - 1 / (2 * cfg.beta)) ** 2
    else:  # simpo: length-normalised, no reference
        rewards = cfg.beta * seq / lengths
        losses = -jax.nn.log_sigmoid(rewards[:, 0] - rewards[:, 1] - cfg.simpo_gamma)
    margin = rewards[:, 0] - rewards[:, 1]
    extras = {
        "reward_margin": margin.sum(),
        "reward_accuracy": (
            jnp.where(margin > 0, 1.0, 0.0) + jnp.where(margin == 0, 0.5, 0.0)
        ).sum(),
        "chosen_reward": rewards[:, 0].sum(),
        "rejected_reward": rewards[:, 1].sum(),
        "chosen_logp": seq[:, 0].sum(),
        "rejected_logp": seq[:, 1].sum(),
    }
    if rng is None:  # evaluation: the KL to the reference too (two more forward passes)
        extras["kl"] = reply_kl(policy, reference, params, frozen, inputs, mask).sum()
    return losses.sum(), jnp.asarray(pairs, jnp.float32), extras


def reply_kl(policy, reference, params, frozen, inputs, mask) -> jax.Array:
    """Per pair: KL(policy || reference) over the whole vocabulary at each reply position,
    averaged over both replies' positions. Exact, not a sampled estimate: the replies are the
    data's, not the policy's samples, so an estimator from their tokens alone would be biased."""
    log_p = jax.nn.log_softmax(policy(params, frozen, inputs, None).astype(jnp.float32), -1)
    log_q = jax.nn.log_softmax(reference(params, frozen, inputs).astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # (2B, T)
    pairs = mask.shape[0] // 2
    return (kl * mask).reshape(pairs, 2, -1).sum((1, 2)) / mask.reshape(pairs, -1).sum(-1)


def adapters_off(apply):
    """The LoRA reference: the policy's own forward with every adapter zeroed (B = A = 0 adds
    exactly nothing), so the base weights serve both."""

    def reference(params, frozen, tokens, targets=None):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return apply(zeros, frozen, tokens, None, targets=targets)

    return reference


def frozen_copy(model, quantize: str):
    """The full fine-tuning reference: a copy of `model` (int8 if asked) for the frozen state,
    and its forward."""
    copy = nnx.clone(model)
    if quantize == "int8":
        quantize_model(copy, "int8", embeddings=True)
    ref_graphdef, ref_state = nnx.split(copy)

    def reference(params, frozen, tokens, targets=None):
        model = nnx.merge(ref_graphdef, frozen["reference"])
        return model(tokens)[0] if targets is None else token_losses(model, tokens, targets)

    return {"reference": ref_state}, reference


def with_reference(cfg: Config, model, quantize: str):
    """(graphdef, trained params, frozen state, policy apply, reference) for a stage that
    trains `model` (LoRA or full, as finetune.method says) against its initial self."""

    if cfg.finetune.method != "lora" and cfg.lora.base_quantize != "none":
        raise ConfigError("lora.base_quantize: an int8 base needs finetune.method=lora")
    lora = cfg.finetune.method == "lora"
    if lora:
        add_lora(model, cfg.lora, seed=cfg.train.seed)
    graphdef, params, frozen, apply = trainable_split(model, lora)
    if lora:
        reference = adapters_off(apply)
    else:
        frozen, reference = frozen_copy(model, quantize)
    return graphdef, params, frozen, apply, reference


def build_stage(cfg: Config) -> Stage:
    model, tokenizer = load_base(cfg)
    train, held_out = read_pairs(cfg.dpo)
    build = partial(
        build_pairs,
        tokenizer,
        seq_len=cfg.data.seq_len,
        drop_long=cfg.dpo.data in (EMBEDDED, SHUFFLED),
    )
    train, held_out = build(train), build(held_out)
    lora = cfg.finetune.method == "lora"
    graphdef, params, frozen, apply, reference = with_reference(
        cfg, model, cfg.dpo.reference_quantize
    )
    m, seq_len = cfg.model, cfg.data.seq_len
    return Stage(
        name=f"dpo-{cfg.finetune.method}",
        graphdef=graphdef,
        params=params,
        frozen=frozen,
        loss_fn=partial(preference_loss, apply, reference, cfg.dpo),
        train_batch=partial(
            process_rows, ExampleSampler(train, cfg.train.batch_size, cfg.train.seed)
        ),
        eval_batch=partial(
            process_rows, ExampleSampler(held_out, cfg.train.batch_size, 0, shuffle=False)
        ),
        # the policy's training step (LoRA: no base weight gradients) and the reference's forward
        flops_per_token=flops_per_token(m, seq_len, "frozen" if lora else "train")
        + flops_per_token(m, seq_len, "forward"),
        tokens_per_example=2 * cfg.data.seq_len,
        tokenizer=tokenizer,
        export=partial(export_adapter, cfg, graphdef, frozen) if lora else None,
        perplexity=False,
    )


def dpo(cfg: Config, fresh: bool = False) -> RunResult:
    return run_training(cfg, build_stage(cfg), fresh=fresh)
