"""The Transformer: causality, KV cache, dtypes, sizes. Run: pytest tests/test_model.py"""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pipeline.attention import attention, attention_impl, cached_attention, visible
from pipeline.config import ModelConfig
from pipeline.cpu_forms import _ROWS, WIDENING_MAX, rows_dot_general
from pipeline.model import (
    count_params,
    create_model,
    flops_per_token,
    init_cache,
    segment_positions,
)

VARIANTS = {
    "gpt2": ModelConfig(
        family="gpt2", vocab_size=97, num_layers=2, embed_dim=32, num_heads=4, max_seq_len=32
    ),
    "llama": ModelConfig(
        family="llama", vocab_size=97, num_layers=2, embed_dim=32, num_heads=4, max_seq_len=32
    ),
    "llama-gqa": ModelConfig(
        family="llama",
        vocab_size=97,
        num_layers=2,
        embed_dim=32,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=32,
    ),
    "llama-mqa-tied": ModelConfig(
        family="llama",
        vocab_size=97,
        num_layers=1,
        embed_dim=32,
        num_heads=4,
        num_kv_heads=1,
        tied_embeddings=True,
        max_seq_len=32,
    ),
}


def _forward(model):
    """A jitted functional forward, the way training and serving call the model."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens, positions, cache):
        return nnx.merge(graphdef, state)(tokens, positions, cache)

    return lambda tokens, positions=None, cache=None: forward(state, tokens, positions, cache)


def _tokens(shape, seed=0, vocab=97):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


@pytest.mark.parametrize("name", VARIANTS)
def test_causality(name):
    forward = _forward(create_model(VARIANTS[name], seed=1))
    tokens = _tokens((2, 16))
    t = 7
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 5) % 97)
    logits, _ = forward(tokens)
    logits2, _ = forward(changed)
    np.testing.assert_array_equal(logits[:, : t + 1], logits2[:, : t + 1])
    assert not np.allclose(logits[:, t + 1 :], logits2[:, t + 1 :])


@pytest.mark.parametrize("name", VARIANTS)
def test_prefill_then_decode_matches_uncached(name):
    cfg = VARIANTS[name]
    forward = _forward(create_model(cfg, seed=2))
    B, T, P = 2, 12, 5
    tokens = _tokens((B, T), seed=3)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    full, _ = forward(tokens)

    cache = init_cache(cfg, B, max_len=16)
    logits, cache = forward(tokens[:, :P], positions[:, :P], cache)
    pieces = [logits]
    for t in range(P, T):
        logits, cache = forward(tokens[:, t : t + 1], positions[:, t : t + 1], cache)
        pieces.append(logits)
    cached = jnp.concatenate(pieces, axis=1)
    assert float(jnp.max(jnp.abs(cached - full))) <= 1e-5


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_rows_at_different_positions(name):
    """A right-padded prefill, then each row decodes at its own position."""
    cfg = VARIANTS[name]
    forward = _forward(create_model(cfg, seed=4))
    lengths = [3, 8]
    seqs = [_tokens((1, 12), seed=10 + i)[0] for i in range(2)]
    pad = 9
    prompt = jnp.stack(
        [jnp.where(jnp.arange(pad) < n, s[:pad], 0) for s, n in zip(seqs, lengths, strict=True)]
    )
    cache = init_cache(cfg, 2, max_len=16)
    logits, cache = forward(prompt, jnp.broadcast_to(jnp.arange(pad), (2, pad)), cache)
    per_row = [[logits[r, n - 1]] for r, n in enumerate(lengths)]
    pos = jnp.array(lengths)
    for step in range(3):
        next_tokens = jnp.stack([seqs[r][lengths[r] + step] for r in range(2)])[:, None]
        logits, cache = forward(next_tokens, pos[:, None] + step, cache)
        for r in range(2):
            per_row[r].append(logits[r, 0])
    for r, n in enumerate(lengths):
        full, _ = forward(seqs[r][None, : n + 3])
        expected = full[0, n - 1 : n + 3]
        assert float(jnp.max(jnp.abs(jnp.stack(per_row[r]) - expected))) <= 1e-5


def test_cache_buffers_are_separate():
    cache = init_cache(VARIANTS["gpt2"], 1)
    pointers = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(cache)}
    assert len(pointers) == 2 * VARIANTS["gpt2"].num_layers


def test_dtype_policy():
    cfg = ModelConfig(
        family="llama",
        vocab_size=64,
        num_layers=1,
        embed_dim=32,
        num_heads=4,
        compute_dtype="bfloat16",
    )
    model = create_model(cfg)
    params = nnx.state(model, nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    logits = _jitted(model)(_tokens((1, 8), vocab=64))
    assert logits.dtype == jnp.float32
    cache = init_cache(cfg, 1)
    assert cache[0]["k"].dtype == jnp.bfloat16
    bf16 = create_model(
        ModelConfig(
            vocab_size=64,
            num_layers=1,
            embed_dim=32,
            num_heads=4,
            param_dtype="bfloat16",
            compute_dtype="bfloat16",
        )
    )
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype("bfloat16")}


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_keeps_values_and_gradients(remat):
    base = VARIANTS["llama-gqa"]
    tokens = _tokens((2, 8))

    def loss_and_grad(cfg):
        graphdef, state = nnx.split(create_model(cfg, seed=5))

        def loss(state):
            logits, _ = nnx.merge(graphdef, state)(tokens)
            return jnp.mean(jax.nn.logsumexp(logits, -1))

        return jax.jit(jax.value_and_grad(loss))(state)

    (l1, g1), (l2, g2) = (
        loss_and_grad(base),
        loss_and_grad(ModelConfig(**{**base.__dict__, "remat": remat})),
    )
    assert float(l1) == pytest.approx(float(l2), abs=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_param_count_and_flops():
    cfg = VARIANTS["gpt2"]
    D, V, L, F = 32, 97, 2, 128
    per_block = 4 * (D * D + D) + (D * F + F) + (F * D + D) + 4 * D  # attn + mlp + 2 LayerNorms
    expected = V * D + 32 * D + L * per_block + 2 * D
    assert count_params(cfg) == expected
    real = nnx.state(create_model(cfg), nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(real)) == expected
    matmul = expected - 32 * D  # position lookups excluded; tied head counted once as a matmul
    assert flops_per_token(cfg, 16) == 6 * matmul + 12 * L * D * 16


@pytest.mark.parametrize("length", [7, 150])  # 150: the einsum path goes by query blocks
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_xla_attention_equals_einsum(kv_heads, window, length):
    """jax.nn.dot_product_attention (the accelerator path, causal and windowed by its own
    arguments) computes what the einsum path computes, values and gradients."""
    q = jax.random.normal(jax.random.key(0), (2, length, 4, 8))
    k = jax.random.normal(jax.random.key(1), (2, length, kv_heads, 8))
    v = jax.random.normal(jax.random.key(2), (2, length, kv_heads, 8))
    positions = jnp.broadcast_to(jnp.arange(length), (2, length))

    def loss(impl, q, k, v):
        out = attention(q, k, v, positions, window, impl)
        return (out * jnp.cos(jnp.arange(out.size).reshape(out.shape))).sum(), out

    def value_and_grads(impl):  # jitted: eager dispatch compiles every op on its own
        return jax.jit(jax.value_and_grad(partial(loss, impl), (0, 1, 2), True))(q, k, v)

    (_, ref), ref_grads = value_and_grads("einsum")
    (_, out), grads = value_and_grads("xla")
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5)
    # and the einsum path is what plain causal masking gives
    expected = jax.nn.dot_product_attention(
        q,
        k,
        v,
        is_causal=window is None,
        mask=None if window is None else visible(positions, positions, window)[:, None],
    )
    np.testing.assert_allclose(ref, expected, atol=1e-5)


def test_blockwise_einsum_attention_of_packed_rows_equals_the_whole_square():
    """Segments (packed rows) through the query blocks: what XLA's masked attention gives."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 150, 4, 8)) for i in range(3))
    positions = jnp.broadcast_to(jnp.arange(150), (2, 150))
    segments = jnp.asarray(np.repeat([[1, 2, 3], [1, 1, 2]], [40, 70, 40], axis=1))
    got = attention(q, k, v, segment_positions(segments), segments=segments)
    mask = visible(positions, positions, None) & (segments[:, :, None] == segments[:, None, :])
    expected = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_long_sequences_take_at_most_max_query_blocks_and_equal_the_whole_square():
    """Past `MAX_QUERY_BLOCKS` x `QUERY_BLOCK` positions the blocks grow instead of multiplying
    (the program holds each one), and the result is still the whole square's."""
    from pipeline.attention import MAX_QUERY_BLOCKS, QUERY_BLOCK, einsum_attention

    T = MAX_QUERY_BLOCKS * QUERY_BLOCK + 37  # uneven: the last block is shorter
    q, k, v = (jax.random.normal(jax.random.key(i), (1, T, 2, 4)) for i in range(3))
    got = einsum_attention(q, k, v, None)
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    jaxpr = jax.make_jaxpr(lambda q, k, v: einsum_attention(q, k, v, None))(q, k, v)
    products = sum(e.primitive.name == "dot_general" for e in jaxpr.eqns)
    assert 2 * (MAX_QUERY_BLOCKS - 1) <= products <= 2 * MAX_QUERY_BLOCKS


