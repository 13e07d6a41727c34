"""LoRA, QLoRA and full fine-tuning on instruction data. Run: pytest tests/test_finetune.py"""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, restore_final_state
from flax import nnx

from pipeline.config import ConfigError, LoraConfig, load_config, with_overrides
from pipeline.inference.runs import load_model
from pipeline.lora import ADAPTER_WEIGHTS, add_lora, merge
from pipeline.tokenizer import byte_tokenizer, render
from pipeline.training.finetune import build_stage, finetune
from pipeline.training.instruct import build_examples, read_examples
from pipeline.training.metrics import read_metrics

TOKENS = jnp.array([[257, 104, 101, 108, 108, 111, 32, 119, 111, 114]])


@pytest.fixture
def base_run(tiny_run):
    """The session's briefly pre-trained tiny model (conftest), the base of every fine-tune."""
    return tiny_run


def _ft_config(base_run, tmp_path, *overrides):
    return load_config(
        os.path.join(ROOT, "configs", "finetune_tiny.yaml"),
        [
            f"init.from={base_run}",
            f"run.dir={tmp_path / 'ft'}",
            "run.progress=false",
            "finetune.max_examples=200",
            "train.steps=6",
            "train.checkpoint_every=3",
            "train.eval_every=3",
            "train.log_every=3",
            *overrides,
        ],
    )


def test_lora_with_zero_b_equals_base_and_merge_equals_adapter(base_run):
    _, model, _ = load_model(base_run)
    base_logits, _ = model(TOKENS)
    add_lora(model, LoraConfig(rank=4, targets=("q", "k", "v", "o", "up", "down")))
    logits, _ = model(TOKENS)
    np.testing.assert_array_equal(logits, base_logits)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), lora)
    adapted = nnx.merge(graphdef, lora, rest)
    adapted_logits, _ = adapted(TOKENS)
    assert float(jnp.max(jnp.abs(adapted_logits - base_logits))) > 1e-3
    merged_logits, _ = merge(adapted)(TOKENS)
    assert float(jnp.max(jnp.abs(merged_logits - adapted_logits))) <= 1e-5


def test_loss_mask_covers_exactly_the_completion():
    tok = byte_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids, trained = render(tok, messages)
    assert (
        tok.decode([i for i, t in zip(ids, trained, strict=True) if t], skip_special=False)
        == "yo<|end|>"
    )
    examples = build_examples(tok, [{"messages": messages}], seq_len=16)
    targets = examples.tokens[0, 1:]
    counted = targets[examples.mask[0] > 0]
    assert tok.decode(counted, skip_special=False) == "yo<|end|>"
    packed = build_examples(tok, [{"messages": messages}] * 3, seq_len=40, packing=True)
    assert len(packed) == 1 and packed.mask.sum() == 3 * 3  # y, o, <|end|> three times
    n = len(ids)  # each example's tokens carry its own segment id; padding is 0
    assert packed.segments[0].tolist() == [1] * n + [2] * n + [3] * n + [0] * (41 - 3 * n)
    assert examples.segments is None  # one example per row: nothing to separate


def test_bad_instruction_files_name_file_and_line(tmp_path):
    cfg = load_config(None, [f"finetune.data={tmp_path / 'd.jsonl'}"]).finetune
    ok = '{"prompt": "a", "completion": "b"}\n'
    cases = {
        ok + '{"prompt": "a"}\n': ":2: missing string field 'completion'",
        ok + "not json\n": ":2: not valid JSON",
        '{"messages": [{"role": "user", "content": "x"}]}\n' + ok: ":1: no assistant message",
        '{"messages": [{"role": "robot", "content": "x"}]}\n': ":1: 'messages' must be",
    }
    for text, expected in cases.items():
        (tmp_path / "d.jsonl").write_text(text)
        with pytest.raises(ConfigError, match=expected):
            read_examples(cfg)
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"prompt": "x" * 100, "completion": "y"})
        + "\n"
        + json.dumps({"prompt": "a", "completion": "b"})
        + "\n"
    )
    train, val = read_examples(cfg)
    with pytest.raises(ConfigError, match=r"d.jsonl:1: no trainable token"):
        build_examples(byte_tokenizer(), train + val, seq_len=32)


