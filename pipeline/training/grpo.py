"""Group-relative policy optimisation (`pipeline grpo`) on a task with a verifiable reward.

Each step takes train.batch_size prompts of the task (`tasks.py`) and, for each, samples
`grpo.group_size` completions from the current policy with the jitted `generate` in this same
process (the step's seeds a function of (train.seed, step, row): a resumed run samples what the
uninterrupted one did). Each completion is scored by the reward function; its advantage is its
reward less its group's mean, over the group's standard deviation (zero when the group agrees).
The step then makes `grpo.updates_per_batch` optimizer updates on the rollouts with the clipped
objective, per token of the completion:

    min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) - kl_beta * k3,   ratio = pi / pi_old

averaged over each completion's tokens, then over the completions (the loss is its negative).
k3 = exp(r) - 1 - r with r = log ref - log pi estimates KL(pi || ref) on the sampled tokens.
pi_old and the reference's log-probabilities are computed once per batch of rollouts. The
reference is the initial policy: LoRA's adapters switched off, or a frozen (optionally int8)
copy under full fine-tuning, as in `pipeline dpo`.

Logged per step: the mean reward, KL, clip fraction, completion length, and the seconds spent
generating (`rollout_s`) apart from the updates (`update_s`); at each evaluation the pass rate
of greedy completions of held-out prompts (a pass: a reward of at least 1) and their mean reward.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.config import Config, ConfigError, GrpoConfig
from pipeline.inference.sampling import Sampling
from pipeline.model import flops_per_token
from pipeline.training.finetune import export_adapter, load_base
from pipeline.training.instruct import ExampleSampler
from pipeline.training.loop import run_training
from pipeline.training.preference import with_reference
from pipeline.training.tasks import TaskEval, read_task
from pipeline.training.train import RunResult, Stage


def group_advantages(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """(r - mean of its group) / (std of its group + 1e-4), rows in groups of `group_size`."""
    groups = rewards.reshape(-1, group_size).astype(np.float64)
    centred = groups - groups.mean(axis=1, keepdims=True)
    return (centred / (groups.std(axis=1, keepdims=True) + 1e-4)).reshape(-1).astype(np.float32)


def grpo_loss(policy, cfg: GrpoConfig, params, frozen, batch: dict, rng):
    """(sum over completions of the negated per-token objective's mean, completions, sums of
    the logged metrics)."""
    tokens, mask = batch["tokens"], batch["mask"]  # (N, T + 1), (N, T): completion targets
    logp = -policy(params, frozen, tokens[:, :-1], rng, targets=tokens[:, 1:])
    ratio = jnp.exp(logp - batch["old_logp"])
    clipped = jnp.clip(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps)
    advantages = batch["advantages"][:, None]
    surrogate = jnp.minimum(ratio * advantages, clipped * advantages)
    r = batch["ref_logp"] - logp
    k3 = jnp.exp(r) - 1 - r
    lengths = jnp.maximum(mask.sum(-1), 1.0)

    def per_completion(x):
        return (x * mask).sum(-1) / lengths

    objective = per_completion(surrogate - cfg.kl_beta * k3)
    extras = {
        "reward": batch["rewards"].sum(),
        "kl": per_completion(k3).sum(),
        "clip_fraction": per_completion((ratio != clipped).astype(jnp.float32)).sum(),
        "completion_length": mask.sum(),
    }
    return -objective.sum(), jnp.asarray(tokens.shape[0], jnp.float32), extras


class Rollouts(TaskEval):
    """The task's training prompts, the sampling and scoring of completions; the held-out
    evaluation is TaskEval's."""

    def __init__(self, cfg: Config, tokenizer, graphdef, frozen, lora: bool, policy, reference):
        super().__init__(cfg, cfg.grpo.task, tokenizer, graphdef, frozen, lora)
        g = self.g = cfg.grpo
        self.train = read_task(g.task, "train", g.train_prompts, g.digits, cfg.train.seed)
        if not self.train:
            raise ConfigError(f"grpo.task: {g.task} has no training prompt")
        self.prompts = [self.ids(e["prompt"]) for e in self.train]
        self.check_fits(self.prompts + self.held_prompts)
        self.sampler = ExampleSampler(_Count(len(self.train)), cfg.train.batch_size, cfg.train.seed)

        def score(params, frozen, tokens):
            args = (params, frozen, tokens[:, :-1])
            return -policy(*args, None, targets=tokens[:, 1:]), -reference(
                *args, targets=tokens[:, 1:]
            )

        self.score = jax.jit(score)

    def batch(self, step: int) -> dict:
        """This process's rows of the step's prompts: their indices in the training prompts."""
        rows = self.cfg.train.batch_size // jax.process_count()
        index = self.sampler.indices(step)
        start = jax.process_index() * rows
        return {"index": index[start : start + rows], "row": np.arange(start, start + rows)}

    def rollout(self, params, rows: dict, step: int) -> dict:
        """Sample the groups, score them and lay them out as the step's training batch."""
        g, seq_len = self.g.group_size, self.cfg.data.seq_len
        examples = [self.train[i] for i in rows["index"] for _ in range(g)]
        prompts = [self.prompts[i] for i in rows["index"] for _ in range(g)]
        samplings = [
            Sampling(self.g.temperature, self.g.top_k, seed=_seed(self.cfg.train.seed, step, r, j))
            for r in rows["row"]
            for j in range(g)
        ]
        completions = self.complete(params, prompts, samplings)
        rewards = self.rewards(examples, completions)
        tokens = np.full((len(prompts), seq_len + 1), self.tokenizer.pad_id, np.int32)
        mask = np.zeros((len(prompts), seq_len), np.float32)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            tokens[i, : len(p) + len(c)] = p + c
            mask[i, len(p) - 1 : len(p) - 1 + len(c)] = 1.0  # targets t: token t + 1
        old_logp, ref_logp = self.score(params, self.placed_frozen, jnp.asarray(tokens))
        return {
            "tokens": tokens,
            "mask": mask,
            "advantages": group_advantages(rewards, g),
            "rewards": rewards,
            "old_logp": np.asarray(old_logp),
            "ref_logp": np.asarray(ref_logp),
        }


