"""The paged serving engine: block bookkeeping, the paged attention, prefix caching, chunked
prefill and preemption, each checked against generation alone.

Run: pytest tests/test_paged.py
"""

import threading
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import CFG  # the serving tests' tiny Llama-style model

from pipeline.attention import PagedLayer
from pipeline.inference.generate import generate
from pipeline.inference.sampling import Sampling
from pipeline.model import create_model, init_cache, init_paged_cache
from pipeline.serving.blocks import BlockPool, OutOfBlocksError, block_digests
from pipeline.serving.engine import Engine, Request


@pytest.fixture(scope="module")
def model():
    return create_model(CFG, seed=3)


def test_block_pool_shares_caches_evicts_and_never_leaks():
    pool = BlockPool(4, 2)
    tokens = [1, 2, 3, 4, 5]
    digests = block_digests(tokens, 2)
    assert len(digests) == 2 and digests != block_digests([1, 2, 3, 9, 5], 2)[:2]
    assert digests[0] == block_digests([1, 2, 7], 2)[0]  # a digest names its prefix only
    a = [pool.allocate() for _ in range(3)]
    for block, digest in zip(a, digests, strict=False):
        pool.register(block, digest)
    assert pool.lookup(digests, 2) == a[:2] and pool.refs[a[0]] == 2
    pool.release(a[:2])  # the second holder ends
    pool.release(a)  # the first too: its two full blocks stay cached
    assert pool.available == 4 and len(pool.cached) == 2
    assert pool.lookup(digests, 1) == a[:1]  # still there, at most `usable` of them
    pool.release(a[:1])
    held = [pool.allocate() for _ in range(4)]  # the free ones first, then the cached (LRU)
    assert sorted(held) == [0, 1, 2, 3] and not pool.by_digest
    with pytest.raises(OutOfBlocksError):
        pool.allocate()
    pool.release(held)
    assert pool.available == 4 and pool.used == 0
    assert pool.hits == 6 and pool.hit_rate == pytest.approx(6 / 6)


def test_paged_attention_equals_the_contiguous_cache(model):
    """Prefill then decode through scattered blocks give the contiguous cache's logits."""
    B, P, bs = 2, 11, 4
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, P + 3)), jnp.int32)
    # each row's blocks in a shuffled order of a pool with spare blocks
    order = rng.permutation(12)
    table = jnp.asarray(order[:10].reshape(B, 5), jnp.int32)
    paged = [PagedLayer(p["k"], p["v"], table) for p in init_paged_cache(CFG, 12, bs)]
    flat = init_cache(CFG, B, 20)
    pos = jnp.broadcast_to(jnp.arange(P), (B, P))
    graphdef, state = nnx.split(model)
    # jitted (eager dispatch compiles op by op); the weights an argument, not constants
    forward = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))
    want, flat = forward(state, tokens[:, :P], pos, flat)
    got, paged = forward(state, tokens[:, :P], pos, paged)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for t in range(P, P + 3):  # decode, each row its own position
        p = jnp.full((B, 1), t)
        want, flat = forward(state, tokens[:, t : t + 1], p, flat)
        got, paged = forward(state, tokens[:, t : t + 1], p, paged)
        np.testing.assert_allclose(got, want, atol=1e-5)


def _run(engine: Engine, prompts, budgets, samplings=None, start=True):
    """Submit every prompt at once; each request's tokens. (No warmup: the programs the
    requests need compile on first use.)"""
    samplings = samplings or [Sampling()] * len(prompts)
    out = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def emitter(i):
        def emit(token, reason):
            if token is not None:
                out[i].append(token)
            if reason is not None:
                done.release()

        return emit

    if start:
        engine.start()
    for i, (p, n, s) in enumerate(zip(prompts, budgets, samplings, strict=True)):
        engine.submit(Request(list(p), n, s, emitter(i)))
    for _ in prompts:
        assert done.acquire(timeout=300)
    return out


def _alone(model, prompt, n, sampling=Sampling()):
    return generate(model, [list(prompt)], n, sampling).tokens[0][:n]


def _mixed(n, seed=0, longest=100):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, longest, n)
    prompts = [rng.integers(0, CFG.vocab_size, int(L)).tolist() for L in lengths]
    budgets = [int(rng.integers(1, 128 - L)) for L in lengths]
    return prompts, [min(b, 24) for b in budgets]