@pytest.mark.e2e
def test_only_adapters_train_and_the_adapter_file_is_small(base_run, tmp_path):
    cfg = _ft_config(base_run, tmp_path)
    result = finetune(cfg)
    assert result.status == "finished"
    stage = build_stage(cfg)
    assert len(jax.tree.leaves(stage.params)) == 2 * 2 * 2  # A and B on q, v of 2 layers
    state = restore_final_state(cfg, stage)
    # the optimizer holds state for the adapters alone
    adapter_size = sum(x.size for x in jax.tree.leaves(stage.params))
    assert sum(x.size for x in jax.tree.leaves(state["opt_state"])) <= 2 * adapter_size + 10
    # the frozen base is bit-identical to the base run's weights; the adapters moved
    jax.tree.map(np.testing.assert_array_equal, state["frozen"], jax.device_get(stage.frozen))
    b_moved = [
        np.abs(x).max()
        for p, x in jax.tree_util.tree_leaves_with_path(state["params"])
        if "lora_b" in jax.tree_util.keystr(p)
    ]
    assert all(m > 0 for m in b_moved)
    base_bytes = sum(f.stat().st_size for f in (base_run / "checkpoints").rglob("*") if f.is_file())
    adapter_bytes = (Path(cfg.run.dir) / ADAPTER_WEIGHTS).stat().st_size
    assert adapter_bytes < base_bytes / 20
    config = json.loads((Path(cfg.run.dir) / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "LORA"
        and config["r"] == 4
        and config["target_modules"] == ["q", "v"]
    )
    assert (Path(cfg.run.dir) / "model").is_dir()  # the trained parameters: the adapters
    # base + adapter loads back and equals the trained adapted model; merge equals it too
    _, adapted, _ = load_model(cfg.run.dir)
    adapted_logits, _ = adapted(TOKENS)
    trained, _ = nnx.merge(stage.graphdef, state["params"], state["frozen"])(TOKENS)
    np.testing.assert_allclose(adapted_logits, trained, atol=1e-5)
    np.testing.assert_allclose(merge(adapted)(TOKENS)[0], trained, atol=1e-5)


@pytest.mark.e2e
def test_lora_run_resumes_exactly(base_run, tmp_path):
    whole = _ft_config(base_run, tmp_path / "a")
    split = _ft_config(base_run, tmp_path / "b")
    finetune(whole)
    assert finetune(with_overrides(split, train={"stop_at": 3})).step == 3
    finetune(split)
    losses = [
        [
            (r["step"], r.get("loss"), r.get("eval_loss"))
            for r in read_metrics(c.run.dir)
            if "loss" in r or "eval_loss" in r
        ]
        for c in (whole, split)
    ]
    assert losses[0] == losses[1]
    a = (Path(whole.run.dir) / ADAPTER_WEIGHTS).read_bytes()
    assert a == (Path(split.run.dir) / ADAPTER_WEIGHTS).read_bytes()


@pytest.mark.e2e
def test_qlora_trains_int8_base_and_changes_output(base_run, tmp_path):
    cfg = _ft_config(base_run, tmp_path, "lora.base_quantize=int8", "optimizer.lr=1e-2")
    stage = build_stage(cfg)
    dtypes = {x.dtype for x in jax.tree.leaves(stage.frozen)}
    assert np.dtype("int8") in dtypes
    frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(stage.frozen))
    _, base, _ = load_model(base_run)
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(base)))
    assert frozen_bytes < 0.75 * base_bytes  # the projections at a quarter of their size
    before, _ = nnx.merge(stage.graphdef, stage.params, stage.frozen)(TOKENS)
    finetune(cfg)
    _, adapted, _ = load_model(cfg.run.dir)
    after, _ = adapted(TOKENS)
    assert float(jnp.max(jnp.abs(after - before))) > 1e-3


def test_refuses_a_different_base_model_and_missing_base(base_run, tmp_path):
    with pytest.raises(ConfigError, match="different model.*embed_dim"):
        build_stage(_ft_config(base_run, tmp_path, "model.embed_dim=64"))
    with pytest.raises(ConfigError, match="not a run directory"):
        build_stage(_ft_config(tmp_path / "nowhere", tmp_path))


@pytest.mark.e2e
def test_full_finetune_writes_a_loadable_model(base_run, tmp_path):
    cfg = _ft_config(base_run, tmp_path, "finetune.method=full")
    finetune(cfg)
    assert (Path(cfg.run.dir) / "model").is_dir()
    _, model, _ = load_model(cfg.run.dir)
    _, base, _ = load_model(base_run)
    assert float(jnp.max(jnp.abs(model(TOKENS)[0] - base(TOKENS)[0]))) > 1e-4


@pytest.mark.e2e
def test_a_lora_fine_tune_under_the_mesh_matches_pmap(base_run, tmp_path):
    """The base arrives as host arrays and is placed shard by shard (fsdp 4)."""
    _, model, _ = load_model(base_run, host=True)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(nnx.state(model)))
    pmap = finetune(_ft_config(base_run, tmp_path / "pmap"))
    mesh = finetune(
        _ft_config(base_run, tmp_path / "mesh", "train.parallelism=mesh", "train.mesh_fsdp=4")
    )
    assert mesh.status == "finished"
    assert mesh.eval_loss == pytest.approx(pmap.eval_loss, abs=1e-4)