class _Count:
    """What ExampleSampler needs of its examples: how many there are."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def _seed(seed: int, step: int, row: int, sample: int) -> int:
    """A completion's sampling seed: a function of the run's seed, the step and its place."""
    return int(np.random.SeedSequence([seed, step, int(row), sample]).generate_state(1)[0])


def build_stage(cfg: Config) -> Stage:
    model, tokenizer = load_base(cfg)
    lora = cfg.finetune.method == "lora"
    graphdef, params, frozen, apply, reference = with_reference(
        cfg, model, cfg.grpo.reference_quantize
    )
    rollouts = Rollouts(cfg, tokenizer, graphdef, frozen, lora, apply, reference)
    g = cfg.grpo
    m, seq_len = cfg.model, cfg.data.seq_len
    # per row: the updates' training FLOPs (LoRA: no base weight gradients) and two forwards
    # (the policy's and the reference's log-probabilities); generation is not counted
    train_flops = flops_per_token(m, seq_len, "frozen" if lora else "train")
    return Stage(
        name=f"grpo-{cfg.finetune.method}",
        graphdef=graphdef,
        params=params,
        frozen=frozen,
        loss_fn=partial(grpo_loss, apply, g),
        train_batch=rollouts.batch,
        eval_batch=None,
        flops_per_token=train_flops * g.updates_per_batch
        + 2 * flops_per_token(m, seq_len, "forward"),
        tokens_per_example=g.group_size * cfg.data.seq_len,
        tokenizer=tokenizer,
        export=partial(export_adapter, cfg, graphdef, frozen) if lora else None,
        perplexity=False,
        rollout=rollouts.rollout,
        updates_per_batch=g.updates_per_batch,
        evaluate=rollouts.evaluate,
    )


def grpo(cfg: Config, fresh: bool = False) -> RunResult:
    return run_training(cfg, build_stage(cfg), fresh=fresh)
