"""The serving engine's jitted programs and how they are compiled.

Each program is a pure function of arrays: the slot state (`slot_state`), the logit controls
(`controls.py`), the paged KV pool (one per model: the draft's beside the target's), and the
call's host inputs (block tables, row ids, masks). The engine binds the model's graph into
each once (`bind`: a graph passed per call is hashed in Python every call) and compiles them
ahead of time from shapes alone (`aot`, `shapes`), never running one to warm it up.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from pipeline.attention import PagedLayer
from pipeline.inference.generate import decode_step
from pipeline.inference.sampling import request_keys, sample
from pipeline.inference.speculative import speculate
from pipeline.model import init_cache
from pipeline.serving.adapters import set_rows
from pipeline.serving.controls import (
    MAX_TOP_LOGPROBS,
    adjust,
    admit_controls,
    logprobs,
    record,
    restore_counts,
)


def split(model) -> tuple:
    """(graph, weights): the model's graph with its weights' tree, and the weights as a list of
    arrays, what the programs take (`merge`). A call flattens a list in C++; the nnx `State`
    it replaces is flattened in Python, a call at a time (30 us of a `tiny` decode call's
    0.2 ms dispatch quiet, 60 under a server's load)."""
    graphdef, state = nnx.split(model)
    weights, tree = jax.tree.flatten(state)
    return (graphdef, tree), weights


def merge(graph: tuple, weights: list):
    """The model of a graph and weights from `split` (inside a program: at trace time)."""
    graphdef, tree = graph
    return nnx.merge(graphdef, jax.tree.unflatten(tree, weights))


def block_bytes(cfg, block_size: int) -> int:
    """Bytes of one KV block of `cfg` (keys and values of every layer)."""
    itemsize = jnp.dtype(cfg.compute_dtype).itemsize
    return 2 * cfg.num_layers * cfg.num_kv_heads * block_size * cfg.head_dim * itemsize


def slot_state(slots: int) -> dict:
    """Each slot's sampling state on the device: its last token, position, step, sampling
    values, seed and adapter."""
    zeros = lambda dtype: jnp.zeros((slots,), dtype)  # noqa: E731
    return {
        "token": zeros(jnp.int32),
        "position": zeros(jnp.int32),
        "step": zeros(jnp.int32),
        "temperature": zeros(jnp.float32),
        "top_k": zeros(jnp.int32),
        "top_p": jnp.ones((slots,), jnp.float32),
        "seed": zeros(jnp.uint32),
        "adapter": zeros(jnp.int32),
    }


def _rows_tables(pool, tables, ids, live):
    """The block tables of a call's rows from every slot's (`tables` (slots, W)): slot `ids`'s
    where `live`, "none" (the pool's block count: writes dropped, nothing read) elsewhere."""
    none = pool[0]["k"].shape[0]
    safe = jnp.minimum(ids, tables.shape[0] - 1)
    return jnp.where(live[:, None], tables[safe], none)


def _paged(pool, tables):
    """The model's view of a paged cache: each layer's pool with the call's block table."""
    return [PagedLayer(layer["k"], layer["v"], tables) for layer in pool]


def _pool(cache):
    return [{"k": layer.k, "v": layer.v} for layer in cache]


def _update(slots: dict, values: dict, ids) -> dict:
    """Rows `ids` of the slot state := values (ids past the last slot: dropped)."""
    return {
        k: v.at[ids].set(values[k], mode="drop") if k in values else v for k, v in slots.items()
    }


@partial(
    jax.jit,
    static_argnames=("graphdef", "dgraph"),
    donate_argnames=("slots", "ctl", "pool", "dpool"),
)
def prefill(
    params, slots, ctl, pool, chunk, sampling, controls, mask, dparams, dpool, *, graphdef, dgraph
):
    """Run one chunk of n prompts (tokens (n, P), `lengths` of them real, from positions
    `starts`) into their blocks (`tables` (n, W)); sample a token for every row and keep it,
    with the slot's state, where the chunk is its prompt's last (`final`). A slot id past the
    last slot marks a padding row (its writes are dropped; its table is all "none")."""
    model = merge(graphdef, params)
    tokens, starts, lengths, tables = (
        chunk["tokens"],
        chunk["starts"],
        chunk["lengths"],
        chunk["tables"],
    )
    slot_ids, final, steps = chunk["slot_ids"], chunk["final"], chunk["steps"]
    P = tokens.shape[1]
    offsets = jnp.arange(P)[None]
    positions = jnp.where(offsets < lengths[:, None], starts[:, None] + offsets, -1)
    set_rows(model, chunk["adapters"])
    logits, cache = model(tokens, positions, _paged(pool, tables), only=lengths - 1)
    logits, pool = logits[:, 0], _pool(cache)
    if dgraph is not None:
        draft = merge(dgraph, dparams)
        _, dcache = draft(tokens, positions, _paged(dpool, tables), only=lengths - 1)
        dpool = _pool(dcache)
    temperature, top_k, top_p, seed = sampling
    ctl, rows = admit_controls(
        ctl, controls, tokens, lengths, slot_ids, chunk["first"], chunk["fresh"]
    )
    shaped = adjust(logits, rows, steps, mask)
    token = sample(shaped, request_keys(seed, steps), temperature, top_k, top_p)
    info = logprobs(logits, token, rows["logprobs"])
    done = jnp.where(final, slot_ids, slots["token"].shape[0])
    ctl = record(ctl, token, done)
    values = {
        "token": token,
        "position": starts + lengths,
        "step": steps + 1,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "seed": seed,
        "adapter": chunk["adapters"],
    }
    return token, info, _update(slots, values, done), ctl, pool, dpool


def _live_update(slots, part, live, rows):
    """Slots 0..rows-1 := `part` where `live`, unchanged elsewhere."""
    old = jax.tree.map(lambda x: x[:rows], slots)
    new = jax.tree.map(lambda n, o: jnp.where(live, n, o), part, old)
    return jax.tree.map(
        lambda whole, x: jax.lax.dynamic_update_slice_in_dim(whole, x, 0, axis=0), slots, new
    )


@partial(
    jax.jit,
    static_argnames=("graphdef", "dgraph", "rows", "k"),
    donate_argnames=("slots", "pool", "dpool"),
)
def speculative_step(
    params, dparams, slots, pool, dpool, tables, live, *, graphdef, dgraph, rows, k
):
    """One speculative round for slots 0..rows-1: candidates (rows, k+1) and how many of them
    (n + 1) each slot produced. `tables`: every slot's block tables; rows not `live` read
    "none" tables: nothing is written."""
    target, draft = merge(graphdef, params), merge(dgraph, dparams)
    part = jax.tree.map(lambda x: x[:rows], slots)
    tables = _rows_tables(pool, tables, jnp.arange(rows), live)
    keys = request_keys(part["seed"], part["step"])
    emitted, n, t, cache, dcache = speculate(
        target,
        draft,
        part["position"],
        part["token"],
        _paged(pool, tables),
        _paged(dpool, tables),
        keys,
        (part["temperature"], part["top_k"], part["top_p"]),
        k,
    )
    part = {**part, "token": t, "position": part["position"] + n + 1, "step": part["step"] + 1}
    return emitted, n + 1, _live_update(slots, part, live, rows), _pool(cache), _pool(dcache)


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("slots", "ctl", "pool"))
def step(params, slots, ctl, pool, tables, ids, live, mask, *, graphdef):
    """Feed the last token of slots `ids` (rows,), sample their next tokens: tokens (rows,) and
    their log-probabilities (zeros unless a slot asked for them). `tables`: every slot's block
    tables (slots, W). Rows not `live` (padding, or a slot still prefilling) read "none"
    tables, so they write nothing, and keep their state;
    their position counts as 0, so the attention reads as many block columns as the furthest
    live row needs, no more."""
    model = merge(graphdef, params)
    n = slots["token"].shape[0]
    rows = jnp.where(live, ids, n)  # where the results go (n: dropped)
    safe = jnp.minimum(ids, n - 1)  # (padding rows read the last slot)
    tables = _rows_tables(pool, tables, ids, live)
    part = jax.tree.map(lambda x: x[safe], slots)
    set_rows(model, part["adapter"])
    positions = jnp.where(live, part["position"], 0)
    logits, cache = decode_step(model, part["token"], positions, _paged(pool, tables))
    keys = request_keys(part["seed"], part["step"])
    # the rows' controls are gathered only when one of them has any: (rows, vocab) arrays each
    shaped = jax.lax.cond(
        jnp.any(ctl["active"][safe] & live),
        lambda: adjust(logits, {k: v[safe] for k, v in ctl.items()}, part["step"], mask),
        lambda: logits,
    )  # step: tokens generated so far
    tokens = sample(shaped, keys, part["temperature"], part["top_k"], part["top_p"])
    info = logprobs(logits, tokens, ctl["logprobs"][safe])
    ctl = record(ctl, tokens, rows)
    part = {**part, "token": tokens, "position": part["position"] + 1, "step": part["step"] + 1}
    return tokens, info, _update(slots, part, rows), ctl, _pool(cache)


