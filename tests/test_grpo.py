"""GRPO (`pipeline grpo`): advantages, the objective, the tasks, rollouts, resume, learning.
Run: pytest tests/test_grpo.py"""

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

from pipeline.config import ConfigError, GrpoConfig, load_config, with_overrides
from pipeline.inference.runs import load_model
from pipeline.training.grpo import build_stage, group_advantages, grpo, grpo_loss
from pipeline.training.metrics import read_metrics
from pipeline.training.tasks import exact_match, held_out, load_reward, task_examples

TOKENS = jnp.array([[257, 104, 101, 108, 108, 111, 32, 119, 111, 114]])


def _config(base_run, tmp_path, *overrides):
    return load_config(
        os.path.join(ROOT, "configs", "grpo_tiny.yaml"),
        [f"init.from={base_run}", f"run.dir={tmp_path / 'grpo'}", "run.progress=false", *overrides],
    )


def constant_reward(prompt, completion, example):
    return 1.0


def digit_reward(prompt, completion, example):
    """A graded reward even an untrained model earns some of: the share of digits."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def test_advantages_sum_to_zero_within_each_group():
    rewards = np.array([1, 0, 0, 1, 0, 0, 0, 0, 3, 3, 3, 3], np.float32)
    adv = group_advantages(rewards, 4)
    np.testing.assert_allclose(adv.reshape(3, 4).sum(1), 0, atol=1e-5)
    assert np.all(adv[8:] == 0)  # a group that agrees teaches nothing
    assert adv[0] > 0 > adv[1] and adv[0] == adv[3]
    np.testing.assert_allclose(adv[:4].std(), 1, atol=1e-3)  # normalised by the group's std


def test_the_objective_equals_its_definition():
    cfg = GrpoConfig(clip_eps=0.2, kl_beta=0.1)
    logp = jnp.log(jnp.array([[0.5, 0.2, 0.9], [0.3, 0.6, 0.1]]))

    def policy(params, frozen, tokens, rng, targets):
        return -logp

    batch = {
        "tokens": jnp.zeros((2, 4), jnp.int32),
        "mask": jnp.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]),
        "old_logp": jnp.log(jnp.array([[0.4, 0.2, 0.5], [0.3, 0.4, 0.2]])),
        "ref_logp": jnp.log(jnp.array([[0.5, 0.1, 0.5], [0.2, 0.6, 0.3]])),
        "advantages": jnp.array([1.5, -0.5]),
        "rewards": jnp.array([1.0, 0.0]),
    }
    total, count, extras = grpo_loss(policy, cfg, None, None, batch, None)
    expected, clipped_tokens = 0.0, 0.0
    for i in range(2):
        terms, clips = [], []
        for t in range(3):
            if not batch["mask"][i, t]:
                continue
            ratio = float(jnp.exp(logp[i, t] - batch["old_logp"][i, t]))
            a = float(batch["advantages"][i])
            surrogate = min(ratio * a, float(np.clip(ratio, 0.8, 1.2)) * a)
            r = float(batch["ref_logp"][i, t] - logp[i, t])
            terms.append(surrogate - 0.1 * (np.exp(r) - 1 - r))
            clips.append(float(not 0.8 <= ratio <= 1.2))
        expected -= np.mean(terms)
        clipped_tokens += np.mean(clips)
    assert float(count) == 2
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    np.testing.assert_allclose(float(extras["clip_fraction"]), clipped_tokens, rtol=1e-6)


def test_tasks_keep_held_out_prompts_out_of_training_and_reward_exact_answers():
    for task in ("addition", "reversal"):
        train = task_examples(task, "train", 500, 2)
        held = task_examples(task, "held_out", 50, 2)
        assert len(train) == 500 and len(held) == 50
        assert not {e["prompt"] for e in train} & {e["prompt"] for e in held}
        assert all(held_out(e["prompt"]) for e in held)
    example = task_examples("addition", "train", 1, 2)[0]
    a, b = map(int, example["prompt"].removeprefix("What is ").removesuffix("?").split("+"))
    assert example["answer"] == str(a + b)
    assert exact_match(example["prompt"], f" {a + b}\n", example) == 1.0
    assert exact_match(example["prompt"], str(a + b + 1), example) == 0.0
    word = task_examples("reversal", "train", 1, 1)[0]
    assert word["answer"] == word["prompt"][::-1]


def test_a_reward_function_is_named_module_colon_function():
    assert load_reward("test_grpo:constant_reward") is constant_reward
    assert load_reward(None) is exact_match
    with pytest.raises(ConfigError, match="must be module:function"):
        load_reward("nocolon")
    with pytest.raises(ConfigError, match="cannot import"):
        load_reward("no_such_module_here:f")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        load_reward("test_grpo:nope")


def test_rollouts_mask_the_completions_and_depend_on_the_step_alone(tiny_run, tmp_path):
    cfg = _config(tiny_run, tmp_path)
    stage = build_stage(cfg)
    rows = stage.train_batch(3)
    a = stage.rollout(stage.params, rows, 3)
    b = stage.rollout(stage.params, rows, 3)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the seeds are a function of the step
    c = stage.rollout(stage.params, rows, 4)
    assert not np.array_equal(a["tokens"], c["tokens"])
    g = cfg.grpo.group_size
    assert a["tokens"].shape == (cfg.train.batch_size * g, cfg.data.seq_len + 1)
    tok = stage.tokenizer
    for row, mask in zip(a["tokens"], a["mask"], strict=True):
        completion = row[1:][mask > 0].tolist()  # the targets the loss counts
        assert 1 <= len(completion) <= cfg.grpo.max_new_tokens
        prompt_end = int(np.argmax(mask))  # the last prompt token: the assistant marker
        assert row[prompt_end] == tok.role_ids["assistant"]
        assert tok.end_id not in completion[:-1]
    # under the policy that sampled them, the first update's ratio is 1
    np.testing.assert_allclose(a["old_logp"] * a["mask"], a["ref_logp"] * a["mask"], atol=1e-5)


@pytest.mark.e2e
def test_a_constant_reward_leaves_the_policy_where_it_was(tiny_run, tmp_path):
    """Every advantage is 0, and the KL term's gradient is 0 at the reference: nothing moves."""
    cfg = _config(
        tiny_run,
        tmp_path,
        "grpo.reward=test_grpo:constant_reward",
        "optimizer.weight_decay=0",
        "optimizer.lr=1e-2",
        "finetune.method=full",
    )
    result = grpo(cfg)
    assert result.eval["eval_reward"] == 1.0
    metrics = [r for r in read_metrics(cfg.run.dir) if "loss" in r]
    assert all(r["grad_norm"] == 0.0 and r["kl"] == 0.0 for r in metrics)
    _, before, _ = load_model(tiny_run)
    _, after, _ = load_model(cfg.run.dir)
    np.testing.assert_array_equal(before(TOKENS)[0], after(TOKENS)[0])