def test_cached_attention_equals_dot_product_attention():
    """Attention over a (B, K, S, H) cache, masked per row, is dot_product_attention's."""
    q = jax.random.normal(jax.random.key(0), (2, 6, 4, 8))
    k = jax.random.normal(jax.random.key(1), (2, 10, 2, 8))
    v = jax.random.normal(jax.random.key(2), (2, 10, 2, 8))
    positions = jnp.array([[3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5]])
    mask = jnp.arange(10)[None, None, :] <= positions[:, :, None]
    got = cached_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask)
    expected = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "mistral-window"])
def test_model_with_xla_attention_equals_einsum(name):
    """model.attention=xla (the TPU / float32 GPU path) gives the einsum path's logits and
    gradients for the whole model."""
    cfg = (
        VARIANTS[name]
        if name in VARIANTS
        else ModelConfig(
            family="mistral",
            vocab_size=97,
            embed_dim=32,
            num_heads=4,
            num_kv_heads=2,
            max_seq_len=32,
            sliding_window=4,
        )
    )
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, cfg.vocab_size)
    results = []
    for impl in ("einsum", "xla"):
        model = create_model(dataclasses.replace(cfg, attention=impl), seed=0)
        graphdef, params = nnx.split(model)

        def loss(params, graphdef=graphdef):
            logits, _ = nnx.merge(graphdef, params)(tokens)
            return jax.nn.log_softmax(logits).mean(), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        results.append((logits, grads))
    np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_padding_rows_of_the_vocabulary_are_never_the_answer():
    """model.vocab_used: rows past it (a vocabulary padded to a multiple of 128) get the lowest
    logit, so greedy decoding never picks one even where their weights would win, and they take
    no gradient through the softmax."""
    from pipeline.inference.generate import generate
    from pipeline.training.train import token_losses

    cfg = ModelConfig(vocab_size=128, vocab_used=100, num_layers=1, embed_dim=16, num_heads=2)
    model = create_model(cfg, seed=0)
    table = model.embed.embedding  # tied: the head reads the same rows
    table[...] = table[...].at[100:].set(5.0)  # padding rows that would outscore every token
    logits = _jitted(model)(_tokens((2, 9), vocab=100))
    assert (logits[..., 100:] == jnp.finfo(jnp.float32).min).all()
    assert int(jnp.argmax(logits, -1).max()) < 100
    out = generate(model, [[1, 2, 3]], 12).tokens[0]
    assert len(out) == 12 and max(out) < 100
    graphdef, state = nnx.split(model)
    tokens = _tokens((2, 9), vocab=100)

    def loss(state):
        return token_losses(nnx.merge(graphdef, state), tokens[:, :-1], tokens[:, 1:]).mean()

    grad = jax.jit(jax.grad(loss))(state)
    assert float(jnp.abs(grad["embed"]["embedding"][...][100:]).max()) == 0.0