@partial(jax.jit, static_argnames=("graphdef", "k"), donate_argnames=("slots", "ctl", "pool"))
def steps(params, slots, ctl, pool, tables, ids, live, mask, n, *, graphdef, k):
    """`n` (at most `k`, a traced count: one program for every count) decode steps of slots
    `ids` in one call, nothing from the host between them: tokens (k, rows) and their
    log-probabilities ((k, rows), (k, rows, K), (k, rows, K)); rows past the n-th are zeros.
    The tables must hold the blocks of the n positions each live row writes (or "none" where
    its tokens will be dropped: the steps past its budget)."""
    rows, top = ids.shape[0], min(MAX_TOP_LOGPROBS, ctl["counts"].shape[1])
    out = (
        jnp.zeros((k, rows), jnp.int32),
        (
            jnp.zeros((k, rows), jnp.float32),
            jnp.zeros((k, rows, top), jnp.int32),
            jnp.zeros((k, rows, top), jnp.float32),
        ),
    )

    def body(i, carry):
        slots, ctl, pool, (tokens, info) = carry
        new, new_info, slots, ctl, pool = step(
            params, slots, ctl, pool, tables, ids, live, mask, graphdef=graphdef
        )
        info = jax.tree.map(lambda buf, x: buf.at[i].set(x), info, new_info)
        return slots, ctl, pool, (tokens.at[i].set(new), info)

    slots, ctl, pool, (tokens, info) = jax.lax.fori_loop(0, n, body, (slots, ctl, pool, out))
    return tokens, info, slots, ctl, pool


