"""Optimizers beyond AdamW (Muon, Lion, Adafactor) and the warmup-stable-decay schedule.

Run: pytest tests/test_optimizers.py
"""

import os

import jax
import numpy as np
import optax
import pytest
from conftest import ROOT, restore_final_state
from flax import nnx

from pipeline.config import ConfigError, load_config, with_overrides
from pipeline.model import create_model
from pipeline.training.loop import run_training
from pipeline.training.metrics import read_metrics
from pipeline.training.pretrain import build_stage
from pipeline.training.train import make_optimizer, make_schedule, optimizer_labels


def _labels(model_cfg) -> dict[str, str]:
    _, params = nnx.split(create_model(model_cfg), nnx.Param)
    return {
        jax.tree_util.keystr(p): label
        for p, label in jax.tree_util.tree_leaves_with_path(optimizer_labels(params))
    }


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tiny_config, family):
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [f"model.family={family}"])
    labels = _labels(cfg.model)
    muon = {k for k, v in labels.items() if v == "muon"}
    adamw = {k for k, v in labels.items() if v == "adamw"}
    assert muon | adamw == set(labels)
    kinds = ["q", "k", "v", "o", "up", "down"] + (["gate"] if family == "llama" else [])
    for layer in range(tiny_config.model.num_layers):
        for kind in kinds:
            group = "mlp" if kind in ("up", "down", "gate") else "attn"
            assert f"['blocks'][{layer}]['{group}']['{kind}']['kernel'].value" in muon
    assert len(muon) == tiny_config.model.num_layers * len(kinds)
    assert all("kernel" in k and "blocks" in k for k in muon)
    for name in ("['embed']", "norm", "bias", "lm_head", "pos_embed"):
        assert not any(name in k for k in muon), name
    assert any("embed" in k for k in adamw) and any("norm" in k for k in adamw)
    if family == "llama":
        assert "['lm_head']['kernel'].value" in adamw  # the head: AdamW, as the recipes do


def _first_step(tiny_config, name):
    """The optimizer `name` at a constant lr of 0.01, no decay or clipping, and the parameters."""
    opt = with_overrides(
        tiny_config,
        optimizer={
            "name": name,
            "lr": 0.01,
            "weight_decay": 0.0,
            "clip_norm": None,
            "warmup_steps": 0,
            "schedule": "constant",
        },
    ).optimizer
    params = build_stage(tiny_config).params
    return make_optimizer(opt, 10, params)[0], params


def test_muon_orthogonalises_matrix_updates_and_leaves_the_rest_to_adamw(tiny_config):
    """One Muon step: a block's kernel moves by a near-orthogonal matrix (its singular values
    equal) at the configured RMS; an embedding moves by AdamW's first step, lr * sign(g)."""
    tx, params = _first_step(tiny_config, "muon")
    keys = iter(jax.random.split(jax.random.key(0), 100))
    grads = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype), params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)  # eager: op-by-op compiles
    flat = {jax.tree_util.keystr(p): u for p, u in jax.tree_util.tree_leaves_with_path(updates)}
    g = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(grads)}
    kernel = np.asarray(flat["['blocks'][0]['mlp']['up']['kernel'].value"])
    s = np.linalg.svd(kernel, compute_uv=False)
    assert s.max() / s.min() < 1.6  # Newton-Schulz's approximate orthogonalisation
    rms = np.sqrt(np.mean(kernel**2))
    assert rms == pytest.approx(0.01 * 0.2, rel=0.35)  # lr * muon_rms
    embed = np.asarray(flat["['embed']['embedding'].value"])
    expected = -0.01 * np.sign(np.asarray(g["['embed']['embedding'].value"]))
    np.testing.assert_allclose(embed, expected, rtol=1e-3, atol=1e-6)


def test_wsd_learning_rate_at_each_phase_boundary(tiny_config):
    def wsd(**changes):
        opt = with_overrides(
            tiny_config,
            optimizer={
                "lr": 1.0,
                "schedule": "wsd",
                "warmup_steps": 10,
                "decay_fraction": 0.2,
                "min_lr_ratio": 0.0,
                **changes,
            },
        ).optimizer
        return lambda steps: lambda t: float(make_schedule(opt, steps)(t))

    lr = wsd()(100)
    assert lr(0) == 0.0 and lr(5) == pytest.approx(0.5)  # warmup
    assert lr(10) == pytest.approx(1.0) and lr(80) == pytest.approx(1.0)  # stable
    assert lr(90) == pytest.approx(0.5) and lr(100) == pytest.approx(0.0)  # linear decay
    sqrt = wsd(decay_shape="1-sqrt")(100)
    assert sqrt(80) == pytest.approx(1.0) and sqrt(85) == pytest.approx(0.5)  # 1 - sqrt(1/4)
    assert sqrt(100) == pytest.approx(0.0)
    floor = wsd(min_lr_ratio=0.1)(100)
    assert floor(100) == pytest.approx(0.1) and floor(90) == pytest.approx(0.55)
    longer = wsd()(200)  # more train.steps: the stable phase goes on, the decay moves out
    assert longer(80) == longer(159) == pytest.approx(1.0) and longer(180) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="optimizer.decay_fraction"):
        load_config(None, ["optimizer.decay_fraction=0"])


