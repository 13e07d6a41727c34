"""bfloat16 weights on CPU: generation and the serving engine hold no float32 copy of the model.

XLA's CPU compiler multiplies bfloat16 matrices in float32. Left to itself it converted every
weight at the start of a program (all layers' at once), hoisted the conversions out of the
decode loop, and converted whole KV pools and embedding tables ahead of their gathers and
scatters; the compiled programs' temporaries measure what is left (`memory_analysis`).

Run: pytest tests/test_narrow_weights.py
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from flax import nnx
from helpers import tiny_model_config
from test_paged import _run

from pipeline.inference import generate as gen
from pipeline.model import create_model
from pipeline.serving import programs
from pipeline.serving.engine import Engine

# Weights that dwarf the activations: 4 layers of width 256 and a 4,096-token tied table.
CFG = tiny_model_config(
    vocab_size=4096,
    num_layers=4,
    embed_dim=256,
    mlp_dim=1024,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=256,
    tied_embeddings=True,
    param_dtype="bfloat16",
    compute_dtype="bfloat16",
)


@pytest.fixture(scope="module")
def model():
    return create_model(CFG, seed=3)


def _float32_copy_bytes(model) -> int:
    """What a float32 copy of every matrix takes."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return sum(4 * x.size for x in leaves if x.ndim >= 2)


def test_generate_holds_no_float32_copy_of_the_weights(model, optimized):
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    before = set(gen.PROGRAMS.compiled)
    out = gen.generate(model, prompts, 12)
    copy = _float32_copy_bytes(model)
    temps = {
        k[0]: p.memory_analysis().temp_size_in_bytes
        for k, p in gen.PROGRAMS.compiled.items()
        if k not in before  # this model's programs (its shapes are no other test's)
    }
    assert set(temps) == {"prefill", "decode_loop"}
    # one layer's matrices, or the tied table's float32 form for the head, at a time (each a
    # fifth of the copy here): never the whole copy (1.43x it before)
    assert max(temps.values()) < 0.5 * copy, (temps, copy)
    # the same tokens a step at a time (`stream`: no loop to hoist anything out of)
    for prompt, tokens in zip(prompts, out.tokens, strict=True):
        assert list(gen.stream(model, prompt, 12)) == tokens


def test_the_engine_holds_no_float32_copy_of_the_weights_or_the_kv_pool(model, optimized):
    engine = Engine(model, slots=4, kv_blocks=1024, block_size=16, prefill_chunk=64)
    pool_bytes = sum(x.nbytes for x in jax.tree.leaves(engine.pool))
    first, rest = engine._programs()
    temps = [compile_().memory_analysis().temp_size_in_bytes for compile_ in first + rest]
    copy = _float32_copy_bytes(model)
    # nor a copy of the pool (33.5 MB here, larger than the weights' float32 copy): a pool of
    # bits is written in place (a pool converted to bits for each write and back: 35 MB)
    assert pool_bytes > copy and max(temps) < 0.5 * copy, (max(temps), copy, pool_bytes)
    prompts = [list(range(3, 3 + n)) for n in (5, 40, 70)]
    got = _run(engine, prompts, [10, 10, 10])
    engine.stop()
    want = [gen.generate(model, [p], 10).tokens[0] for p in prompts]
    assert got == want


def test_prompt_scoring_never_holds_a_long_prompts_logits_whole():
    """Echo's scoring of 2,048 positions of a 32,768-token vocabulary: its float32 logits
    alone are 268 MB; made a chunk at a time the program's temporaries are 135 MB (537 MB when
    the logits and their log-probabilities were made whole)."""
    cfg = tiny_model_config(
        vocab_size=32768,
        num_layers=2,
        embed_dim=64,
        mlp_dim=128,
        num_heads=2,
        num_kv_heads=1,
        max_seq_len=2048,
        tied_embeddings=True,
    )
    graphdef, params = programs.split(create_model(cfg, seed=0))
    P = 2048
    tokens = jax.ShapeDtypeStruct((1, P), jnp.int32)
    compiled = programs.score.lower(params, tokens, jnp.int32(0), graphdef=graphdef).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < P * cfg.vocab_size * 4 * 0.75, temp


JEMALLOC = (
    "/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/lib/aarch64-linux-gnu/libjemalloc.so.2",
)


def test_release_free_memory_runs_under_either_allocator():
    """After compiling, the engine hands the allocator's freed pages back: jemalloc's purge of
    every arena where it is preloaded, glibc's malloc_trim otherwise (both say they ran)."""
    code = "from pipeline.runtime import release_free_memory as r; assert r(); print('ok')"
    jemalloc = [p for p in JEMALLOC if os.path.exists(p)]
    for preload in ["", *jemalloc[:1]]:
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
        env["LD_PRELOAD"] = preload
        run = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert run.stdout.strip() == "ok", (preload, run.stderr[-2000:])


def test_the_allocator_reported_is_the_one_loaded():
    """Benchmarks name the allocator they ran with: jemalloc only where it is loaded, not where
    LD_PRELOAD names a library the loader could not find (it goes on with glibc's malloc)."""
    code = "from pipeline.runtime import allocator; print(allocator())"
    jemalloc = [p for p in JEMALLOC if os.path.exists(p)]
    cases = [("", "system malloc"), ("/nowhere/libjemalloc.so.2", "system malloc")]
    cases += [(jemalloc[0], "jemalloc")] if jemalloc else []
    for preload, expected in cases:
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
        env["LD_PRELOAD"] = preload
        run = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert run.stdout.strip() == expected, (preload, run.stderr[-2000:])


def test_bit_gathers_and_scatters_equal_the_plain_ones():
    from pipeline.attention import _put, pool_dtype, read_blocks, take

    rng = np.random.default_rng(0)
    pool = jnp.asarray(rng.normal(size=(6, 2, 4, 3)), jnp.bfloat16)
    rows = jnp.asarray([[0, 5, 6], [2, 2, 1]])  # 6: past the pool (clamped when read)
    assert jnp.array_equal(take(pool, rows), pool[rows])
    new = jnp.asarray(rng.normal(size=(2, 3, 2, 3)), jnp.float32)
    at = (rows, slice(None), jnp.asarray([[1, 2, 3], [0, 0, 1]]))
    want = pool.at[at].set(new.astype(jnp.bfloat16), mode="drop")
    # a pool of bits (on CPU) written and read back: the same values
    assert pool_dtype(jnp.bfloat16) == jnp.uint16 and pool_dtype(jnp.float32) == jnp.float32
    bits = jax.lax.bitcast_convert_type(pool, jnp.uint16)
    written = _put(bits, at, new)
    assert written.dtype == jnp.uint16
    got = read_blocks(written, rows, jnp.bfloat16)
    assert got.dtype == jnp.bfloat16 and jnp.array_equal(got, want[rows])
    assert jnp.array_equal(read_blocks(written, rows, jnp.float32), want[rows].astype(jnp.float32))