@pytest.mark.e2e  # a whole stage or a loaded engine: make test, not test-fast
@pytest.mark.parametrize("wait", [(0.0, 0), (1.2, 6)], ids=["at-once", "prefills-wait"])
def test_32_mixed_requests_with_chunks_and_preemption_equal_generation_alone(model, wait):
    """32 concurrent requests of mixed lengths, greedy and seeded sampling, through prompts
    prefilled 16 tokens at a time and a pool too small for the load (preemption), their
    prefills at once or waiting for company while others decode (`prefill_wait`): every
    request's tokens are those of `generate` alone, and no block leaks."""
    prompts, budgets = _mixed(32)
    samplings = [
        Sampling() if i % 2 else Sampling(temperature=0.9, top_k=20, seed=i)
        for i in range(len(prompts))
    ]
    # 24 blocks of 8: about 4 requests at their longest, for 8 slots
    engine = Engine(model, slots=8, kv_blocks=24, block_size=8, prefill_chunk=16, prefill_wait=wait)
    out = _run(engine, prompts, budgets, samplings)
    engine.stop()
    assert engine.preemptions > 0
    for got, p, n, s in zip(out, prompts, budgets, samplings, strict=True):
        assert got == _alone(model, p, n, s)
    assert engine.blocks.used == 0 and engine.busy_slots == 0


