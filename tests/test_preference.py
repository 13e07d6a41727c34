"""Preference tuning (`pipeline dpo`): the losses, the reference, learning, resume, data errors.
Run: pytest tests/test_preference.py"""

import json
import math
import os
import string
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, restore_final_state
from flax import nnx

from pipeline.config import ConfigError, DpoConfig, ModelConfig, load_config, with_overrides
from pipeline.inference.runs import load_model
from pipeline.model import create_model
from pipeline.training.metrics import read_metrics
from pipeline.training.preference import (
    build_stage,
    docstring_pairs,
    dpo,
    frozen_copy,
    preference_loss,
    read_pairs,
    shuffled_pairs,
)
from pipeline.training.train import token_losses

TOKENS = jnp.array([[257, 104, 101, 108, 108, 111, 32, 119, 111, 114]])


def _write_pairs(path: Path, pairs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def _config(base_run, tmp_path, data, *overrides):
    return load_config(
        os.path.join(ROOT, "configs", "dpo_tiny.yaml"),
        [
            f"init.from={base_run}",
            f"run.dir={tmp_path / 'dpo'}",
            f"dpo.data={data}",
            "run.progress=false",
            "data.seq_len=48",
            "train.steps=6",
            "train.checkpoint_every=3",
            "train.eval_every=3",
            "train.log_every=3",
            *overrides,
        ],
    )


def _echo_pairs(n: int, seed: int) -> list[dict]:
    """A synthetic preference: the prompt's word repeated in lower case is preferred to the
    same word in upper case (a style held-out words share, not their letters)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        word = "".join(rng.choice(list(string.ascii_lowercase), size=6))
        pairs.append({"prompt": f"repeat {word}", "chosen": word, "rejected": word.upper()})
    return pairs


def test_identical_replies_give_log_2_and_no_gradient(tiny_run, tmp_path):
    same = [{"prompt": f"p{i}", "chosen": f"reply {i}", "rejected": f"reply {i}"} for i in range(8)]
    data = _write_pairs(tmp_path / "same.jsonl", same)
    stage = build_stage(_config(tiny_run, tmp_path, data, "dpo.beta=50", "finetune.method=full"))
    batch = stage.train_batch(0)
    # move the policy away from the reference: the loss must still be log 2 for identical replies
    params = jax.tree.map(
        lambda x: x + 0.1 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), stage.params
    )
    (loss, (count, extras)), grads = jax.jit(  # jitted: eager dispatch compiles op by op
        jax.value_and_grad(
            lambda p: (lambda s, c, e: (s, (c, e)))(*stage.loss_fn(p, stage.frozen, batch, None)),
            has_aux=True,
        )
    )(params)
    np.testing.assert_allclose(loss / count, math.log(2), rtol=1e-6)
    assert float(extras["reward_margin"]) == 0.0 and float(extras["reward_accuracy"]) == count / 2
    # the gradient of one reply's log-probability, scaled by beta, is what cancels: what is
    # left is float32 rounding, orders of magnitude below it
    one_side = jax.jit(
        jax.grad(lambda p: stage.loss_fn(p, stage.frozen, batch, None)[2]["chosen_logp"] * 50)
    )(params)
    largest = lambda tree: max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(tree))  # noqa: E731
    assert largest(grads) < 1e-5 * largest(one_side), (largest(grads), largest(one_side))


def test_losses_equal_hand_computed_on_a_two_token_vocabulary():
    cfg = ModelConfig(vocab_size=2, num_layers=1, embed_dim=8, num_heads=2, max_seq_len=8)
    policy_model, reference_model = create_model(cfg, seed=1), create_model(cfg, seed=2)
    graphdef, params = nnx.split(policy_model)
    frozen, reference = frozen_copy(reference_model, "none")
    tokens = np.array([[[0, 1, 1, 0, 1], [0, 0, 1, 1, 1]], [[1, 1, 0, 0, 0], [1, 0, 0, 1, 0]]])
    mask = np.array([[[0, 1, 1, 1], [0, 0, 1, 1]], [[0, 0, 1, 1], [0, 1, 1, 0]]], np.float32)

    def policy(params, frozen, tokens, rng, targets=None):
        model = nnx.merge(graphdef, params)
        return model(tokens)[0] if targets is None else token_losses(model, tokens, targets)

    def seq_logp(model, row, m):  # by hand: log-softmax of the logits, the targets picked
        logits = np.asarray(model(jnp.asarray(row[None, :-1]))[0][0], np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        picked = logp[np.arange(len(row) - 1), row[1:]]
        return float((picked * m).sum()), float(m.sum())

    beta, gamma = 0.7, 0.3
    for loss_type in ("sigmoid", "ipo", "simpo"):
        dcfg = DpoConfig(loss=loss_type, beta=beta, simpo_gamma=gamma)
        batch = {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}
        loss = jax.jit(lambda *a, dcfg=dcfg: preference_loss(policy, reference, dcfg, *a, None))
        total, count, extras = loss(params, frozen, batch)
        expected, margins = [], []
        for b in range(2):
            (pc, nc), (pr, nr) = (seq_logp(policy_model, tokens[b, j], mask[b, j]) for j in (0, 1))
            (rc, _), (rr, _) = (seq_logp(reference_model, tokens[b, j], mask[b, j]) for j in (0, 1))
            if loss_type == "sigmoid":
                h = beta * ((pc - rc) - (pr - rr))
                expected.append(math.log1p(math.exp(-h)))
            elif loss_type == "ipo":
                h = (pc - rc) / nc - (pr - rr) / nr
                expected.append((h - 1 / (2 * beta)) ** 2)
            else:
                h = beta * (pc / nc - pr / nr)
                expected.append(math.log1p(math.exp(-(h - gamma))))
                margins.append(h)
        assert float(count) == 2
        np.testing.assert_allclose(float(total), sum(expected), rtol=1e-5)
        kl = 0.0  # by hand: KL over the 2 tokens at each reply position, averaged per pair
        for b in range(2):
            terms = []
            for j in range(2):
                row = jnp.asarray(tokens[b, j][None, :-1])
                logits = [
                    np.asarray(m(row)[0][0], np.float64) for m in (policy_model, reference_model)
                ]
                lp, lq = (x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in logits)
                per = (np.exp(lp) * (lp - lq)).sum(-1)
                terms += list(per[mask[b, j] > 0])
            kl += np.mean(terms)
        np.testing.assert_allclose(float(extras["kl"]), kl, rtol=1e-4)
        if loss_type == "simpo":
            np.testing.assert_allclose(float(extras["reward_margin"]), sum(margins), rtol=1e-5)


@pytest.mark.e2e
def test_held_out_preference_accuracy_rises_from_half_to_over_90_percent(tiny_run, tmp_path):
    data = _write_pairs(tmp_path / "echo.jsonl", _echo_pairs(400, 0))
    cfg = _config(
        tiny_run,
        tmp_path,
        data,
        "train.steps=60",
        "train.eval_every=60",
        "train.checkpoint_every=60",
        "train.log_every=10",
        "train.batch_size=16",
        "optimizer.lr=1e-2",
        "lora.targets=[q,k,v,o,up,down]",
    )
    result = dpo(cfg)
    before, after = result.initial_eval, result.eval
    assert before["eval_reward_accuracy"] == 0.5  # the policy is the reference: every pair ties
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert after["eval_reward_accuracy"] >= 0.9, after
    assert after["eval_reward_margin"] > 0 and after["eval_kl"] > 0
    assert after["eval_loss"] < before["eval_loss"]


@pytest.mark.e2e
def test_full_dpo_with_a_frozen_reference_resumes_exactly(tiny_run, tmp_path):
    data = _write_pairs(tmp_path / "echo.jsonl", _echo_pairs(64, 1))
    whole = _config(tiny_run, tmp_path / "a", data, "finetune.method=full")
    split = _config(tiny_run, tmp_path / "b", data, "finetune.method=full")
    dpo(whole)
    assert dpo(with_overrides(split, train={"stop_at": 3})).step == 3
    dpo(split)
    records = [
        [r for r in read_metrics(c.run.dir) if "loss" in r or "eval_loss" in r]
        for c in (whole, split)
    ]
    strip = lambda rs: [
        {k: v for k, v in r.items() if "time" not in k and "tokens_per" not in k and k != "mfu"}
        for r in rs
    ]  # noqa: E731
    assert strip(records[0]) == strip(records[1])
    a, b = (load_model(c.run.dir)[1](TOKENS)[0] for c in (whole, split))
    np.testing.assert_array_equal(a, b)


@pytest.mark.e2e  # a whole stage or a loaded engine: make test, not test-fast
def test_lora_dpo_over_a_lora_fine_tune_loads_as_both_adapters(tiny_run, tmp_path):
    from pipeline.training.finetune import finetune

    sft = load_config(
        os.path.join(ROOT, "configs", "finetune_tiny.yaml"),
        [
            f"init.from={tiny_run}",
            f"run.dir={tmp_path / 'sft'}",
            "run.progress=false",
            "train.steps=2",
            "train.eval_at_start=false",
            "finetune.max_examples=100",
            "optimizer.lr=1e-2",
        ],
    )
    finetune(sft)
    data = _write_pairs(tmp_path / "echo.jsonl", _echo_pairs(32, 2))
    cfg = _config(sft.run.dir, tmp_path, data, "train.steps=2", "optimizer.lr=1e-2")
    dpo(cfg)
    _, loaded, _ = load_model(cfg.run.dir)  # the SFT adapters merged, the DPO adapters on top
    stage = build_stage(cfg)
    state = restore_final_state(cfg, stage)
    trained, _ = nnx.merge(stage.graphdef, state["params"], state["frozen"])(TOKENS)
    np.testing.assert_allclose(loaded(TOKENS)[0], trained, atol=1e-5)
    assert any("reward_accuracy" in r for r in read_metrics(cfg.run.dir))


def test_embedded_pairs_prefer_the_functions_own_docstring():
    examples = [
        {
            "messages": [
                {"role": "user", "content": f"code {i}"},
                {"role": "assistant", "content": f"summary {i}"},
            ],
            "where": "m",
        }
        for i in range(5)
    ]
    pairs = docstring_pairs(examples)
    assert len(pairs) == 5
    for p in pairs:
        i = p["messages"][0]["content"].split()[-1]
        assert p["chosen"] == f"summary {i}" and p["rejected"] != p["chosen"]
        assert p["rejected"].startswith("summary ")


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "not valid JSON"),
        ('{"chosen": "a", "rejected": "b"}', "needs a string 'prompt'"),
        ('{"prompt": "p", "chosen": "a"}', "'rejected' must be a non-empty string"),
        ('{"prompt": "p", "chosen": "", "rejected": "b"}', "'chosen' must be a non-empty"),
    ],
)
def test_a_bad_pair_names_its_line(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=message) as err:
        read_pairs(DpoConfig(data=str(path)))
    assert f"{path}:2" in str(err.value)


def test_conversational_replies_are_accepted(tmp_path):
    path = _write_pairs(
        tmp_path / "pairs.jsonl",
        [
            {
                "messages": [{"role": "user", "content": f"q{i}"}],
                "chosen": [{"role": "assistant", "content": "good"}],
                "rejected": [{"role": "assistant", "content": "bad"}],
            }
            for i in range(4)
        ],
    )
    train, held = read_pairs(DpoConfig(data=str(path), val_fraction=0.25))
    assert len(train) == 3 and len(held) == 1
    assert train[0]["chosen"] == "good" and train[0]["rejected"] == "bad"


@pytest.mark.e2e
def test_pipeline_sweep_runs_dpo_points(tiny_run, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.experiments import summarize

    data = _write_pairs(tmp_path / "echo.jsonl", _echo_pairs(32, 3))
    root = tmp_path / "runs"
    args = [
        "sweep",
        "--config",
        os.path.join(ROOT, "configs", "dpo_tiny.yaml"),
        "--stage",
        "dpo",
        "--root",
        str(root),
        f"init.from={tiny_run}",
        f"dpo.data={data}",
        "data.seq_len=48",
        "train.steps=2",
        "run.progress=false",
        "--grid",
        "dpo.beta=0.1,0.5",
    ]
    assert main(args) == 0
    for beta in ("0.1", "0.5"):
        run = root / f"dpo_tiny-beta={beta}"
        assert summarize(run)["status"] == "finished"
        assert json.loads((run / "state.json").read_text())["stage"] == "dpo-lora"
        assert any("eval_reward_accuracy" in r for r in read_metrics(run))


def test_shuffled_pairs_reject_the_same_words_in_another_order():
    examples = [
        {
            "messages": [
                {"role": "user", "content": f"code {i}"},
                {"role": "assistant", "content": f"return the {i} items in order"},
            ],
            "where": "m",
        }
        for i in range(4)
    ] + [
        {
            "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "ab"}],
            "where": "m",
        }
    ]
    pairs = shuffled_pairs(examples)
    assert len(pairs) == 4  # a reply under 3 words has no other order worth preferring against
    for p in pairs:
        assert p["rejected"] != p["chosen"]
        assert sorted(p["rejected"].split()) == sorted(p["chosen"].split())
    assert shuffled_pairs(examples) == pairs  # a fixed order


def test_an_int8_reference_is_a_quarter_of_the_policy_and_close_to_it(tiny_run, tmp_path):
    data = _write_pairs(tmp_path / "echo.jsonl", _echo_pairs(16, 4))
    stage = build_stage(
        _config(tiny_run, tmp_path, data, "finetune.method=full", "dpo.reference_quantize=int8")
    )
    assert np.dtype("int8") in {x.dtype for x in jax.tree.leaves(stage.frozen["reference"])}
    loss = jax.jit(lambda *a: stage.loss_fn(*a, None))  # eager: op-by-op compiles
    total, count, extras = loss(stage.params, stage.frozen, stage.train_batch(0))
    # the policy is the float model, the reference its int8 copy: nearly, not exactly, equal
    assert abs(float(total / count) - math.log(2)) < 0.01
    assert 0 < float(extras["kl"] / count) < 1e-3