# Prompt scoring runs a long prompt this many positions at most at a time through a KV cache,
# and makes its float32 logits this many at most at a time: 4,096 positions of a 1B Llama in one
# forward held 2.1 GB of attention scores, and its 128,256-token vocabulary 2.1 GB of logits and
# as much again of log-probabilities.
SCORE_CHUNK = 512
SCORE_LOGITS = 1 << 25


def score_chunk(length: int, vocab: int) -> int:
    """Positions per chunk of prompt scoring: a power of two (16 at least), at most
    `SCORE_CHUNK`, `SCORE_LOGITS` // `vocab`, or the prompt's length."""
    fits = max(16, min(SCORE_CHUNK, SCORE_LOGITS // vocab))
    return min(length, 1 << (fits.bit_length() - 1))


@partial(jax.jit, static_argnames=("graphdef",))
def score(params, tokens, adapter, *, graphdef):
    """Log-probabilities of a prompt's tokens under the model (with adapter `adapter`) (echo):
    for position i >= 1, that of token i given tokens 0..i-1 (position 0 gets 0), and the top
    ones there. The prompt goes a chunk of positions at a time (`score_chunk`) through a KV
    cache, each chunk's logits reduced to those before the next."""
    model = merge(graphdef, params)
    set_rows(model, adapter[None])
    P, V = tokens.shape[1], model.cfg.vocab_size
    size = score_chunk(P, V)
    n = -(-P // size)
    padded = jnp.pad(tokens[0], (0, n * size - P))
    targets = jnp.pad(tokens[0, 1:], (0, n * size - P + 1))  # position i predicts token i + 1

    def chunk(cache, i):
        ids = jax.lax.dynamic_slice_in_dim(padded, i * size, size)[None]
        x, cache = model.hidden(ids, (i * size + jnp.arange(size))[None], cache)
        lp = jax.nn.log_softmax(model.head(x)[0], axis=-1)  # (size, V)
        target = jax.lax.dynamic_slice_in_dim(targets, i * size, size)
        chosen = jnp.take_along_axis(lp, target[:, None], axis=-1)[:, 0]
        return cache, (chosen, *jax.lax.top_k(lp, min(MAX_TOP_LOGPROBS, V))[::-1])

    _, out = jax.lax.scan(chunk, init_cache(model.cfg, 1, n * size), jnp.arange(n))
    pad = lambda x: jnp.concatenate([jnp.zeros_like(x[:1]), x])  # noqa: E731
    return tuple(pad(y.reshape(n * size, *y.shape[2:])[: P - 1]) for y in out)


@partial(jax.jit, donate_argnames=("slots", "ctl"))
def fork(slots, ctl, src, dst, token, position, seed):
    """Another choice of the request in slot `src`, in slot `dst`: its state and controls
    copied (its prompt's blocks are shared or copied by the caller). It restarts at the
    prompt's last token (position `position`), so the next step samples its first token from
    its own seed."""
    slots, ctl = jax.tree.map(lambda x: x.at[dst].set(x[src]), (slots, ctl))
    restart = {"token": token, "position": position, "step": jnp.int32(0), "seed": seed}
    slots = {k: v.at[dst].set(restart[k]) if k in restart else v for k, v in slots.items()}
    return slots, {**ctl, "counts": ctl["counts"].at[dst].set(0)}


@partial(jax.jit, donate_argnames=("slots", "ctl"))
def move(slots, ctl, src, dst):
    """Copy slot `src`'s sampling state and controls into slot `dst` (its blocks stay put)."""
    return jax.tree.map(lambda x: x.at[dst].set(x[src]), (slots, ctl))


@partial(jax.jit, donate_argnames=("pools",))
def copy_block(pools, src, dst):
    """Block `dst` := block `src` in every layer of every pool (copy on write)."""
    return jax.tree.map(lambda x: x.at[dst].set(x[src]), pools)


restore_slot_counts = jax.jit(restore_counts, donate_argnames=("ctl",))


def bind(program, donate: tuple, static: tuple = (), options: dict | None = None, **bound):
    """`program` (a jitted function) jitted anew with arguments `bound` fixed, compiled with
    the compiler `options` (`cpu_forms.compiler_options`)."""
    return jax.jit(
        partial(program.__wrapped__, **bound),
        donate_argnames=donate,
        static_argnames=static,
        compiler_options=options,
    )


def aot(program, *args, **static):
    """A thunk that compiles `program` for these argument shapes ahead of time (a later call
    with arrays of those shapes finds it compiled)."""
    return lambda: program.lower(*args, **static).compile()


def shapes(tree):
    """The shapes and types of a tree's arrays (what compiling ahead of time needs)."""
    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=x.weak_type)
            if isinstance(x, jax.Array)
            else x
        ),
        tree,
    )