@pytest.mark.e2e
def test_grpo_resumes_exactly(tiny_run, tmp_path):
    overrides = ("optimizer.lr=1e-2", "train.log_every=3", "grpo.reward=test_grpo:digit_reward")
    whole = _config(tiny_run, tmp_path / "a", *overrides)
    split = _config(tiny_run, tmp_path / "b", *overrides)
    grpo(whole)
    assert grpo(with_overrides(split, train={"stop_at": 3})).step == 3
    grpo(split)
    keep = ("loss", "reward", "kl", "clip_fraction", "grad_norm", "eval_pass_rate", "eval_reward")
    records = [
        [{k: r[k] for k in keep if k in r} for r in read_metrics(c.run.dir)] for c in (whole, split)
    ]
    assert [r for r in records[0] if r] == [r for r in records[1] if r]
    assert any(r.get("grad_norm", 0) > 0 for r in records[0])  # it learned something
    a, b = ((Path(c.run.dir) / "adapter_model.safetensors").read_bytes() for c in (whole, split))
    assert a == b
    assert any(r.get("rollout_s", 0) > 0 and "update_s" in r for r in read_metrics(whole.run.dir))


@pytest.mark.e2e
def test_fine_tuning_on_a_task_reports_its_pass_rate_and_stops_when_told(tiny_run, tmp_path):
    """`finetune.data: task:NAME` evaluates the held-out pass rate beside the loss;
    `train.stop_when` finishes the run at the first evaluation that meets it, a resumed run
    that meets it already does not train, and an unknown metric is named with the known ones."""
    from pipeline.training.finetune import finetune
    from pipeline.training.train import TrainingError

    def config(name, *overrides):
        return _config(
            tiny_run,
            tmp_path / name,
            "finetune.data=task:addition",
            "train.steps=12",
            "train.eval_every=4",
            "train.checkpoint_every=12",
            *overrides,
        )

    cfg = config("met", "train.stop_when=eval_pass_rate<=1")  # met at the first evaluation
    result = finetune(cfg)
    assert result.status == "finished" and result.step == 4
    assert {"eval_loss", "eval_pass_rate", "eval_reward"} <= set(result.eval)
    assert (Path(cfg.run.dir) / "adapter_model.safetensors").is_file()  # finished: exported
    state = json.loads((Path(cfg.run.dir) / "state.json").read_text())
    assert state["status"] == "finished" and state["step"] == 4
    rows = len(read_metrics(cfg.run.dir))
    again = finetune(cfg)  # resumed: the target is met at its evaluation; nothing trained
    assert again.step == 4
    assert not [r for r in read_metrics(cfg.run.dir)[rows:] if "loss" in r]

    never = finetune(config("never", "train.stop_when=eval_loss <= -1"))
    assert never.step == 12
    with pytest.raises(TrainingError, match="no 'eval_accuracy'.*eval_loss.*eval_pass_rate"):
        finetune(config("unknown", "train.stop_when=eval_accuracy>=0.5"))
    with pytest.raises(ConfigError, match="train.stop_when"):
        config("bad", "train.stop_when=eval_loss == 2")


