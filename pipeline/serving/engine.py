"""The serving engine: continuous batching over a fixed number of decode slots.

`slots` requests decode together in one KV cache of `[slots, max_len]` rows. One engine step
decodes one token for every slot in one jitted call (per-slot positions, sampling values and
step counters live on the device); a new request is prefilled on its own (prompt length padded
to a bucket) and its keys and values are copied into a free slot while the other slots keep
decoding; a slot frees as soon as its request ends. Every program is compiled at start-up
(`warmup`), so the first request is as fast as the hundredth.

Tokens leave the engine through each request's `emit(token, finish_reason)` callback, called
from the engine thread; `finish_reason` is None until the last call ("stop" at an end-of-text
token, "length" at the token budget, "cancelled" after `cancel`). Text-level stop sequences
belong to the caller, which cancels the request when it sees one.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipeline.inference.generate import buckets, check_request, decode_step, prefill
from pipeline.inference.sampling import (
    Sampling,
    check_sampling,
    request_keys,
    sample,
    sampling_arrays,
)
from pipeline.inference.speculative import speculate
from pipeline.model import init_cache
from pipeline.serving.controls import (
    MAX_TOP_LOGPROBS,
    Controls,
    adjust,
    admit_controls,
    check_controls,
    control_arrays,
    init_controls,
    logprobs,
    mask_words,
    record,
)

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """Every slot is busy and the waiting queue is at its limit: retry later."""


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    emit: Callable[[int | None, str | None], None]
    stop_ids: frozenset[int] = frozenset()
    controls: Controls = Controls()
    # with controls.logprobs: per emitted token (its log-probability, the top ids, their
    # log-probabilities), appended by the engine thread before the token is emitted
    logprobs: list = field(default_factory=list)
    # choice i > 0 of an n-choice request: choice 0, whose prefilled prompt it copies
    parent: Request | None = None
    # structured outputs: an llguidance LLMatcher; its token mask constrains every step, and
    # the request ends ("end": its last token kept) once the grammar is complete
    grammar: Any = None
    id: int = field(default_factory=itertools.count().__next__)
    submitted: float = field(default_factory=time.perf_counter)
    generated: int = 0
    last_token_at: float = 0.0
    cancelled: bool = False


def _write_rows(cache, small, slot_ids):
    P = small[0]["k"].shape[2]
    return [
        {name: big[name].at[slot_ids, :, :P].set(layer[name], mode="drop") for name in ("k", "v")}
        for big, layer in zip(cache, small, strict=True)
    ]


@partial(
    jax.jit,
    static_argnames=("graphdef", "dgraph"),
    donate_argnames=("slots", "ctl", "cache", "dcache"),
)
def _insert(
    params,
    slots,
    ctl,
    cache,
    tokens,
    lengths,
    slot_ids,
    sampling,
    controls,
    mask,
    dparams,
    dcache,
    *,
    graphdef,
    dgraph,
):
    """Prefill n prompts (n, P) together, write their keys/values into rows `slot_ids` (of the
    draft's cache too, with a draft) and sample their first tokens: tokens (n,) and their
    log-probabilities. A slot id past the last slot marks a padding row (its writes are
    dropped)."""
    model = nnx.merge(graphdef, params)
    n, P = tokens.shape
    logits, small = prefill(model, tokens, lengths, init_cache(model.cfg, n, P))
    temperature, top_k, top_p, seed = sampling
    keys = request_keys(seed, 0)
    ctl, rows = admit_controls(ctl, controls, tokens, lengths, slot_ids)
    shaped = adjust(logits, rows, jnp.zeros_like(lengths), mask)
    first = sample(shaped, keys, temperature, top_k, top_p)
    info = logprobs(logits, first, rows["logprobs"])
    ctl = record(ctl, first, slot_ids)
    cache = _write_rows(cache, small, slot_ids)
    if dgraph is not None:
        draft = nnx.merge(dgraph, dparams)
        _, dsmall = prefill(draft, tokens, lengths, init_cache(draft.cfg, n, P))
        dcache = _write_rows(dcache, dsmall, slot_ids)
    values = {
        "token": first,
        "position": lengths,
        "step": jnp.ones_like(lengths),
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "seed": seed,
    }
    slots = {k: slots[k].at[slot_ids].set(v, mode="drop") for k, v in values.items()}
    return first, info, slots, ctl, cache, dcache


@partial(
    jax.jit,
    static_argnames=("graphdef", "dgraph", "rows", "k"),
    donate_argnames=("slots", "cache", "dcache"),
)
def _speculative_step(params, dparams, slots, cache, dcache, *, graphdef, dgraph, rows, k):
    """One speculative round for slots 0..rows-1: candidates (rows, k+1) and how many of them
    (n + 1) each slot produced."""
    target, draft = nnx.merge(graphdef, params), nnx.merge(dgraph, dparams)
    part = jax.tree.map(lambda x: x[:rows], slots)
    keys = request_keys(part["seed"], part["step"])
    max_pos = cache[0]["k"].shape[2] - k - 1
    positions = jnp.minimum(part["position"], max_pos)  # idle slots must stay in range
    emitted, n, t, cache, dcache = speculate(
        target,
        draft,
        positions,
        part["token"],
        cache,
        dcache,
        keys,
        (part["temperature"], part["top_k"], part["top_p"]),
        k,
    )
    part = {**part, "token": t, "position": part["position"] + n + 1, "step": part["step"] + 1}
    slots = jax.tree.map(
        lambda whole, new: jax.lax.dynamic_update_slice_in_dim(whole, new, 0, axis=0), slots, part
    )
    return emitted, n + 1, slots, cache, dcache


@partial(jax.jit, static_argnames=("graphdef", "rows"), donate_argnames=("slots", "ctl", "cache"))
def _step(params, slots, ctl, cache, mask, *, graphdef, rows: int):
    """Feed the last token of slots 0..rows-1, sample their next tokens: tokens (rows,) and
    their log-probabilities (zeros unless a slot asked for them).

    Active requests are kept in the lowest slots, so a step costs what its `rows` (the number
    of active slots rounded up to a power of two) cost, not what every slot would.
    """
    model = nnx.merge(graphdef, params)
    part = jax.tree.map(lambda x: x[:rows], slots)
    max_pos = cache[0]["k"].shape[2] - 1
    positions = jnp.minimum(part["position"], max_pos)  # idle slots must stay in range
    # The model writes rows 0..rows-1 of the whole cache in place and attends over those rows.
    logits, cache = decode_step(model, part["token"], positions, cache)
    keys = request_keys(part["seed"], part["step"])
    view = {k: v[:rows] for k, v in ctl.items()}
    shaped = adjust(logits, view, part["step"], mask)  # step: tokens generated so far
    tokens = sample(shaped, keys, part["temperature"], part["top_k"], part["top_p"])
    info = logprobs(logits, tokens, view["logprobs"])
    ctl = record(ctl, tokens, jnp.arange(rows))
    part = {**part, "token": tokens, "position": part["position"] + 1, "step": part["step"] + 1}
    slots = jax.tree.map(
        lambda whole, new: jax.lax.dynamic_update_slice_in_dim(whole, new, 0, axis=0), slots, part
    )
    return tokens, info, slots, ctl, cache


@partial(jax.jit, static_argnames=("graphdef",))
def _score(params, tokens, *, graphdef):
    """Log-probabilities of a prompt's tokens under the model (echo): for position i >= 1, that
    of token i given tokens 0..i-1 (position 0 gets 0), and the top ones there."""
    model = nnx.merge(graphdef, params)
    logits, _ = model(tokens)  # (1, P, V) float32
    lp = jax.nn.log_softmax(logits[0, :-1], axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[0, 1:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(lp, min(MAX_TOP_LOGPROBS, lp.shape[-1]))
    pad = lambda x: jnp.concatenate([jnp.zeros_like(x[:1]), x])  # noqa: E731
    return pad(chosen), pad(top_ids), pad(top_lp)


@partial(jax.jit, donate_argnames=("slots", "ctl", "cache"))
def _fork(slots, ctl, cache, src, dst, token, position, seed):
    """Another choice of the request in slot `src`, in slot `dst`: its prompt's keys/values
    and controls copied, not computed again. It restarts at the prompt's last token (position
    `position`), so the next step samples its first token from its own seed."""
    slots, ctl, cache = jax.tree.map(lambda x: x.at[dst].set(x[src]), (slots, ctl, cache))
    restart = {"token": token, "position": position, "step": jnp.int32(0), "seed": seed}
    slots = {k: v.at[dst].set(restart[k]) if k in restart else v for k, v in slots.items()}
    return slots, {**ctl, "counts": ctl["counts"].at[dst].set(0)}, cache


@partial(jax.jit, donate_argnames=("slots", "ctl", "cache"))
def _move(slots, ctl, cache, src, dst):
    """Copy slot `src` (its keys/values, sampling state and controls) into slot `dst`."""
    return jax.tree.map(lambda x: x.at[dst].set(x[src]), (slots, ctl, cache))


class Engine:
    """Continuous batching for one model. `start()` runs the loop in a thread."""

    def __init__(
        self,
        model,
        slots: int = 8,
        max_len: int | None = None,
        max_queue: int = 64,
        observe: Callable[[str, float], None] | None = None,
        draft=None,
        draft_k: int = 4,
    ):
        """`observe(name, value)` receives, from the engine thread, "prompt_tokens" (per
        admitted request), "ttft" and "itl" (seconds: to a request's first token, between its
        tokens). With a `draft` model (same vocabulary), each step is a round of speculative
        decoding: up to `draft_k` + 1 tokens per slot, the target's distribution unchanged."""
        cfg = model.cfg
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        self.num_slots = slots
        self.max_queue = max_queue
        self.buckets = buckets(self.max_len)
        self.row_buckets = buckets(slots, smallest=1)
        # Requests admitted together share one prefill call (padded to one of these sizes).
        self.admit_sizes = sorted({1, min(4, slots), min(16, slots)})
        self.graphdef, self.params = nnx.split(model)
        self.draft_k = draft_k if draft is not None else 0
        # a speculative round writes up to draft_k positions past a slot's last token
        length = self.max_len + (draft_k + 1 if draft is not None else 0)
        self.cache = init_cache(cfg, slots, length)
        self.dgraph, self.dparams, self.dcache = None, None, None
        if draft is not None:
            if draft.cfg.vocab_size != cfg.vocab_size:
                raise ValueError("the draft's vocabulary differs from the model's")
            self.dgraph, self.dparams = nnx.split(draft)
            self.dcache = init_cache(draft.cfg, slots, length)
        self.slots = {
            "token": jnp.zeros((slots,), jnp.int32),
            "position": jnp.zeros((slots,), jnp.int32),
            "step": jnp.zeros((slots,), jnp.int32),
            "temperature": jnp.zeros((slots,), jnp.float32),
            "top_k": jnp.zeros((slots,), jnp.int32),
            "top_p": jnp.ones((slots,), jnp.float32),
            "seed": jnp.zeros((slots,), jnp.uint32),
        }
        self.ctl = init_controls(slots, cfg.vocab_size)
        self.vocab_size = cfg.vocab_size
        # each slot's allowed next tokens (bitmasks, all ones: every token), refreshed from its
        # grammar after each of its tokens; sent to the device only while a grammar is active
        self.masks = np.full((slots, mask_words(cfg.vocab_size)), -1, np.int32)
        self._allow_all = {
            rows: jnp.full((rows, self.masks.shape[1]), -1, jnp.int32)
            for rows in sorted({*self.row_buckets, *self.admit_sizes})
        }
        self.active: list[Request | None] = [None] * slots
        self.waiting: deque[Request] = deque()
        self.observe = observe or (lambda name, value: None)
        self.steps = 0
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.compile_seconds = 0.0

    # --- public, thread-safe ---------------------------------------------------------------

    def check(
        self, prompt_len: int, max_tokens: int, sampling: Sampling, controls: Controls = Controls()
    ) -> None:
        """Raise ValueError (a message for the client) for a request this engine cannot run."""
        check_request(prompt_len, max_tokens, self.max_len)
        check_sampling(sampling)
        check_controls(controls, self.vocab_size)
        if self.dgraph is not None and (controls.shapes_logits or controls.logprobs):
            raise ValueError(
                "logprobs, penalties, logit_bias and min_tokens are not supported with "
                "speculative decoding (serve.draft)"
            )

    def submit(self, request: Request) -> Request:
        self.check(len(request.prompt), request.max_tokens, request.sampling, request.controls)
        with self._lock:
            if not self._running:
                raise QueueFullError("the engine is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self.waiting)} requests are waiting for a slot")
            self.waiting.append(request)
            self._lock.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (a client went away, a stop sequence matched); frees its slot."""
        with self._lock:
            request.cancelled = True
            self._lock.notify()

    def score(self, prompt: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The prompt's token log-probabilities (the first is 0: nothing predicts it), the top
        ids and their log-probabilities at each position, from one forward pass (thread-safe:
        it runs beside the engine's own programs)."""
        if not 1 <= len(prompt) <= self.max_len:
            raise ValueError(f"the prompt must be 1..{self.max_len} tokens, got {len(prompt)}")
        P = next(b for b in self.buckets if b >= len(prompt))
        tokens = np.zeros((1, P), np.int32)
        tokens[0, : len(prompt)] = prompt
        out = _score(self.params, jnp.asarray(tokens), graphdef=self.graphdef)
        return tuple(np.asarray(x)[: len(prompt)] for x in out)

    @property
    def busy_slots(self) -> int:
        return sum(r is not None for r in self.active)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def warmup(self) -> float:
        """Compile every program (one prefill per bucket, the decode step) before serving."""
        start = time.perf_counter()
        for P in self.buckets:
            for n in self.admit_sizes:
                requests = [Request([0], 1, Sampling(), lambda t, r: None)] * n
                self._prefill(requests, [self.num_slots] * n, P)  # padding rows only
        for P in self.buckets:  # echo's prompt scoring
            _score(self.params, jnp.zeros((1, P), jnp.int32), graphdef=self.graphdef)
        for rows in self.row_buckets:
            tokens = self._run_step(rows)[0]
        self._move(0, 0)
        self.slots, self.ctl, self.cache = _fork(
            self.slots, self.ctl, self.cache, *(jnp.int32(0),) * 4, jnp.uint32(0)
        )
        jax.block_until_ready(tokens)
        self.compile_seconds = time.perf_counter() - start
        log.info(
            "engine ready: %d slots x %d positions, prefill buckets %s, decode rows %s, "
            "compiled in %.1f s",
            self.num_slots,
            self.max_len,
            self.buckets,
            self.row_buckets,
            self.compile_seconds,
        )
        return self.compile_seconds

    def start(self) -> Engine:
        with self._lock:
            self._running = True
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with `drain`, finish the admitted and waiting ones first."""
        with self._lock:
            self._running = False
            if not drain:
                for request in [*self.waiting, *filter(None, self.active)]:
                    request.cancelled = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the engine thread -----------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._has_work():
                        if not self._running:
                            return
                        self._lock.wait()
                    self._free_cancelled()
                    self._compact()
                    free = [i for i, r in enumerate(self.active) if r is None]
                    admit = [self.waiting.popleft() for _ in free[: len(self.waiting)]]
                if admit:
                    self._admit(free[: len(admit)], admit)
                self._compact()
                if any(r is not None for r in self.active):
                    self._decode()
                    self._compact()
        except Exception:  # a bug must not hang every client: end them all, then re-raise
            log.exception("engine loop failed")
            with self._lock:
                self._running = False
                for request in [*self.waiting, *filter(None, self.active)]:
                    request.emit(None, "error")
                self.waiting.clear()
                self.active = [None] * self.num_slots
            raise

    def _has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.active)

    def _free_cancelled(self) -> None:
        for slot, request in enumerate(self.active):
            if request is not None and request.cancelled:
                self._finish(slot, None, "cancelled")
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            request.emit(None, "cancelled")

    def _prefill(self, requests: list[Request], slot_ids: list[int], P: int):
        """One `_insert` call for these requests, padded to an admit size: first tokens."""
        n = next(size for size in self.admit_sizes if size >= len(requests))
        pad = n - len(requests)
        tokens = np.zeros((n, P), np.int32)
        for i, request in enumerate(requests):
            tokens[i, : len(request.prompt)] = request.prompt
        samplings = [r.sampling for r in requests] + [Sampling()] * pad
        controls = [r.controls for r in requests] + [Controls()] * pad
        if any(r.grammar is not None for r in requests):
            mask = np.full((n, self.masks.shape[1]), -1, np.int32)
            for i, request in enumerate(requests):
                if request.grammar is not None:
                    _fill_mask(request.grammar, mask, i)
        else:
            mask = self._allow_all[n]
        first, info, self.slots, self.ctl, self.cache, self.dcache = _insert(
            self.params,
            self.slots,
            self.ctl,
            self.cache,
            jnp.asarray(tokens),
            jnp.asarray([len(r.prompt) for r in requests] + [1] * pad, jnp.int32),
            jnp.asarray(list(slot_ids) + [self.num_slots] * pad, jnp.int32),
            sampling_arrays(samplings),
            control_arrays(controls),
            mask,
            self.dparams,
            self.dcache,
            graphdef=self.graphdef,
            dgraph=self.dgraph,
        )
        return np.asarray(first)[: len(requests)], info

    def _admit(self, slot_ids: list[int], requests: list[Request]) -> None:
        """Waiting requests into free slots: prefilled, or (another choice of a request being
        decoded) forked from their first choice's slot."""
        pairs = list(zip(slot_ids, requests, strict=True))
        fresh = [(s, r) for s, r in pairs if r.parent is None]
        if fresh:
            self._admit_fresh([s for s, _ in fresh], [r for _, r in fresh])
        for slot, request in [(s, r) for s, r in pairs if r.parent is not None]:
            src = next((i for i, a in enumerate(self.active) if a is request.parent), None)
            if src is None:  # its first choice has ended: prefill it as any request
                self._admit_fresh([slot], [request])
                continue
            prompt = request.prompt
            self.slots, self.ctl, self.cache = _fork(
                self.slots,
                self.ctl,
                self.cache,
                jnp.int32(src),
                jnp.int32(slot),
                jnp.int32(prompt[-1]),
                jnp.int32(len(prompt) - 1),
                jnp.uint32(request.sampling.seed),
            )
            self.active[slot] = request
            if request.grammar is not None:
                _fill_mask(request.grammar, self.masks, slot)

    def _admit_fresh(self, slot_ids: list[int], requests: list[Request]) -> None:
        """Prefill waiting requests into free slots, up to the largest admit size per call."""
        start = 0
        while start < len(requests):
            left = len(requests) - start
            # pad up to the next size when that wastes less than half of it, else split
            up = [s for s in self.admit_sizes if s >= left]
            size = (
                up[0] if up and up[0] < 2 * left else max(s for s in self.admit_sizes if s <= left)
            )
            group, ids = requests[start : start + size], slot_ids[start : start + size]
            start += len(group)
            P = next(b for b in self.buckets if b >= max(len(r.prompt) for r in group))
            first, info = self._prefill(group, ids, P)
            info = _host_info(info, any(r.controls.logprobs for r in group))
            for i, (slot, request, token) in enumerate(zip(ids, group, first, strict=False)):
                self.active[slot] = request
                self.observe("prompt_tokens", len(request.prompt))
                self._deliver(slot, int(token), info and (info[0][i], info[1][i], info[2][i]))

    def _compact(self) -> None:
        """Keep the active requests in slots 0..n-1: move the highest into the lowest hole."""
        while True:
            used = [i for i, r in enumerate(self.active) if r is not None]
            holes = [i for i, r in enumerate(self.active) if r is None]
            if not used or not holes or holes[0] > used[-1]:
                return
            src, dst = used[-1], holes[0]
            self._move(src, dst)
            self.active[dst], self.active[src] = self.active[src], None

    def _move(self, src: int, dst: int) -> None:
        self.slots, self.ctl, self.cache = _move(
            self.slots, self.ctl, self.cache, jnp.int32(src), jnp.int32(dst)
        )
        self.masks[dst] = self.masks[src]

    def _run_step(self, rows: int):
        """One jitted step for slots 0..rows-1: (tokens (rows, m), how many of them (rows,),
        their log-probabilities or None)."""
        if self.dgraph is None:
            constrained = any(r is not None and r.grammar is not None for r in self.active[:rows])
            mask = jnp.asarray(self.masks[:rows]) if constrained else self._allow_all[rows]
            tokens, info, self.slots, self.ctl, self.cache = _step(
                self.params,
                self.slots,
                self.ctl,
                self.cache,
                mask,
                graphdef=self.graphdef,
                rows=rows,
            )
            return tokens[:, None], jnp.ones_like(tokens), info
        tokens, produced, self.slots, self.cache, self.dcache = _speculative_step(
            self.params,
            self.dparams,
            self.slots,
            self.cache,
            self.dcache,
            graphdef=self.graphdef,
            dgraph=self.dgraph,
            rows=rows,
            k=self.draft_k,
        )
        return tokens, produced, None

    def _decode(self) -> None:
        n = sum(r is not None for r in self.active)  # compact: slots 0..n-1
        rows = next(b for b in self.row_buckets if b >= n)
        tokens, produced, info = self._run_step(rows)
        tokens, produced = np.asarray(tokens), np.asarray(produced)
        info = _host_info(info, any(r is not None and r.controls.logprobs for r in self.active))
        self.steps += 1
        for slot, request in enumerate(self.active):
            for token in tokens[slot, : produced[slot]] if request is not None else ():
                if self.active[slot] is not request:  # it ended within this round
                    break
                self._deliver(
                    slot, int(token), info and (info[0][slot], info[1][slot], info[2][slot])
                )

    def _deliver(self, slot: int, token: int, info=None) -> None:
        request = self.active[slot]
        now = time.perf_counter()
        if request.cancelled:
            self._finish(slot, None, "cancelled")
            return
        if request.controls.logprobs and info is not None:
            request.logprobs.append((float(info[0]), info[1].tolist(), info[2].tolist()))
        if request.generated == 0:
            self.observe("ttft", now - request.submitted)
        else:
            self.observe("itl", now - request.last_token_at)
        request.generated += 1
        request.last_token_at = now
        if request.grammar is not None and token not in request.stop_ids:
            request.grammar.consume_token(token)
            if request.grammar.is_stopped():  # the grammar is complete: this token ends it
                self._finish(slot, token, "end")
                return
            _fill_mask(request.grammar, self.masks, slot)
        if token in request.stop_ids:
            self._finish(slot, token, "stop")
        elif request.generated >= request.max_tokens:
            self._finish(slot, token, "length")
        else:
            request.emit(token, None)

    def _finish(self, slot: int, token: int | None, reason: str) -> None:
        request = self.active[slot]
        self.active[slot] = None
        self.masks[slot] = -1
        request.emit(token, reason)


def _host_info(info, wanted: bool):
    """The step's log-probabilities as host arrays, fetched only when a request wants them."""
    if info is None or not wanted:
        return None
    return tuple(np.asarray(x) for x in info)


def _fill_mask(grammar, masks: np.ndarray, row: int) -> None:
    """Row `row` of `masks` := the tokens `grammar` allows next."""
    from llguidance.numpy import fill_next_token_bitmask

    fill_next_token_bitmask(grammar, masks, row)