@pytest.mark.e2e  # a whole stage or a loaded engine: make test, not test-fast
def test_a_long_request_decodes_in_a_step_of_its_own_and_changes_no_token(model):
    """Short requests decoding beside a long one: their step does not read the long one's
    blocks (the long one runs in a second step), and every request gets its tokens alone."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (3, 110, 5, 7, 4)]
    engine = Engine(model, slots=8, block_size=8)
    engine.sched.call_blocks = 4  # a second call is cheap next to 14 blocks per short row
    groups = []
    plan = engine.sched.groups
    engine.sched.groups = lambda ready: groups.append(plan(ready)) or groups[-1]
    out = _run(engine, prompts, [12] * 5)
    engine.stop()
    splits = [step for step in groups if len(step) == 2]
    assert splits and all(len(step[1]) == 1 for step in splits), groups  # the long one alone
    assert max(len(step[0]) for step in splits) == 4  # the four short ones together
    for got, p in zip(out, prompts, strict=True):
        assert got == _alone(model, p, 12)
    assert engine.blocks.used == 0


@pytest.mark.e2e  # a whole stage or a loaded engine: make test, not test-fast
def test_on_cpu_a_small_model_decodes_short_and_long_requests_in_one_call(model):
    """Nine short requests beside a long one, the call's cost as the engine prices it: the
    weights alone (100 blocks here) made a second call worth its 16 rows x 13 blocks spared;
    on CPU a call also costs its dispatch (`CPU_CALL_BYTES`, 1,024 blocks here), so every
    step is one call (two doubled the dispatches for tens of microseconds of reads)."""
    assert jax.default_backend() == "cpu"
    rng = np.random.default_rng(4)
    lengths = (3, 110, 5, 7, 4, 6, 3, 5, 4, 6)
    prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]
    engine = Engine(model, slots=16, block_size=8)
    groups = []
    plan = engine.sched.groups
    engine.sched.groups = lambda ready: groups.append(plan(ready)) or groups[-1]
    out = _run(engine, prompts, [12] * 10)
    engine.stop()
    assert groups and all(len(step) == 1 for step in groups), groups
    assert max(len(step[0]) for step in groups) == 10
    assert out[1] == _alone(model, prompts[1], 12)


@pytest.mark.e2e  # a whole stage or a loaded engine: make test, not test-fast
def test_warmup_compiles_every_program_a_load_runs(model, caplog):
    """After `warmup` (ahead-of-time compilation, nothing run), a load of mixed prompt
    lengths, row counts, n choices and chunked prompts compiles nothing more; in the
    background variant, the programs a first request needs are ready when it returns."""
    engine = Engine(model, slots=8, block_size=8, prefill_chunk=32)
    engine.warmup()
    prompts, budgets = _mixed(12, seed=5)
    jax.config.update("jax_log_compiles", True)  # (for every thread: the engine's too)
    try:
        with caplog.at_level("WARNING"):
            out = _run(engine, prompts, budgets)
            engine.stop()
    finally:
        jax.config.update("jax_log_compiles", False)
    compiled = [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.message]
    assert compiled == [], compiled
    assert out[0] == _alone(model, prompts[0], budgets[0])
    background = Engine(model, slots=8, block_size=8, prefill_chunk=32)
    background.warmup(background=True)
    background.stop()  # waits for the background compilation (a process must not exit in it)
    assert not background._compiler.is_alive()


@pytest.mark.e2e  # a whole stage or a loaded engine: make test, not test-fast
def test_prefix_caching_reuses_blocks_and_changes_no_token(model):
    rng = np.random.default_rng(1)
    system = rng.integers(0, CFG.vocab_size, 40).tolist()
    turns = [system + rng.integers(0, CFG.vocab_size, int(n)).tolist() for n in (5, 9, 3, 12)]
    results = {}
    for caching in (True, False):
        engine = Engine(model, slots=4, block_size=8, prefix_caching=caching)
        engine.start()
        first = _run(engine, turns[:1], [8], start=False)  # its blocks then serve the rest
        rest = _run(engine, turns[1:], [8] * 3, start=False)
        engine.stop()
        results[caching] = first + rest
        hits = engine.blocks.hits
        assert hits == (3 * 5 * 8 if caching else 0)  # 40 shared tokens = 5 full blocks each
        assert engine.blocks.used == 0
    assert results[True] == results[False]
    assert results[True] == [_alone(model, t, 8) for t in turns]


@pytest.mark.e2e
def test_n_choices_share_the_prompt_blocks_and_sample_their_own(model):
    engine = Engine(model, slots=4, block_size=8)
    engine.start()
    prompt = list(range(21))
    out, done = [[] for _ in range(4)], threading.Semaphore(0)
    parent = None
    for i in range(4):
        emit = lambda t, r, i=i: (out[i].append(t) if t is not None else None, r and done.release())  # noqa: E731
        request = Request(prompt, 10, Sampling(temperature=1.0, seed=100 + i), emit, parent=parent)
        parent = parent or request
        engine.submit(request)
    for _ in range(4):
        assert done.acquire(timeout=120)
    engine.stop()
    for i in range(4):
        assert out[i] == _alone(model, prompt, 10, Sampling(temperature=1.0, seed=100 + i))
    assert len({tuple(o) for o in out}) == 4
    assert engine.blocks.used == 0


@pytest.mark.e2e  # a whole stage or a loaded engine: make test, not test-fast
def test_the_memory_of_16_contiguous_slots_holds_64_requests(model):
    """64 concurrent requests of mixed lengths in the blocks that 16 full-length slots used."""
    prompts, budgets = _mixed(64, seed=2, longest=60)
    engine = Engine(model, slots=64, kv_blocks=16 * 128 // 16, block_size=16)
    peak = []
    engine.observe = lambda name, value: peak.append(engine.busy_slots) if name == "ttft" else None
    out = _run(engine, prompts, budgets)
    engine.stop()
    assert max(peak) > 16  # more requests ran at once than 16 slots would have held
    for got, p, n in zip(out, prompts, budgets, strict=True):
        assert got == _alone(model, p, n)
    assert engine.blocks.used == 0


def _submit_all(engine, prompts, budgets, samplings, stops, controls):
    """Start the engine, submit every request at once, wait for all: (the requests, their
    tokens, their finish reasons)."""
    out, ends, done = [[] for _ in prompts], [None] * len(prompts), threading.Semaphore(0)

    def emitter(i):
        def emit(token, reason):
            if token is not None:
                out[i].append(token)
            if reason is not None:
                ends[i] = reason
                done.release()

        return emit

    requests = [
        Request(p, n, s, emitter(i), stop_ids=stop, controls=c)
        for i, (p, n, s, stop, c) in enumerate(
            zip(prompts, budgets, samplings, stops, controls, strict=True)
        )
    ]
    engine.start()
    for request in requests:
        engine.submit(request)
    for _ in prompts:
        assert done.acquire(timeout=300)
    return requests, out, ends


@pytest.mark.e2e  # a whole stage or a loaded engine: make test, not test-fast
def test_several_decode_steps_per_call_change_no_token_logprob_or_stop(model):
    """Decode calls of up to 4 (and 3) steps give the tokens, log-probabilities and endings of
    one step per call: greedy and seeded sampling, a penalty, a stop id met mid-call (with
    log-probabilities and without: delivered token by token, and a call's run at once), budgets
    that are no multiple of the steps; and they take fewer calls."""
    from pipeline.serving.controls import Controls

    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, CFG.vocab_size, int(n)).tolist() for n in (3, 17, 9, 30, 5)]
    budgets = [13, 7, 22, 10, 18]
    alone = _alone(model, prompts[2], budgets[2])
    stops = [frozenset(), frozenset(), frozenset({alone[9]}), frozenset(), frozenset()]
    samplings = [
        Sampling(temperature=0.8, top_k=30, seed=i) if i % 2 else Sampling() for i in range(5)
    ]
    controls = [
        Controls(logprobs=True),
        Controls(),
        Controls(logprobs=True),
        Controls(),
        Controls(presence=0.3, frequency=0.5),
    ]
    # request 2 again without log-probabilities: its tokens delivered a call's run at a time
    prompts, budgets, stops = [*prompts, prompts[2]], [*budgets, 22], [*stops, stops[2]]
    samplings, controls = [*samplings, Sampling()], [*controls, Controls()]
    results = {}
    for steps in (1, 3, 4):
        engine = Engine(model, slots=8, block_size=8, decode_steps=steps)
        requests, out, ends = _submit_all(engine, prompts, budgets, samplings, stops, controls)
        engine.stop()
        results[steps] = (out, ends, [r.logprobs for r in requests], engine.stats.steps)
        assert engine.blocks.used == 0 and [r.output for r in requests] == out
        assert [r.generated for r in requests] == [len(o) for o in out]
    out, ends, logprobs, calls = results[1]
    first = alone.index(alone[9])
    assert ends[2] == "stop" and out[2] == alone[: first + 1]  # ended at its stop id
    assert ends[5] == "stop" and out[5] == out[2]
    for steps in (3, 4):
        assert results[steps][0] == out and results[steps][1] == ends
        for mine, theirs in zip(results[steps][2], logprobs, strict=True):
            assert len(mine) == len(theirs)
            for (lp, ids, tops), (lp1, ids1, tops1) in zip(mine, theirs, strict=True):
                assert ids == ids1 and abs(lp - lp1) < 1e-5
                np.testing.assert_allclose(tops, tops1, atol=1e-5)
    assert len(logprobs[0]) == budgets[0] and len(logprobs[1]) == 0
    assert results[4][3] < calls / 2  # several steps per call


def test_a_request_larger_than_the_pool_is_refused(model):
    engine = Engine(model, slots=2, kv_blocks=4, block_size=8)
    with pytest.raises(ValueError, match="KV blocks"):
        engine.check(30, 10, Sampling())
    jax.block_until_ready(engine.pool[0]["k"])


def test_prompt_scoring_in_chunks_of_positions_equals_the_whole_forward(model, monkeypatch):
    """Echo's scoring runs a prompt a chunk of positions at a time through a KV cache, each
    chunk's logits reduced before the next (bounded memory on a long prompt of a large
    vocabulary): with chunks of 16 positions over a 37-token prompt (the last chunk padded),
    every token's log-probability and the top ones are the whole forward's."""
    from pipeline.serving import programs
    from pipeline.serving.controls import MAX_TOP_LOGPROBS

    monkeypatch.setattr(programs, "SCORE_CHUNK", 16)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (1, 37)), jnp.int32)
    graphdef, params = programs.split(model)
    score = programs.score.__wrapped__  # traced anew: the patched chunk size
    chosen, top_ids, top_lp = jax.jit(partial(score, graphdef=graphdef))(
        params, tokens, jnp.int32(0)
    )
    lp = jax.nn.log_softmax(model(tokens)[0][0, :-1], axis=-1)
    want = np.take_along_axis(np.asarray(lp), np.asarray(tokens[0, 1:, None]), axis=-1)[:, 0]
    np.testing.assert_allclose(chosen, np.concatenate([[0.0], want]), atol=1e-5)
    want_lp, want_ids = jax.lax.top_k(lp, MAX_TOP_LOGPROBS)
    np.testing.assert_array_equal(top_ids[1:], want_ids)
    np.testing.assert_allclose(top_lp[1:], want_lp, atol=1e-5)
    assert chosen.shape == top_ids.shape[:1] == (37,)
