"""The training step and loop, in process: parallel equivalence, accumulation, resume, errors.

Run: pytest tests/test_train.py
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT, restore_final_state

from pipeline.checkpoint import CheckpointError, checksums, mismatches
from pipeline.config import with_overrides
from pipeline.training.loop import run_training
from pipeline.training.metrics import read_metrics
from pipeline.training.parallel import PmapStrategy
from pipeline.training.pretrain import build_stage
from pipeline.training.train import (
    TrainingError,
    create_trainer,
    decay_mask,
    make_optimizer,
    make_schedule,
    wait_for_previous_step,
)


def _run_steps(cfg, num_devices, steps=3):
    """Train `steps` steps on `num_devices` devices; return the losses and final parameters."""
    stage = build_stage(cfg)
    trainer = create_trainer(stage, cfg, strategy=PmapStrategy(num_devices))
    strategy, train_fn = trainer.strategy, trainer.train_step
    state = strategy.replicate(trainer.state)
    losses = []
    for step in range(steps):
        state, metrics = train_fn(state, strategy.shard_batch(stage.train_batch(step)))
        losses.append(float(metrics["loss"][0]))
    return np.array(losses), jax.device_get(strategy.unreplicate(state)["params"])


def _max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def test_four_devices_equal_one(tiny_config):
    assert jax.local_device_count() == 4
    losses1, params1 = _run_steps(tiny_config, 1)
    losses4, params4 = _run_steps(tiny_config, 4)
    np.testing.assert_allclose(losses1, losses4, atol=1e-5)
    assert _max_diff(params1, params4) <= 1e-5
    assert losses1[-1] < losses1[0]


def test_accumulated_micro_batches_equal_one_large_batch(tiny_config):
    losses1, params1 = _run_steps(tiny_config, 2)
    accum = with_overrides(tiny_config, train={"grad_accum": 4})
    losses4, params4 = _run_steps(accum, 2)
    np.testing.assert_allclose(losses1, losses4, atol=1e-5)
    assert _max_diff(params1, params4) <= 1e-5


def test_on_cpu_the_next_step_waits_for_the_previous_one():
    """XLA's CPU client reserves a dispatched program's temporaries at once: the loop keeps one
    step in flight (`small` with 8 steps dispatched ahead: 1.5x the peak RSS)."""

    @jax.jit
    def slow(x):  # ~0.1-0.5 s here: still running when the call returns
        return jax.lax.fori_loop(0, 200, lambda i, y: jnp.tanh(y @ x), x)

    x = jnp.eye(512) * 0.5
    running = slow(x)
    assert not running.is_ready()  # dispatch is asynchronous, so the wait below is what waits
    pending = [slow(x)]
    wait_for_previous_step(pending)
    assert pending[-1].is_ready()
    wait_for_previous_step([])  # nothing dispatched yet: nothing to wait for


def test_schedule_warmup_then_cosine(tiny_config):
    opt = with_overrides(
        tiny_config, optimizer={"lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1}
    ).optimizer
    schedule = make_schedule(opt, 110)
    assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(60)) == pytest.approx(0.55, abs=1e-3)  # half way down the cosine
    assert float(schedule(110)) == pytest.approx(0.1)
    linear = make_schedule(
        with_overrides(
            tiny_config,
            optimizer={"lr": 1.0, "warmup_steps": 0, "schedule": "linear", "min_lr_ratio": 0.0},
        ).optimizer,
        100,
    )
    assert float(linear(50)) == pytest.approx(0.5)
    constant = make_schedule(
        with_overrides(
            tiny_config, optimizer={"schedule": "constant", "warmup_steps": 0}
        ).optimizer,
        100,
    )
    assert float(constant(99)) == pytest.approx(tiny_config.optimizer.lr)


def test_no_weight_decay_on_norms_biases_embeddings(tiny_config):
    params = build_stage(tiny_config).params
    flat = {
        jax.tree_util.keystr(p): m
        for p, m in jax.tree_util.tree_leaves_with_path(decay_mask(params))
    }
    decayed = {k for k, m in flat.items() if m}
    assert decayed and all("kernel" in k for k in decayed)
    assert not any("embed" in k or "norm" in k or "bias" in k for k in decayed)
    # a zero gradient leaves an undecayed parameter unchanged and shrinks a decayed one
    tx, _ = make_optimizer(tiny_config.optimizer, 10, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    moved = {
        jax.tree_util.keystr(p)
        for p, d in jax.tree_util.tree_leaves_with_path(
            jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new)
        )
        if d
    }
    assert moved <= decayed


def _tiny_run(tiny_config, **train):
    return with_overrides(
        tiny_config,
        train={
            "steps": 12,
            "log_every": 2,
            "eval_every": 6,
            "eval_batches": 1,
            "checkpoint_every": 4,
            **train,
        },
        run={"progress": False},
    )


@pytest.mark.e2e
def test_resume_is_bit_identical(tiny_config, tmp_path):
    whole = with_overrides(_tiny_run(tiny_config), run={"dir": str(tmp_path / "whole")})
    split = with_overrides(_tiny_run(tiny_config), run={"dir": str(tmp_path / "split")})
    assert run_training(whole, build_stage(whole)).status == "finished"
    first = run_training(with_overrides(split, train={"stop_at": 6}), build_stage(split))
    assert first.status.startswith("interrupted") and first.step == 6
    again = run_training(with_overrides(split, train={"stop_at": 6}), build_stage(split))
    assert again.step == 6 and again.status.startswith("interrupted")  # nothing to do
    assert run_training(split, build_stage(split)).step == 12

    def losses(cfg):
        return [
            (r["step"], r.get("loss"), r.get("eval_loss"))
            for r in read_metrics(cfg.run.dir)
            if "loss" in r or "eval_loss" in r
        ]

    assert losses(whole) == losses(split)  # the same floats, not merely close
    a, b = restore_final_state(whole), restore_final_state(split)
    assert int(a["step"]) == int(b["step"]) == 12
    jax.tree.map(np.testing.assert_array_equal, a, b)
    train_losses = [r["loss"] for r in read_metrics(whole.run.dir) if "loss" in r]
    assert train_losses[-1] < train_losses[0]


@pytest.mark.e2e
def test_run_directory_contents(tiny_config):
    cfg = _tiny_run(tiny_config)
    run_training(cfg, build_stage(cfg))
    names = {p.name for p in Path(cfg.run.dir).iterdir()}
    assert {
        "config.yaml",
        "metrics.jsonl",
        "checkpoints",
        "tokenizer.json",
        "tensorboard",
        "loss.png",
        "state.json",
    } <= names
    records = read_metrics(cfg.run.dir)
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8, 10, 12]
    assert all(
        {"lr", "tokens_per_sec", "grad_norm", "mfu", "step_time_s"} <= r.keys() for r in logged
    )
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert all(r["eval_bits_per_byte"] == pytest.approx(r["eval_loss"] / np.log(2)) for r in evals)
    assert any("compile_time_s" in r for r in records)
    kept = sorted(
        int(p.name) for p in (Path(cfg.run.dir) / "checkpoints").iterdir() if p.name.isdigit()
    )
    assert kept == [4, 8, 12]  # keep_checkpoints=3


@pytest.mark.e2e
def test_refuses_other_model_and_broken_checkpoints(tiny_config):
    cfg = _tiny_run(tiny_config, steps=4)
    run_training(cfg, build_stage(cfg))
    wider = with_overrides(cfg, model={"embed_dim": 64})
    with pytest.raises(CheckpointError, match="different model.*embed_dim.*--fresh"):
        run_training(wider, build_stage(wider))
    assert run_training(wider, build_stage(wider), fresh=True).step == 4
    ckpt = Path(cfg.run.dir) / "checkpoints" / "4" / "state"
    for f in ckpt.rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    longer = with_overrides(wider, train={"steps": 8})
    with pytest.raises(CheckpointError, match="no checkpoint can be restored.*step 4.*--fresh"):
        run_training(longer, build_stage(longer))


def _largest_file(folder: Path) -> Path:
    return max((f for f in folder.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


def _damage(checkpoints: Path, damage: str) -> None:
    """Bit rot (a few flipped bytes), a torn write (half a file) or arrays that read cleanly but
    are not the ones written (checkpoint 4's arrays under checkpoint 8's record)."""
    if damage == "swap":
        shutil.rmtree(checkpoints / "8" / "state")
        shutil.copytree(checkpoints / "4" / "state", checkpoints / "8" / "state")
        return
    data = _largest_file(checkpoints / "8")
    raw = bytearray(data.read_bytes())
    if damage == "flip":  # compressed chunks: orbax may fail to read them or read other numbers
        raw[len(raw) // 2 : len(raw) // 2 + 4] = bytes(b ^ 0xFF for b in raw[len(raw) // 2 :][:4])
    else:
        raw = raw[: len(raw) // 2]
    data.write_bytes(bytes(raw))


@pytest.mark.e2e
@pytest.mark.parametrize("damage", ["flip", "truncate", "swap"])
def test_a_corrupt_latest_checkpoint_is_set_aside_and_an_intact_one_resumed(
    tiny_config, tmp_path, caplog, damage
):
    whole = with_overrides(_tiny_run(tiny_config), run={"dir": str(tmp_path / "whole")})
    split = with_overrides(_tiny_run(tiny_config), run={"dir": str(tmp_path / "split")})
    run_training(whole, build_stage(whole))
    run_training(with_overrides(split, train={"stop_at": 8}), build_stage(split))
    _damage(Path(split.run.dir) / "checkpoints", damage)
    with caplog.at_level("WARNING", logger="pipeline.checkpoint"):
        assert run_training(split, build_stage(split)).step == 12
    warned = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(warned) == 1 and "checkpoint 8" in warned[0] and "checkpoint 4" in warned[0]
    if damage == "swap":  # orbax reads them without a word: only the checksums can tell
        assert "checksum mismatch" in warned[0]
    assert (Path(split.run.dir) / "corrupt" / "8").is_dir()
    a, b = restore_final_state(whole), restore_final_state(split)
    jax.tree.map(np.testing.assert_array_equal, a, b)  # resumed from step 4, the same run


def test_checksums_name_the_arrays_that_changed():
    tree = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "step": np.int32(3)}
    recorded = checksums(tree)
    assert set(recorded) == {"params/w", "step"}
    assert mismatches(tree, recorded) == []
    tree["params"]["w"][1, 2] = np.nextafter(np.float32(5), np.float32(6))  # one ulp
    assert mismatches(tree, recorded) == ["params/w"]
    assert mismatches(tree["params"], recorded, prefix="params/") == ["params/w"]
    assert mismatches(tree, {}) == []  # a checkpoint written before checksums: not checked


@pytest.mark.e2e
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_config):
    cfg = _tiny_run(tiny_config, steps=20, log_every=10, checkpoint_every=5)
    stage = build_stage(cfg)
    clean_loss, clean_batch = stage.loss_fn, stage.train_batch

    def poisoned_loss(params, frozen, batch, rng):
        loss_sum, count = clean_loss(params, frozen, batch, rng)
        return loss_sum * batch.get("poison", jnp.ones(1))[0], count

    def batch(step):
        b = clean_batch(step)
        return {
            **b,
            "poison": np.full((b["tokens"].shape[0],), np.nan if step >= 6 else 1.0, np.float32),
        }

    stage.loss_fn, stage.train_batch = poisoned_loss, batch
    with pytest.raises(
        TrainingError, match="non-finite loss.*step 7.*last good checkpoint is step 5"
    ):
        run_training(cfg, stage)
    steps = sorted(
        int(p.name) for p in (Path(cfg.run.dir) / "checkpoints").iterdir() if p.name.isdigit()
    )
    assert steps == [5]
    assert '"status": "failed"' in (Path(cfg.run.dir) / "state.json").read_text()


@pytest.mark.e2e
def test_resume_on_another_device_count_continues_the_same_run(tiny_config, tmp_path):
    whole = with_overrides(_tiny_run(tiny_config), run={"dir": str(tmp_path / "whole")})
    split = with_overrides(_tiny_run(tiny_config), run={"dir": str(tmp_path / "split")})
    run_training(whole, build_stage(whole))
    run_training(with_overrides(split, train={"stop_at": 6}), build_stage(split))
    one_device = with_overrides(split, train={"num_devices": 1})
    run_training(one_device, build_stage(one_device))
    losses = [[r["loss"] for r in read_metrics(c.run.dir) if "loss" in r] for c in (whole, split)]
    np.testing.assert_allclose(losses[0], losses[1], atol=1e-5)
    a, b = restore_final_state(whole), restore_final_state(split)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), a, b)


def test_bfloat16_compute_keeps_float32_state(tiny_config):
    cfg = with_overrides(tiny_config, model={"compute_dtype": "bfloat16"})
    losses, params = _run_steps(cfg, 4, steps=4)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}


@pytest.mark.e2e
def test_a_checkpoint_write_that_fails_stops_the_run_and_the_last_one_resumes(
    tiny_config, tmp_path, monkeypatch
):
    """An injected ENOSPC on the second save (test_pretrain fills a real tmpfs where the
    machine allows mounting one): one CheckpointWriteError naming the step, the cause and the
    last complete checkpoint, which the same command then resumes from."""
    import errno

    import orbax.checkpoint as ocp

    from pipeline.checkpoint import CheckpointWriteError

    whole = with_overrides(_tiny_run(tiny_config), run={"dir": str(tmp_path / "whole")})
    split = with_overrides(_tiny_run(tiny_config), run={"dir": str(tmp_path / "split")})
    run_training(whole, build_stage(whole))
    real_save, calls = ocp.CheckpointManager.save, []

    def full_disk(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as raised:
        run_training(split, build_stage(split))
    message = str(raised.value)
    assert "checkpoint 8 could not be written" in message and "No space left" in message
    assert "last complete checkpoint is step 4" in message
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    state = json.loads((Path(split.run.dir) / "state.json").read_text())
    assert state["status"] == "failed" and state["step"] == 8
    assert run_training(split, build_stage(split)).step == 12
    jax.tree.map(
        np.testing.assert_array_equal, restore_final_state(whole), restore_final_state(split)
    )


@pytest.mark.e2e
@pytest.mark.parametrize("data", [{"document_masking": True}, {"packing": "best_fit"}])
def test_pretraining_with_document_masking_trains_and_resumes(tiny_config, tmp_path, data):
    """data.document_masking: the windows' documents are separated (segment ids from EOS) and
    the run learns, and resumes bit-identically, as without; data.packing=best_fit the same
    with whole documents packed into rows."""
    cfg = with_overrides(
        _tiny_run(tiny_config, steps=8, checkpoint_every=4),
        data=data,
        run={"dir": str(tmp_path / "whole")},
    )
    stage = build_stage(cfg)
    batches = [stage.train_batch(step) for step in range(40)]
    assert all(b["segments"].shape == b["tokens"].shape for b in batches)
    if "packing" in data:  # stdlib files are longer than a row: most rows are one piece
        assert all(b["mask"].shape == b["segments"][:, 1:].shape for b in batches)
        assert all((b["segments"] >= 1).all() or (b["mask"] == 0).any() for b in batches)
    else:
        assert any(b["segments"].max() > 1 for b in batches)  # some windows span two documents
    assert run_training(cfg, stage).status == "finished"
    split = with_overrides(cfg, run={"dir": str(tmp_path / "split")})
    run_training(with_overrides(split, train={"stop_at": 4}), build_stage(split))
    run_training(split, build_stage(split))
    losses = lambda c: [r["loss"] for r in read_metrics(c.run.dir) if "loss" in r]  # noqa: E731
    assert losses(cfg) == losses(split) and all(np.isfinite(losses(cfg)))


@pytest.mark.e2e  # a whole stage or a loaded engine: make test, not test-fast
def test_pretraining_on_a_mixture_logs_a_loss_per_source_and_resumes(tiny_config, tmp_path):
    """data.mixture: rows from both sources, an evaluation loss per source (eval_loss is
    their weighted mean), and exact resume as for one source."""
    from pipeline.config import MixtureSource

    letters = tmp_path / "letters.jsonl"
    letters.write_text("".join(json.dumps({"text": c * 400}) + "\n" for c in "abcdefghijklmnop"))
    mixture = (MixtureSource("stdlib", 0.75), MixtureSource(str(letters), 0.25))
    cfg = with_overrides(
        _tiny_run(tiny_config, steps=8, checkpoint_every=4, eval_every=4),
        data={"mixture": mixture},
        run={"dir": str(tmp_path / "whole")},
    )
    stage = build_stage(cfg)
    assert set(stage.eval_sets) == {"stdlib", "letters"}
    assert run_training(cfg, stage).status == "finished"
    evals = [r for r in read_metrics(cfg.run.dir) if "eval_loss" in r]
    for r in evals:
        parts = r["eval_loss/stdlib"] * 0.75 + r["eval_loss/letters"] * 0.25
        assert r["eval_loss"] == pytest.approx(parts)
        assert r["eval_loss/letters"] != r["eval_loss/stdlib"]
    split = with_overrides(cfg, run={"dir": str(tmp_path / "split")})
    run_training(with_overrides(split, train={"stop_at": 4}), build_stage(split))
    run_training(split, build_stage(split))
    losses = lambda c: [r["loss"] for r in read_metrics(c.run.dir) if "loss" in r]  # noqa: E731
    assert losses(cfg) == losses(split) and all(np.isfinite(losses(cfg)))


def test_orbax_futures_left_after_a_failed_write_print_nothing_after_the_error():
    """After a failed write, orbax's other write futures are collected with their exceptions
    unread; asyncio logs each as 'Future exception was never retrieved' (a record that names
    no orbax file, only the write's folder). Before the failure such a record prints; after it,
    nothing follows the run's one `error:` line."""
    script = """
import asyncio, gc, sys
from pipeline import checkpoint

def unread_failure():
    loop = asyncio.new_event_loop()
    future = loop.create_future()
    future.set_exception(ValueError('RESOURCE_EXHAUSTED: Error writing in OCDBT database at '
                                    'local file "/r/checkpoints/6.orbax-checkpoint-tmp/"'))
    loop.close()

unread_failure(); gc.collect()
print("--- failed ---", file=sys.stderr)
checkpoint._WRITES_FAILED.append(6)
unread_failure(); gc.collect()
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    before, after = done.stderr.split("--- failed ---")
    assert "Future exception was never retrieved" in before
    assert after.strip() == "", after


def test_after_a_failed_write_only_orbaxs_closed_loop_callbacks_go_unprinted():
    """The unraisable hook set once a checkpoint write failed: orbax's threads calling back into
    their closed event loop print nothing after the run's error line; anything else still goes
    to the hook it replaced."""
    from types import SimpleNamespace

    from pipeline.checkpoint import _quiet_closed_loop

    seen = []
    hook = _quiet_closed_loop(seen.append)
    closed = SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = SimpleNamespace(exc_value=RuntimeError("something else"))
    hook(closed)
    hook(other)
    assert seen == [other]
