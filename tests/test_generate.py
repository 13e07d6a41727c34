"""Generation: the jitted decode loop against the uncached forward, sampling, compilations.

Run: pytest tests/test_generate.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_model_config

from pipeline.config import ModelConfig
from pipeline.inference.generate import compilations, generate
from pipeline.inference.sampling import Sampling, greedy_tokens, sample
from pipeline.model import create_model

CFG = tiny_model_config(vocab_size=97, max_seq_len=64)


# one jitted forward for the module: compiled once per model structure, not once per call
_forward = nnx.jit(lambda model, tokens: model(tokens)[0])


def _greedy_uncached(model, prompt, n):
    """Greedy decoding by running the whole sequence again for every token (no cache).

    The sequence sits in a fixed-size buffer, so one compiled forward serves every step: the
    attention is causal, so the padding after position i cannot change its logits.
    """
    buffer = np.zeros((1, model.cfg.max_seq_len), np.int32)
    buffer[0, : len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n):
        buffer[0, i] = int(jnp.argmax(_forward(model, jnp.asarray(buffer))[0, i - 1]))
    return buffer[0, len(prompt) : len(prompt) + n].tolist()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generate_equals_uncached_forward(family):
    # built from the family alone: its defaults fill in positions, norm, MLP and biases
    sizes = dict(vocab_size=97, num_layers=2, embed_dim=32, num_heads=4, max_seq_len=64)
    cfg = ModelConfig(family=family, num_kv_heads=2 if family == "llama" else None, **sizes)
    model = create_model(cfg, seed=3)
    block = model.blocks[0]
    if family == "gpt2":  # learned positions, LayerNorm: the GPT-2 path really is under test
        assert hasattr(model, "pos_embed") and isinstance(block.attn_norm, nnx.LayerNorm)
    else:
        assert not hasattr(model, "pos_embed") and isinstance(block.attn_norm, nnx.RMSNorm)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
    result = generate(model, prompts, max_new_tokens=[6, 4, 8])
    for prompt, row, n in zip(prompts, result.tokens, [6, 4, 8], strict=True):
        assert row == _greedy_uncached(model, prompt, n)


def test_a_long_decode_runs_in_phases_over_a_growing_cache_and_equals_the_uncached_forward(
    monkeypatch,
):
    import pipeline.inference.generate as gen

    assert gen.live_lengths(64, 192) == [96, 128, 160, 192]
    assert gen.live_lengths(64, 64 + gen.LIVE_MIN_TOKENS - 1) == [64 + gen.LIVE_MIN_TOKENS - 1]
    monkeypatch.setattr(gen, "LIVE_MIN_TOKENS", 8)
    sizes = []  # the cache length each phase's loop is traced with
    resize = gen.resize_cache
    monkeypatch.setattr(gen, "resize_cache", lambda c, n: sizes.append(n) or resize(c, n))
    model = create_model(CFG, seed=5)
    # weights x 3: at initialisation the tokens hardly depend on the context, so a step that
    # lost part of it (a phase too short) would still pass
    nnx.update(model, jax.tree.map(lambda p: p * 3, nnx.state(model, nnx.Param)))
    prompts, budgets = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]], [32, 20, 25]
    result = gen.generate(model, prompts, max_new_tokens=budgets)
    # prompts padded to 16 positions, 32 new tokens: a cache of 48, decoded in four phases
    assert sizes == [24, 32, 40, 48]
    for prompt, row, n in zip(prompts, result.tokens, budgets, strict=True):
        assert row == _greedy_uncached(model, prompt, n)
    # sampled tokens depend on every logit: the same as from one phase over the whole cache
    sampling = Sampling(temperature=1.0, seed=7)
    phased = gen.generate(model, prompts, budgets, sampling).tokens
    monkeypatch.setattr(gen, "LIVE_MIN_TOKENS", 10_000)
    monkeypatch.setattr(gen, "PROGRAMS", gen.Programs())  # trace and compile again, in one phase
    jax.clear_caches()
    assert phased == gen.generate(model, prompts, budgets, sampling).tokens
    assert sizes[4:] == [48]
    # a row that stops early (EOS) while the others go on through the later phases
    eos = result.tokens[1][5]
    stopped = gen.generate(model, prompts, max_new_tokens=budgets, eos_id=eos).tokens
    for row, free in zip(stopped, result.tokens, strict=True):
        assert row == (free[: free.index(eos) + 1] if eos in free else free)


def test_eos_stops_a_row():
    model = create_model(CFG, seed=3)
    free = generate(model, [[5, 6, 7]], max_new_tokens=8).tokens[0]
    eos = free[2]
    stopped = generate(model, [[5, 6, 7]], max_new_tokens=8, eos_id=eos).tokens[0]
    assert stopped == free[: free.index(eos) + 1]


def test_sampling_is_seeded_and_never_recompiles():
    model = create_model(CFG, seed=3)
    prompt = [[5, 6, 7]]
    generate(model, prompt, 8, Sampling(temperature=1.0, seed=1))
    before = compilations()
    a = generate(model, prompt, 8, Sampling(temperature=1.0, seed=1)).tokens
    b = generate(model, prompt, 8, Sampling(temperature=1.0, seed=1)).tokens
    c = generate(model, prompt, 8, Sampling(temperature=0.7, top_k=5, top_p=0.9, seed=2))
    assert a == b and a != c.tokens
    assert compilations() == before  # new sampling values, same program


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
    keys = jnp.stack([jnp.array([0, i], jnp.uint32) for i in range(4)])
    ones = jnp.ones(4)
    greedy = jnp.argmax(logits, -1)
    k1 = sample(logits, keys, ones, jnp.ones(4, jnp.int32), ones)
    p0 = sample(logits, keys, ones, jnp.zeros(4, jnp.int32), jnp.full(4, 1e-6))
    assert jnp.array_equal(k1, greedy) and jnp.array_equal(p0, greedy)


def test_greedy_tokens_equal_argmax_with_ties_infinities_and_nans():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 257)).astype(np.float32)
    logits[0, 0, [5, 9, 200]] = 10.0  # a tie: the first index
    logits[0, 1] = -np.inf  # nothing finite
    logits[1, 2, [7, 30]] = np.nan  # argmax takes the first NaN
    logits[2, 3, 100] = np.inf
    logits[2, 1] = rng.integers(0, 3, 257)  # many ties
    got = np.asarray(greedy_tokens(jnp.asarray(logits)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(logits), -1)))
    assert got[0, 0] == 5 and got[1, 2] == 7 and got[2, 3] == 100


def test_prompt_too_long_is_a_clear_error():
    model = create_model(CFG)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        generate(model, [[1] * 60], max_new_tokens=10)


@pytest.mark.e2e
def test_cli_generate_json_from_a_run_and_an_adapter(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT, make_tiny_runs

    make_tiny_runs(tmp_path)
    for run, extra in (("base", []), ("ft", ["--chat"])):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline",
                "generate",
                "--run",
                str(tmp_path / run),
                "--prompt",
                "def f(x):",
                "--max-new-tokens",
                "5",
                "--json",
                *extra,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = json.loads(proc.stdout)
        assert 1 <= len(out["tokens"]) <= 5 and isinstance(out["text"], str)
        assert out["tokens_per_sec"] > 0


@pytest.mark.parametrize(("mode", "ratio"), [("int8", 0.3), ("int4", 0.2)])
def test_quantized_weights_are_smaller_and_agree(mode, ratio):
    from pipeline.quantize import quantize_model, weight_bytes

    cfg = ModelConfig(
        **{
            **CFG.__dict__,
            "embed_dim": 128,
            "num_heads": 4,
            "num_kv_heads": 4,
            "tied_embeddings": True,
        }
    )
    model = create_model(cfg, seed=1)
    tokens = jnp.arange(20)[None] % 97
    before, full_bytes = model(tokens)[0], weight_bytes(model)
    projection_bytes = full_bytes - 97 * 128 * 4  # everything but the float embedding
    quantize_model(model, mode)
    after = model(tokens)[0]
    assert weight_bytes(model) - 97 * 128 * 4 < ratio * projection_bytes
    assert float(jnp.max(jnp.abs(after - before))) < (0.02 if mode == "int8" else 0.3)
    agree = np.mean(np.argmax(after, -1) == np.argmax(before, -1))
    assert agree >= (0.95 if mode == "int8" else 0.8)


def test_stream_yields_generates_tokens_without_recompiling():
    from pipeline.inference.generate import stream

    model = create_model(CFG, seed=3)
    for sampling in (Sampling(), Sampling(temperature=0.9, top_k=10, seed=4)):
        whole = generate(model, [[5, 6, 7]], 7, sampling).tokens[0]
        assert list(stream(model, [5, 6, 7], 7, sampling)) == whole
    before = compilations()
    list(stream(model, [8, 9], 7, Sampling(temperature=0.5, top_p=0.8, seed=9)))
    assert compilations() == before  # another request, same bucket: nothing new to compile


@pytest.mark.e2e
def test_bench_generate_reports_speed_ttft_and_the_recompute_baseline(tiny_config):
    from pipeline.bench.inference import REPEAT_RUNS, bench_generate, bench_recompute

    result = bench_generate(tiny_config, "tiny/int8", prompt_len=8, new_tokens=8, quantize="int8")
    assert result["case"] == "generate/tiny/int8" and result["runs"] == 1
    # again while the runs' decode loops total under repeat_s (8 tokens: far under a minute)
    again = bench_generate(tiny_config, "tiny", prompt_len=8, new_tokens=8, repeat_s=60)
    assert again["runs"] == REPEAT_RUNS and again["decode_tokens_per_sec"] > 0
    assert result["tokens_per_sec"] > 0 and result["ttft_ms"] > 0 and result["weight_bytes"] > 0
    # the baseline asserts its tokens equal the cached generation's
    baseline = bench_recompute(tiny_config, "tiny/recompute", prompt_len=8, new_tokens=16)
    assert baseline["recompute_tokens_per_sec"] > 0 and baseline["speedup"] > 0