def test_attention_impl_per_backend():
    assert attention_impl("auto", jnp.float32, "cpu") == "einsum"
    assert attention_impl("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert attention_impl("auto", jnp.float32, "gpu") == "xla"
    # TPUs: Pallas's splash attention in every dtype, never cuDNN's
    assert attention_impl("auto", jnp.bfloat16, "tpu") == "splash"
    assert attention_impl("auto", jnp.float32, "tpu") == "splash"
    # a backend nobody here knows: XLA's portable path, nothing raised
    for backend in ("metal", "neuron", "some-new-chip"):
        for dtype in (jnp.float32, jnp.bfloat16):
            assert attention_impl("auto", dtype, backend) == "xla"
    assert attention_impl("xla", jnp.float32, "cpu") == "xla"
    with pytest.raises(ValueError, match="cudnn needs an NVIDIA GPU"):
        attention_impl("cudnn", jnp.bfloat16, "cpu")
    with pytest.raises(ValueError, match="cudnn needs an NVIDIA GPU"):
        attention_impl("cudnn", jnp.bfloat16, "tpu")
    with pytest.raises(ValueError, match="splash needs a TPU"):
        attention_impl("splash", jnp.bfloat16, "gpu")


@pytest.mark.parametrize(
    "kv_heads, window, packed, length",
    [(4, None, False, 20), (2, 5, False, 20), (1, None, True, 20), (2, 9, True, 150)],
)
def test_splash_attention_equals_einsum(monkeypatch, kv_heads, window, packed, length):
    """Pallas's splash attention (the TPU path; here in Pallas's interpreter) computes what the
    einsum path does, values and gradients: causal and windowed, grouped heads, packed rows
    (segment ids), a length padded to the block size; 150 with 128-blocks: two blocks."""
    import pipeline.attention as attn

    monkeypatch.setattr(attn, "SPLASH_BLOCKS", (128,))
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, length, 4, 8))
    k = jax.random.normal(keys[1], (2, length, kv_heads, 8))
    v = jax.random.normal(keys[2], (2, length, kv_heads, 8))
    positions = jnp.broadcast_to(jnp.arange(length), (2, length))
    segments = None
    if packed:  # row 0: three documents; row 1: one, then padding (segment 0)
        cuts = np.zeros((2, length), np.int32)
        cuts[0, : length // 3], cuts[0, length // 3 : length // 2], cuts[0, length // 2 :] = 1, 2, 3
        cuts[1, : length - 4] = 1
        segments = jnp.asarray(cuts)
        positions = segment_positions(segments)
    weights = jnp.cos(jnp.arange(q.size).reshape(q.shape))

    def value_and_grads(impl):
        def loss(q, k, v):
            out = attention(q, k, v, positions, window, impl, segments)
            return (out * weights).sum(), out

        return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)

    (_, want), want_grads = value_and_grads("einsum")
    (_, got), grads = value_and_grads("splash")
    np.testing.assert_allclose(got, want, atol=2e-5)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5)


