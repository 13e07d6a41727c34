"""Functional test: LoRA teaches a small pre-trained model a task it could not do before.

The task is reversing short strings of letters; held-out strings are never trained on. Greedy
decoding here is a plain loop over the uncached forward (the model is tiny).
Run: pytest -m slow tests/test_finetune_task.py
"""

import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

from pipeline.config import load_config
from pipeline.inference.runs import load_model
from pipeline.tokenizer import prompt_ids
from pipeline.training.finetune import finetune
from pipeline.training.pretrain import pretrain

pytestmark = pytest.mark.slow
SEQ = 32


def _words():
    rng = random.Random(0)
    words = sorted(
        {"".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 5))) for _ in range(3000)}
    )
    rng.shuffle(words)
    return words[100:], words[:100]  # train, held out


def _exact_match(run_dir, words) -> float:
    _, model, tok = load_model(run_dir)
    forward = jax.jit(lambda tokens, pos: model(tokens)[0][jnp.arange(tokens.shape[0]), pos])
    prompts = [prompt_ids(tok, [{"role": "user", "content": w}]) for w in words]
    tokens = np.full((len(words), SEQ), tok.pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    pos = np.array([len(p) - 1 for p in prompts])
    outputs = [[] for _ in words]
    for _ in range(6):
        nxt = np.asarray(jnp.argmax(forward(jnp.asarray(tokens), jnp.asarray(pos)), -1))
        for i, out in enumerate(outputs):
            out.append(int(nxt[i]))
            tokens[i, pos[i] + 1] = nxt[i]
        pos += 1
    answers = [tok.decode(o[: o.index(tok.end_id)] if tok.end_id in o else o) for o in outputs]
    return float(np.mean([a == w[::-1] for a, w in zip(answers, words, strict=True)]))


def test_lora_learns_to_reverse_strings(tmp_path, optimized):
    base = load_config(
        os.path.join(ROOT, "configs", "pretrain_tiny.yaml"),
        [
            f"run.dir={tmp_path / 'base'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "run.progress=false",
            "model.embed_dim=64",
            "train.steps=300",
            "optimizer.lr=3e-3",
            "train.eval_every=1000",
            "train.checkpoint_every=1000",
            "train.num_devices=1",  # one device: no collectives to stall
        ],
    )
    pretrain(base)
    train, held_out = _words()
    data = tmp_path / "reverse.jsonl"
    data.write_text("".join(json.dumps({"prompt": w, "completion": w[::-1]}) + "\n" for w in train))
    cfg = load_config(
        os.path.join(ROOT, "configs", "finetune_tiny.yaml"),
        [
            f"init.from={tmp_path / 'base'}",
            f"run.dir={tmp_path / 'lora'}",
            f"finetune.data={data}",
            "run.progress=false",
            "model.embed_dim=64",
            "finetune.max_examples=null",
            f"data.seq_len={SEQ}",
            "train.steps=800",
            "train.batch_size=32",
            "optimizer.lr=1e-2",
            "optimizer.warmup_steps=20",
            "lora.rank=16",
            "lora.alpha=32",
            "lora.targets=[q,k,v,o,up,down]",
            "train.eval_every=1000",
            "train.log_every=100",
            "train.checkpoint_every=1000",
            "train.num_devices=1",  # one device: no collectives to stall
            "train.eval_at_start=false",
        ],
    )
    finetune(cfg)
    before = _exact_match(tmp_path / "base", held_out)
    after = _exact_match(tmp_path / "lora", held_out)
    print(f"held-out exact match: base {before:.2f}, LoRA {after:.2f}")
    assert before <= 0.05
    # 1.00 in most runs; 0.89 once, in a run beside other heavy processes: the bar leaves room
    # for that, far above what the base model does (0.00)
    assert after >= 0.8