def test_a_sequence_too_short_for_the_prompts_is_named(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="data.seq_len: 12 is shorter"):
        build_stage(_config(tiny_run, tmp_path, "data.seq_len=12"))


def test_the_grpo_config_is_checked(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="grpo.group_size"):
        _config(tiny_run, tmp_path, "grpo.group_size=1")
    with pytest.raises(ConfigError, match="grpo.task"):
        build_stage(_config(tiny_run, tmp_path, "grpo.task=subtraction"))


@pytest.mark.e2e  # a whole stage or a loaded engine: make test, not test-fast
def test_sweep_runs_grpo(tiny_run, tmp_path):
    from pipeline.cli import main

    root = tmp_path / "runs"
    args = [
        "sweep",
        "--config",
        os.path.join(ROOT, "configs", "grpo_tiny.yaml"),
        "--stage",
        "grpo",
        "--root",
        str(root),
        f"init.from={tiny_run}",
        "train.steps=2",
        "run.progress=false",
        "--grid",
        "grpo.kl_beta=0,0.1",
    ]
    assert main(args) == 0
    for beta in ("0", "0.1"):
        run = root / f"grpo_tiny-kl_beta={beta}"
        assert json.loads((run / "state.json").read_text())["stage"] == "grpo-lora"
        assert any("eval_pass_rate" in r for r in read_metrics(run))


@pytest.mark.slow
def test_make_grpo_raises_held_out_exact_match_by_30_points(tmp_path, optimized):
    """`make grpo`'s chain with its configs as shipped (its run directories aside): a byte-level
    base, LoRA on the reversal task's training words until a fifth of the held-out words come
    out reversed (train.stop_when), then GRPO: greedy exact match on the held-out words rises by
    at least 30 points."""
    from pipeline.training.finetune import finetune
    from pipeline.training.pretrain import pretrain

    def config(name, *overrides):
        path = os.path.join(ROOT, "configs", f"{name}.yaml")
        dirs = [f"run.dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}"]
        return load_config(path, [*dirs, "run.progress=false", *overrides])

    pretrain(config("grpo_base"))
    sft = finetune(config("sft_reversal", f"init.from={tmp_path / 'grpo_base'}"))
    assert sft.status == "finished" and sft.eval["eval_pass_rate"] >= 0.2
    assert sft.step < 400  # stopped by its pass rate
    result = grpo(config("grpo", f"init.from={tmp_path / 'sft_reversal'}"))
    before, after = result.initial_eval["eval_pass_rate"], result.eval["eval_pass_rate"]
    print(f"fine-tuning stopped at step {sft.step}; GRPO: {before:.3f} -> {after:.3f}")
    assert after - before >= 0.30