def test_decode_never_transposes_the_cache():
    """A decode step reads the (B, K, S, H) cache in place whatever model.attention is: its
    program (the jaxpr, the same for every backend) has no transpose of a cache-sized array."""
    cfg = dataclasses.replace(VARIANTS["llama-gqa"], attention="xla", max_seq_len=64)
    graphdef, state = nnx.split(create_model(cfg))
    cache = init_cache(cfg, 3, max_len=64)
    step = lambda state, cache: nnx.merge(graphdef, state)(  # noqa: E731
        jnp.zeros((3, 1), jnp.int32), jnp.full((3, 1), 5), cache
    )
    jaxpr = jax.make_jaxpr(step)(state, cache)
    cache_size = cache[0]["k"].size

    def transposes(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "transpose":
                yield from (v.aval.shape for v in eqn.invars if v.aval.size >= cache_size)
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", param)
                if hasattr(inner, "eqns"):
                    yield from transposes(inner)

    assert list(transposes(jaxpr.jaxpr)) == []


def test_remat_under_lora_gives_the_same_adapter_gradients():
    """The base is frozen state from outside the gradient; remat must not try to update it."""
    from pipeline.config import LoraConfig
    from pipeline.lora import add_lora

    grads = {}
    for remat in ("none", "block"):
        cfg = ModelConfig(family="llama", vocab_size=64, remat=remat)
        model = add_lora(create_model(cfg, seed=1), LoraConfig(rank=2, dropout=0.0), seed=2)
        graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
        lora = jax.tree.map(lambda x: x + 0.1, lora)  # B = 0 would make A's gradient zero

        def loss(lora, frozen, tokens, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, lora, frozen)(tokens)[0] ** 2)

        tokens = jnp.arange(16).reshape(2, 8) % 64
        grads[remat] = jax.jit(jax.grad(loss))(lora, frozen, tokens)
    for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads["block"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _jitted(model):
    """`model(tokens, segments=)`'s logits under jit (eager dispatch compiles every op on its
    own: several times slower for a whole model)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def call(state, tokens, segments):
        return nnx.merge(graphdef, state)(tokens, segments=segments)[0]

    return lambda tokens, segments=None: call(state, tokens, segments)


def _packed_row(rng, lengths, vocab, pad=3):
    """Examples of `lengths` end to end, then `pad` padding tokens (segment 0)."""
    examples = [rng.integers(1, vocab, n) for n in lengths]
    row = np.concatenate([*examples, np.zeros(pad, np.int64)])
    segments = np.concatenate(
        [*(np.full(n, i + 1) for i, n in enumerate(lengths)), np.zeros(pad, np.int64)]
    )
    return examples, jnp.asarray(row[None], jnp.int32), jnp.asarray(segments[None], jnp.int32)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("attention", ["einsum", "xla"])
def test_each_example_of_a_packed_row_gets_its_logits_alone(family, attention):
    """Segment ids: attention stays within an example and positions restart (learned positions
    for GPT-2, RoPE for Llama), so an example's logits do not depend on its neighbours."""
    kv = 2 if family == "llama" else 4
    cfg = ModelConfig(
        family=family,
        vocab_size=64,
        num_layers=2,
        embed_dim=32,
        num_heads=4,
        num_kv_heads=kv,
        max_seq_len=32,
        attention=attention,
    )
    model = _jitted(create_model(cfg, seed=0))
    examples, row, segments = _packed_row(np.random.default_rng(0), [5, 9, 7], 64)
    packed = model(row, segments=segments)
    start = 0
    for example in examples:
        alone = model(jnp.asarray(example[None], jnp.int32))
        got = packed[0, start : start + len(example)]
        np.testing.assert_allclose(got, alone[0], atol=1e-5, rtol=1e-5)
        start += len(example)
    unmasked = model(row)  # without the segments example 2 sees example 1: different
    assert not np.allclose(unmasked[0, 5:14], packed[0, 5:14], atol=1e-3)


@pytest.mark.parametrize("loss_chunk", [0, 4])
def test_the_loss_of_a_packed_row_is_the_token_weighted_loss_of_its_examples(loss_chunk):
    from pipeline.training.train import lm_loss, token_losses

    cfg = ModelConfig(
        vocab_size=64,
        num_layers=2,
        embed_dim=32,
        num_heads=4,
        max_seq_len=32,
        loss_chunk=loss_chunk,
    )
    graphdef, params = nnx.split(create_model(cfg, seed=1))

    def apply(params, frozen, tokens, rng=None, segments=None, targets=None):
        return token_losses(nnx.merge(graphdef, params), tokens, targets, segments)

    examples, row, segments = _packed_row(np.random.default_rng(1), [6, 10, 8], 64)
    mask = (segments[:, 1:] > 0).astype(jnp.float32)  # padding targets do not count
    loss = jax.jit(lambda params, batch: lm_loss(apply, params, {}, batch, None))
    total, count = loss(params, {"tokens": row, "mask": mask, "segments": segments})
    alone = [loss(params, {"tokens": jnp.asarray(e[None], jnp.int32)}) for e in examples]
    assert float(count) == sum(len(e) - 1 for e in examples)  # no target across a boundary
    np.testing.assert_allclose(float(total), sum(float(t) for t, _ in alone), rtol=1e-5)


def test_remat_block_lowers_the_compiled_temporaries(optimized):
    """jax.checkpoint alone saves nothing on XLA's CPU compiler (it merges the recomputation
    back into the forward pass); the block's own recomputation must, with XLA's optimisations on
    (what a run compiles)."""
    cfg = ModelConfig(vocab_size=64, num_layers=4, embed_dim=64, num_heads=4, max_seq_len=256)
    tokens = _tokens((4, 256))
    temp = {}
    for remat in ("none", "block"):
        graphdef, state = nnx.split(create_model(ModelConfig(**{**cfg.__dict__, "remat": remat})))

        def loss(state, graphdef=graphdef):
            return jnp.mean(nnx.merge(graphdef, state)(tokens)[0] ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(state).compile()
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["block"] < 0.6 * temp["none"], temp


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa"])
def test_chunked_cross_entropy_equals_the_whole_one_with_its_gradients(variant):
    """model.loss_chunk: the same per-token losses and parameter gradients, a chunk of
    positions at a time (7 does not divide 20: the last chunk is padded)."""
    from pipeline.training.train import token_losses

    tokens = _tokens((2, 21))
    results = []
    for chunk in (0, 7):
        cfg = ModelConfig(**{**VARIANTS[variant].__dict__, "loss_chunk": chunk})
        graphdef, state = nnx.split(create_model(cfg, seed=3))

        def loss(state, graphdef=graphdef):
            model = nnx.merge(graphdef, state)
            losses = token_losses(model, tokens[:, :-1], tokens[:, 1:])
            return jnp.sum(losses * jnp.arange(20)), losses  # a weight per position

        results.append(jax.jit(jax.grad(loss, has_aux=True))(state))
    (g0, l0), (g7, l7) = results
    assert l0.shape == l7.shape == (2, 20)
    np.testing.assert_allclose(l0, l7, rtol=1e-5, atol=1e-6)
    # float32 sums in another order: an absolute tolerance at the scale of each gradient (an
    # element near zero in a gradient of elements near 1 differs by a few 1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=max(1e-6, 1e-5 * np.abs(b).max())
        ),
        g0,
        g7,
    )