def _run(tiny_config, tmp_path, run_name, **optimizer):
    return with_overrides(
        tiny_config,
        optimizer={"lr": 3e-3, **optimizer},
        train={
            "steps": 8,
            "log_every": 2,
            "eval_every": 4,
            "eval_batches": 1,
            "checkpoint_every": 4,
        },
        run={"progress": False, "dir": str(tmp_path / run_name)},
    )


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["muon", "lion"])
def test_exact_resume(tiny_config, tmp_path, name):
    whole = _run(tiny_config, tmp_path, "whole", name=name)
    split = _run(tiny_config, tmp_path, "split", name=name)
    run_training(whole, build_stage(whole))
    assert run_training(with_overrides(split, train={"stop_at": 4}), build_stage(split)).step == 4
    run_training(split, build_stage(split))
    losses = [
        [
            (r["step"], r.get("loss"), r.get("eval_loss"))
            for r in read_metrics(c.run.dir)
            if "loss" in r or "eval_loss" in r
        ]
        for c in (whole, split)
    ]
    assert losses[0] == losses[1]
    a, b = restore_final_state(whole), restore_final_state(split)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    train = [loss for _, loss, _ in losses[0] if loss is not None]
    assert train[-1] < train[0]


@pytest.mark.e2e
def test_adafactor_trains_and_an_optimizer_switch_on_resume_is_named(tiny_config, tmp_path):
    cfg = _run(tiny_config, tmp_path, "adafactor", name="adafactor", lr=1e-2)
    result = run_training(cfg, build_stage(cfg))
    train = [r["loss"] for r in read_metrics(cfg.run.dir) if "loss" in r]
    assert result.status == "finished" and train[-1] < train[0]
    longer = with_overrides(cfg, optimizer={"name": "lion"}, train={"steps": 12})
    with pytest.raises(Exception, match="optimizer.name: 'adafactor' -> 'lion'"):
        run_training(longer, build_stage(longer))


def test_lion_update_is_the_sign_of_its_interpolated_momentum(tiny_config):
    """Two steps: random gradients, then a fifth of their opposite. Lion's second update is
    -lr x sign(b1 x m + (1 - b1) x g) with m = (1 - b2) x g1, which here keeps the first
    step's direction at full size; AdamW would move 0.52 lr that way, a plain sign step the
    other way (so the test tells Lion from both)."""
    tx, params = _first_step(tiny_config, "lion")
    opt = tiny_config.optimizer
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    normal = [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    g1 = jax.tree.unflatten(tree, normal)
    g2 = jax.tree.map(lambda g: -0.2 * g, g1)
    update = jax.jit(tx.update)  # eager: op-by-op compiles
    first, state = update(g1, tx.init(params), params)
    second, _ = update(g2, state, params)
    for u1, u2, a, b in zip(*map(jax.tree.leaves, (first, second, g1, g2)), strict=True):
        np.testing.assert_allclose(np.asarray(u1), -0.01 * np.sign(a))
        expected = -0.01 * np.sign(opt.b1 * (1 - opt.b2) * a + (1 - opt.b1) * b)
        np.testing.assert_allclose(np.asarray(u2), expected)
        np.testing.assert_allclose(np.asarray(u2), -0.01 * np.sign(a))  # momentum wins
    assert isinstance(tx, optax.GradientTransformation)


@pytest.mark.e2e
def test_a_wsd_run_resumed_with_more_steps_stays_stable_longer(tiny_config, tmp_path):
    cfg = _run(
        tiny_config,
        tmp_path,
        "wsd",
        schedule="wsd",
        warmup_steps=2,
        decay_fraction=0.5,
        min_lr_ratio=0.0,
    )
    run_training(with_overrides(cfg, train={"stop_at": 4}), build_stage(cfg))  # of 8 steps
    longer = with_overrides(cfg, train={"steps": 16, "checkpoint_every": 8})
    run_training(longer, build_stage(longer))
    lr = {r["step"]: r["lr"] for r in read_metrics(cfg.run.dir) if "lr" in r}
    # 8 steps would decay from step 4; 16 decay from step 8 (step N logs the lr of update N-1)
    assert lr[6] == lr[8] == pytest.approx(3e-3)
    assert lr[12] == pytest.approx(3e-3 * (1 - 3 / 8)) and lr[16] < lr[14] < lr[12]