def test_a_bfloat16_cross_entropy_is_the_float32_one_of_the_same_logits_with_its_gradient():
    """model.loss_dtype=compute: bfloat16 logits give optax's float32 cross-entropy of the same
    (widened) logits, and their gradient is the float32 one rounded to bfloat16."""
    import optax

    from pipeline.training.train import cross_entropy

    logits = (4 * jax.random.normal(jax.random.key(0), (3, 5, 300))).astype(jnp.bfloat16)
    targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 300)
    weights = jnp.arange(15.0).reshape(3, 5)  # a weight per position: the gradient's g

    def reference(x):
        wide = x.astype(jnp.float32)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(wide, targets) * weights)

    def ours(x):
        return jnp.sum(cross_entropy(x, targets) * weights)

    assert cross_entropy(logits, targets).dtype == jnp.float32
    np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-6)
    grad, want = jax.jit(jax.grad(ours))(logits), jax.jit(jax.grad(reference))(logits)
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(grad, np.float32), np.asarray(want.astype(jnp.bfloat16), np.float32), atol=1e-6
    )


def test_the_loss_in_the_compute_dtype_trains_as_the_float32_loss():
    """A bfloat16 model's per-token losses and gradients with loss_dtype=compute (bfloat16
    logits) match loss_dtype=float32's within bfloat16's rounding; chunked as well."""
    from pipeline.training.train import token_losses

    tokens = _tokens((2, 21))
    results = {}
    for loss_dtype, chunk in (("float32", 0), ("compute", 0), ("compute", 7)):
        cfg = ModelConfig(
            **{**VARIANTS["gpt2"].__dict__, "compute_dtype": "bfloat16", "loss_chunk": chunk},
        )
        cfg = dataclasses.replace(cfg, loss_dtype=loss_dtype)
        graphdef, state = nnx.split(create_model(cfg, seed=3))

        def loss(state, graphdef=graphdef):
            losses = token_losses(nnx.merge(graphdef, state), tokens[:, :-1], tokens[:, 1:])
            return jnp.mean(losses), losses

        results[loss_dtype, chunk] = jax.jit(jax.grad(loss, has_aux=True))(state)
    g32, l32 = results["float32", 0]
    for key in (("compute", 0), ("compute", 7)):
        g, losses = results[key]
        assert losses.dtype == jnp.float32
        np.testing.assert_allclose(losses, l32, rtol=2e-2, atol=2e-2)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g32), strict=True):
            scale = float(np.abs(np.asarray(b, np.float32)).max()) or 1.0
            diff = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()
            assert diff <= 0.05 * scale, (key, diff, scale)


@pytest.mark.parametrize(
    "d_in, d_out, transposed", [(8, 24, False), (8, 24, True), (24, 8, False), (16, 16, False)]
)
def test_a_projections_gradients_in_the_forms_for_cpu_are_autodiffs(
    d_in, d_out, transposed, optimized
):
    """`rows_dot_general`: a widening projection takes its own gradient forms (a custom VJP)
    on CPU, a square or narrowing one plain autodiff's; the values are autodiff's (also for a
    matrix given as a transpose, the tied head's table.T), and a gradient nobody asks for (a
    frozen LoRA base's) is not computed: as many matmuls as plain."""
    x = jax.random.normal(jax.random.key(0), (12, d_in))
    w = jax.random.normal(jax.random.key(1), (d_out, d_in) if transposed else (d_in, d_out))

    def loss(dot):
        def f(x, w):
            y = dot(x, w.T if transposed else w, _ROWS)
            return jnp.sum(jnp.sin(y) * jnp.arange(d_out))

        return f

    ours, plain = loss(rows_dot_general), loss(jax.lax.dot_general)
    custom = "custom_vjp" in str(jax.make_jaxpr(ours)(x, w))
    assert custom == (d_out > d_in)
    for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    dots = lambda f: jax.jit(jax.grad(f)).lower(x, w).compile().as_text().count(" dot(")  # noqa: E731
    assert dots(ours) == dots(plain) == 2
    # a matrix over WIDENING_MAX keeps autodiff's forms (a jaxpr only: nothing this size runs)
    big = jax.ShapeDtypeStruct((d_in, WIDENING_MAX // d_in + 1), jnp.float32)
    product = lambda x, w: rows_dot_general(x, w, _ROWS)  # noqa: E731
    assert "custom_vjp" not in str(jax.make_jaxpr(product)(x, big))
