"""The serving engine: continuous batching over a paged KV cache.

Up to `slots` requests run together. Their keys and values live in one pool of fixed-size
blocks per layer (`blocks.py` keeps the books): a request holds the blocks its tokens fill, listed
in its row of a block table, so memory follows the tokens alive, not slots x context, and a
prompt's full blocks can be shared with later requests that start the same way (prefix
caching). Each engine iteration runs, in jitted calls:

- one prefill call: chunks of the prompts being prefilled (at most `prefill_chunk` tokens per
  call; a prompt's chunk at most `decode_prefill_chunk` while other requests decode; several
  short prompts together), written into their blocks; a prompt's last chunk samples its first
  token. A long prompt is spread over iterations, so the requests already decoding keep
  streaming while it is read (chunked prefill);
- one decode step: one token for every decoding slot (per-slot positions, sampling values,
  controls and step counters live on the device), or two when a few long requests would make
  every row of one step read their blocks; with a draft model, a round of speculative
  decoding instead.

A request that needs a block when none is free preempts the most recently admitted request,
whose blocks are freed and which is later recomputed from its prompt and the tokens it had
produced (nothing is lost, nothing is sent twice). Every program is compiled at start-up
(`warmup`), so the first request is as fast as the hundredth.

Tokens leave the engine through each request's `emit(token, finish_reason)` callback, called
from the engine thread; `finish_reason` is None until the last call ("stop" at an end-of-text
token, "length" at the token budget, "cancelled" after `cancel`). Text-level stop sequences
belong to the caller, which cancels the request when it sees one.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pipeline.cpu_forms import compiler_options
from pipeline.inference.generate import bucket, buckets, check_request
from pipeline.inference.sampling import (
    Sampling,
    check_sampling,
    sampling_arrays,
)
from pipeline.model import init_paged_cache
from pipeline.runtime import release_free_memory
from pipeline.serving import programs
from pipeline.serving.blocks import BlockPool
from pipeline.serving.controls import (
    Controls,
    check_controls,
    control_arrays,
    init_controls,
    mask_words,
)
from pipeline.serving.decoding import Speculative, Steps
from pipeline.serving.scheduler import Scheduler
from pipeline.serving.stats import SAMPLE_EVERY, LoopStats

log = logging.getLogger(__name__)


# Prefill chunks up to this many tokens are compiled before the server listens (with the one-row
# decode call and the slot moves): a first short request runs at once; a longer prompt's
# program, if the background compilation has not reached it yet, compiles on its first use.
FIRST_CHUNK = 32
# What a decode call costs on CPU besides its reads, as bytes read: its dispatch, 0.2 ms quiet
# (a `tiny` 4-step call; 0.5 ms under a server's load), at the ~10 GB/s the paged attention
# gathers blocks (`small`: 4.4 ms for a 32-row step's 192 blocks of 0.23 MB). A second call
# pays off only when it spares more reads than this: on `tiny` (8 KB blocks, 0.15 MB of
# weights), splits that spared tens of microseconds of reads cost a dispatch each. Unmeasured
# on accelerators: 0 there.
CPU_CALL_BYTES = 2 << 20


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
    # the engine's own bookkeeping
    output: list[int] = field(default_factory=list)  # tokens produced (a resume recomputes them)
    blocks: list[int] = field(default_factory=list)  # its KV blocks, in position order
    context: list[int] = field(default_factory=list)  # tokens to prefill: prompt (+ output)
    digests: list[bytes] = field(default_factory=list)  # of the context's full blocks
    computed: int = 0  # context tokens already in the cache
    started: int = 0  # where its prefill started (after the blocks the prefix cache gave)
    position: int = 0  # decoding: the position of the token fed next
    prefilling: bool = True
    slot: int = -1  # while admitted
    scheduled: int = 0  # tokens its dispatched programs sample (some not yet delivered)
    order: int = 0  # admission order: the latest admitted is preempted first
    preemptions: int = 0
    # many-adapter serving: the adapter's index in the stacks (0: the base alone) and the salt
    # of its prompt's block digests (cached blocks are never shared across adapters)
    adapter: int = 0
    salt: str = ""


def kv_budget(gigabytes: float | None) -> float:
    """Bytes for the KV pool: `gigabytes` when given; else, on an accelerator, 70% of its
    memory left after the weights (vLLM's gpu_memory_utilization spirit); on CPU a quarter
    of the machine's memory."""
    if gigabytes:
        return gigabytes * 2**30
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return 0.7 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return 0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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
        kv_blocks: int | None = None,
        kv_memory_gb: float | None = None,
        block_size: int = 16,
        prefill_chunk: int = 256,
        prefix_caching: bool = True,
        decode_prefill_chunk: int | None = None,
        decode_steps: int = 4,
        prefill_wait: tuple[float, int] = (0.0, 0),
    ):
        """`observe(name, value)` receives, from the engine thread, "prompt_tokens" (per
        admitted request), "ttft" and "itl" (seconds: to a request's first token, between its
        tokens). With a `draft` model (same vocabulary), each step is a round of speculative
        decoding: up to `draft_k` + 1 tokens per slot, the target's distribution unchanged.
        `kv_blocks` blocks of `block_size` positions hold every request's keys and values
        (None: as many as `kv_memory_gb` holds, see `kv_budget`, and no more than every slot
        at full length needs). A prefill call takes at most `prefill_chunk` prompt tokens, and
        of one prompt at most `decode_prefill_chunk` while other requests are decoding (None:
        32 on CPU, `prefill_chunk` on accelerators). A decode call runs up to `decode_steps`
        steps while no request needs the host between its tokens (none waiting or prefilling,
        no grammar): the host's cost per call is shared by that many tokens per request.
        `prefill_wait` (ratio, steps): when admitted prompts wait for their prefill while
        others decode (`Scheduler.prefill_due`)."""
        cfg = model.cfg
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        self.num_slots = slots
        self.max_queue = max_queue
        self.block_size = block_size
        self._init_chunks(prefill_chunk, decode_prefill_chunk)
        self.row_buckets = buckets(slots, smallest=1)
        # Prompts prefilled together share one call (padded to one of these sizes).
        self.admit_sizes = sorted({1, min(4, slots), min(16, slots)})
        self.graphdef, self.params = programs.split(model)  # the weights as a list of arrays
        self.options = compiler_options(self.params)  # the programs' (cpu_forms.py)
        self._init_decoding(draft, draft_k, decode_steps, cfg.vocab_size)
        # a speculative round writes up to draft_k positions past a slot's last token
        self.lookahead = self.decoding.lookahead
        self.width = -(-(self.max_len + self.lookahead) // block_size)  # table entries per slot
        self._init_pools(cfg, kv_blocks, kv_memory_gb, prefix_caching)
        self._init_programs()
        self.slots = programs.slot_state(slots)
        self.ctl = init_controls(slots, cfg.vocab_size)
        self.vocab_size = cfg.vocab_size
        self._init_masks()
        self.observe = observe or (lambda name, value: None)
        self._lock = threading.Condition()
        self._init_scheduler(slots, decode_steps, self.decoding.speculative, prefill_wait)
        self._init_loop()

    def _init_decoding(self, draft, draft_k: int, decode_steps: int, vocab: int) -> None:
        """How a decode call runs (decoding.py): `decode_steps` plain steps, or with a draft
        model a round of speculative decoding."""
        if decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1, got {decode_steps}")
        self.decode_steps = decode_steps
        self.decoding = (
            Steps(self.graphdef, decode_steps, self.options)
            if draft is None
            else Speculative(self.graphdef, draft, draft_k, vocab, self.options)
        )

    def _init_loop(self) -> None:
        """The engine thread's state."""
        self.steps = 0
        self.stats = LoopStats()  # where the loop's time goes (stats.py)
        self.sample_every = SAMPLE_EVERY  # one decode call in this many runs alone, timed
        self._inflight = None  # dispatched decode steps whose tokens are not delivered yet
        self._masks_due: list[Request] = []  # grammars that consumed a token: masks to refresh
        self._mask_executor = None
        self._thread: threading.Thread | None = None
        self._running = False
        self.compile_seconds = 0.0
        self.program_count = 0  # the programs warmup compiles (in the background too)
        self._compiler: threading.Thread | None = None  # warmup's background compilation
        self._stopping = False
        self.failed: str | None = None  # why the loop ended with an error
        # called on the engine thread after each iteration (core.py sends its tokens then)
        self.after_iteration: Callable[[], None] = lambda: None

    def _init_scheduler(
        self, slots: int, decode_steps: int, speculative: bool, prefill_wait: tuple[float, int]
    ) -> None:
        """The host-side books (scheduler.py); this engine does their device work."""
        self.sched = Scheduler(
            self,
            slots,
            self.blocks,
            self.width,
            self.lookahead,
            decode_steps,
            speculative,
            tuple(self.row_buckets),
            self.call_blocks,
            self._lock,
            *prefill_wait,
        )
        # the scheduler's books, read here (the same objects)
        self.active, self.waiting = self.sched.active, self.sched.waiting
        self.tables, self.none = self.sched.tables, self.sched.none
        # the device's copies of the block tables and of the last call's rows: sent again only
        # when the scheduler changed the tables (`Scheduler.version`) or the rows changed
        self._device_tables, self._tables_version = None, -1
        self._rows_key, self._device_rows = None, None

    def _init_chunks(self, prefill_chunk: int, decode_prefill_chunk: int | None) -> None:
        """The prefill chunk sizes: at most `prefill_chunk`, and while requests decode at most
        `decode_prefill_chunk` of one prompt, as each prefill call delays their next token (on
        CPU a 64-token chunk at a 2,048-token context costs three decode steps of 16 rows)."""
        self.chunk = max(b for b in buckets(self.max_len) if b <= max(prefill_chunk, 16))
        if decode_prefill_chunk is None:
            decode_prefill_chunk = 32 if jax.default_backend() == "cpu" else self.chunk
        self.buckets = buckets(self.chunk)
        self.decode_chunk = max(b for b in self.buckets if b <= max(decode_prefill_chunk, 16))

    def _init_masks(self) -> None:
        """Each slot's allowed next tokens (bitmasks, all ones: every token), refreshed from its
        grammar after each of its tokens and sent to the device only while a grammar is active;
        and the all-ones masks of every row count, for the steps without one."""
        self.masks = np.full((self.num_slots, mask_words(self.vocab_size)), -1, np.int32)
        self.allow_all = {
            rows: jnp.full((rows, self.masks.shape[1]), -1, jnp.int32)
            for rows in sorted({*self.row_buckets, *self.admit_sizes})
        }

    def _init_programs(self) -> None:
        """This engine's jitted programs, with the model's graph bound once: a call hashes no
        graph (an nnx graph hashes in Python, 6% of a serving process's time in a profile when
        passed as a static argument per call). The decode call is the decoding's."""
        g, d = self.graphdef, self.decoding.graph
        self._prefill = programs.bind(
            programs.prefill,
            ("slots", "ctl", "pool", "dpool"),
            options=self.options,
            graphdef=g,
            dgraph=d,
        )
        self._score = programs.bind(programs.score, (), options=self.options, graphdef=g)

    def _init_pools(self, cfg, kv_blocks, kv_memory_gb, prefix_caching) -> None:
        """The KV pools (the model's, a draft's), their bookkeeping and the block tables."""
        block_size, slots = self.block_size, self.num_slots
        per_block = programs.block_bytes(cfg, block_size) + self.decoding.block_bytes(block_size)
        # a decode call reads the weights once, and on CPU costs its dispatch: as many bytes as
        # this many KV blocks
        weights = sum(x.nbytes for x in jax.tree.leaves(self.params))
        weights += CPU_CALL_BYTES if jax.default_backend() == "cpu" else 0
        self.call_blocks = weights // programs.block_bytes(cfg, block_size)
        self.kv_blocks = kv_blocks or max(
            min(slots * self.width, int(kv_budget(kv_memory_gb) // per_block)), self.width
        )
        self.blocks = BlockPool(self.kv_blocks, block_size, prefix_caching)
        self.pool = init_paged_cache(cfg, self.kv_blocks, block_size)
        self.decoding.init_pool(self.kv_blocks, block_size)

    # --- public, thread-safe ---------------------------------------------------------------

    def check(
        self,
        prompt_len: int,
        max_tokens: int,
        sampling: Sampling,
        controls: Controls = Controls(),
        adapter: int = 0,
    ) -> None:
        """Raise ValueError (a message for the client) for a request this engine cannot run."""
        check_request(prompt_len, max_tokens, self.max_len)
        check_sampling(sampling)
        check_controls(controls, self.vocab_size)
        self.decoding.check(controls, adapter)
        need = -(-(prompt_len + max_tokens + self.lookahead) // self.block_size)
        if need > self.kv_blocks:
            raise ValueError(
                f"the prompt and max_tokens need {need} KV blocks of {self.block_size} "
                f"positions; this server has {self.kv_blocks} in all"
            )

    def submit(self, request: Request) -> Request:
        self.check(
            len(request.prompt),
            request.max_tokens,
            request.sampling,
            request.controls,
            request.adapter,
        )
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

    def score(
        self, prompt: list[int], adapter: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The prompt's token log-probabilities (the first is 0: nothing predicts it), the top
        ids and their log-probabilities at each position, from one forward pass (thread-safe:
        it runs beside the engine's own programs)."""
        if not 1 <= len(prompt) <= self.max_len:
            raise ValueError(f"the prompt must be 1..{self.max_len} tokens, got {len(prompt)}")
        P = bucket(len(prompt), self.max_len)
        tokens = np.zeros((1, P), np.int32)
        tokens[0, : len(prompt)] = prompt
        out = self._score(self.params, tokens, np.int32(adapter))
        return tuple(np.asarray(x)[: len(prompt)] for x in out)

    def uses(self, adapter: int) -> bool:
        """Whether a running or waiting request uses adapter `adapter`."""
        with self._lock:
            return any(r.adapter == adapter for r in [*self.waiting, *filter(None, self.active)])

    @property
    def alive(self) -> bool:
        """Whether the loop runs (started, not stopped, not failed)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def busy_slots(self) -> int:
        return sum(r is not None for r in self.active)

    @property
    def preemptions(self) -> int:
        return self.sched.preemptions

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def warmup(self, background: bool = False) -> float:
        """Compile every program ahead of time (prefill per chunk size and row count, the
        decode step per row count, prompt scoring per length, the slot and block moves):
        lowered and compiled from the shapes alone, never run, so no state is touched. With
        `background`, only what a first short request needs (the one-row prefills of chunks up
        to `FIRST_CHUNK` tokens, the one-row decode call, the moves) before returning, and the
        rest on a thread of its own while the engine serves (a request needing a program not
        ready yet compiles it itself). Seconds taken (in the foreground)."""
        start = time.perf_counter()
        first, rest = self._programs()
        self.program_count = len(first) + len(rest)
        cores = os.cpu_count() or 1
        if background:
            self._compile_all(first, min(cores, 8))
            # (on its own thread, with half the cores: the engine serves meanwhile)
            args = (rest, max(1, min(cores // 2, 8)))
            self._compiler = threading.Thread(target=self._compile_all, args=args, daemon=True)
            self._compiler.start()
        else:
            self._compile_all(first + rest, min(cores, 8))
        self.compile_seconds = time.perf_counter() - start
        log.info(
            "engine ready: %d slots, %d positions each, %d KV blocks of %d, prefill chunks %s, "
            "decode rows %s, compiled in %.1f s%s",
            self.num_slots,
            self.max_len,
            self.kv_blocks,
            self.block_size,
            self.buckets,
            self.row_buckets,
            self.compile_seconds,
            f" (and {len(rest)} more programs in the background)" if background else "",
        )
        return self.compile_seconds

    def _compile_all(self, programs: list, workers: int) -> None:
        """Compile `programs` on `workers` threads (XLA compiles without the interpreter lock:
        31 programs of `small` in 42-47 s on 2 threads against 48-50 s on one, on 2 cores)."""
        start = time.perf_counter()

        def one(compile_) -> None:
            if not self._stopping:  # (a process must not exit while XLA compiles on a thread)
                compile_()

        if workers <= 1:
            for compile_ in programs:
                one(compile_)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="compile") as pool:
                list(pool.map(one, programs))
        log.debug("%d programs compiled in %.1f s", len(programs), time.perf_counter() - start)
        release_free_memory()  # the compiler's leftovers (0.26 GB for a 1B model's 35 programs)

    def _programs(self) -> tuple[list, list]:
        """Thunks that compile each program ahead of time: (those a first request needs, the
        rest). The state's shapes are read here, once, so the thunks can run on another
        thread while the engine runs (and donates its buffers)."""
        d = self.decoding
        shapes = programs.shapes((self.params, d.params, self.slots, self.ctl, self.pool, d.pool))
        params, dparams, slots, ctl, pool, dpool = shapes
        i32 = np.int32(0)
        first, rest = [], []
        for P in self.buckets:
            for n in self.admit_sizes:
                args = programs.shapes(self._prefill_args([], [], P, [], n))
                (first if n == 1 and P <= FIRST_CHUNK else rest).append(
                    programs.aot(self._prefill, params, slots, ctl, pool, *args, dparams, dpool)
                )
        for P in buckets(self.max_len):  # echo's prompt scoring
            tokens = jax.ShapeDtypeStruct((1, P), jnp.int32)
            rest.append(programs.aot(self._score, params, tokens, i32))
        for rows in self.row_buckets:
            (first if rows == 1 else rest).append(d.compile_thunk(self, shapes, rows))
        counts = jax.ShapeDtypeStruct((self.max_len,), jnp.int32)
        first += [
            programs.aot(programs.move, slots, ctl, i32, i32),
            programs.aot(programs.fork, slots, ctl, i32, i32, i32, i32, np.uint32(0)),
            programs.aot(programs.copy_block, (pool, *programs.shapes(d.pools)), i32, i32),
            programs.aot(programs.restore_slot_counts, ctl, i32, counts),
        ]
        return first, rest

    def start(self) -> Engine:
        with self._lock:
            self._running = True
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with `drain`, finish the admitted and waiting ones first."""
        self._stopping = True
        if self._compiler is not None:
            self._compiler.join()
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
                    start = time.perf_counter()
                    self.sched.free_cancelled()
                    self.sched.compact()
                    self.sched.admit()
                self._iterate()
                self.stats.iterations += 1
                self.stats.busy_s += time.perf_counter() - start
                self.after_iteration()
        except Exception as err:  # a bug must not hang every client: end them all, then re-raise
            log.exception("engine loop failed")
            with self._lock:
                self._running = False
                self.failed = f"the engine loop failed ({type(err).__name__})"
                for request in [*self.waiting, *filter(None, self.active)]:
                    request.emit(None, "error")
                self.waiting.clear()
                self.active[:] = [None] * self.num_slots
            self.after_iteration()
            raise

    def _iterate(self) -> None:
        """One iteration past admission: a prefill call, a decode step, the tokens delivered."""
        self.sched.compact()
        if self.sched.prefill_due():
            self._prefill_round()
            self.sched.compact()
        if any(r is not None and not r.prefilling for r in self.active):
            self._decode()
            self.sched.compact()
        elif self._inflight is not None:
            self._flush()

    def _fetch(self, x) -> np.ndarray:
        """A device result on the host, the time blocked on it counted as waiting."""
        start = time.perf_counter()
        out = np.asarray(x)
        self.stats.wait_s += time.perf_counter() - start
        return out

    def _has_work(self) -> bool:
        return bool(self.waiting) or self.sched.running_any() or self._inflight is not None

    def copy_block(self, src: int, dst: int) -> None:
        pools = (self.pool, *self.decoding.pools)
        pools = programs.copy_block(pools, np.int32(src), np.int32(dst))
        self.pool = pools[0]
        self.decoding.set_pools(pools[1:])

    # prefill ------------------------------------------------------------------------------

    def _prefill_round(self) -> None:
        """One prefill call: the next chunk of the earliest admitted prompt (at most
        `prefill_chunk` tokens, `decode_prefill_chunk` while requests are decoding: a long
        prompt's chunk reads its whole context so far, and delays their next token), with as
        many other prompts' chunks of the same length or shorter as fit in twice
        `prefill_chunk` tokens, padding rows counted: short prompts that arrive together go in
        one call (16 of 32 tokens on `small`: 4.1 ms a prompt, against 4.7 in calls of 4, and
        while they prefill the running requests decode a step at a time, so fewer calls also
        means fewer single-step decode calls)."""
        waiting = sorted(
            (i for i, r in enumerate(self.active) if r is not None and r.prefilling),
            key=lambda i: self.active[i].order,
        )
        decoding = any(r is not None and not r.prefilling for r in self.active)
        limit = self.decode_chunk if decoding else self.chunk
        left = lambda i: len(self.active[i].context) - self.active[i].computed  # noqa: E731
        P = bucket(min(left(waiting[0]), limit), limit)
        picked = []
        for slot in waiting:
            n = next((s for s in self.admit_sizes if s > len(picked)), None)
            if n is None or (picked and n * P > max(2 * self.chunk, P)):
                break
            picked.append(slot)
        pieces = [min(left(i), P) for i in picked]
        first, info = self._prefill_call([self.active[i] for i in picked], pieces, P, picked)
        info = _host_info(info, any(self.active[i].controls.logprobs for i in picked))
        for row, (slot, piece) in enumerate(zip(picked, pieces, strict=True)):
            request = self.active[slot]
            request.computed += piece
            for b in range(min(request.computed // self.block_size, len(request.digests))):
                self.blocks.register(request.blocks[b], request.digests[b])
            if request.computed < len(request.context):
                continue
            request.prefilling, request.position = False, len(request.context)
            request.scheduled += 1
            if not request.output:
                self.observe("prompt_tokens", len(request.prompt))
            self._deliver(slot, int(first[row]), info and tuple(x[row] for x in info))
        self._fill_due_masks()

    def _prefill_call(self, requests: list, pieces: list, P: int, slot_ids: list):
        """One prefill call (`programs.prefill`) for these requests' next `pieces` tokens (in
        slots `slot_ids`), padded to an admit size: the tokens sampled and their
        log-probabilities."""
        n = next(size for size in self.admit_sizes if size >= len(requests))
        d = self.decoding
        self.stats.prefills += 1
        token, info, self.slots, self.ctl, self.pool, dpool = self._prefill(
            self.params,
            self.slots,
            self.ctl,
            self.pool,
            *self._prefill_args(requests, pieces, P, slot_ids, n),
            d.params,
            d.pool,
        )
        d.set_pools(() if dpool is None else (dpool,))
        return self._fetch(token), info

    def _prefill_args(self, requests: list, pieces: list, P: int, slot_ids: list, n: int):
        """`programs.prefill`'s chunk, sampling values, controls and mask for these requests' next
        `pieces` tokens, in n rows (the rest padding)."""
        chunk = {
            "tokens": np.zeros((n, P), np.int32),
            "starts": np.zeros(n, np.int32),
            "lengths": np.ones(n, np.int32),
            "tables": np.full((n, self.width), self.none, np.int32),
            "slot_ids": np.full(n, self.num_slots, np.int32),
            "first": np.zeros(n, bool),
            "fresh": np.ones(n, bool),
            "final": np.zeros(n, bool),
            "steps": np.zeros(n, np.int32),
            "adapters": np.zeros(n, np.int32),
        }
        mask = None
        for i, (request, piece, slot) in enumerate(zip(requests, pieces, slot_ids, strict=True)):
            start = request.computed
            chunk["tokens"][i, :piece] = request.context[start : start + piece]
            chunk["starts"][i], chunk["lengths"][i] = start, piece
            chunk["tables"][i], chunk["slot_ids"][i] = self.tables[slot], slot
            chunk["first"][i] = start == request.started
            chunk["fresh"][i] = not request.output
            chunk["final"][i] = start + piece == len(request.context)
            chunk["steps"][i] = len(request.output)
            chunk["adapters"][i] = request.adapter
            if request.grammar is not None:
                if mask is None:
                    mask = np.full((n, self.masks.shape[1]), -1, np.int32)
                _fill_mask(request.grammar, mask, i)
        samplings = [r.sampling for r in requests] + [Sampling()] * (n - len(requests))
        controls = [r.controls for r in requests] + [Controls()] * (n - len(requests))
        return (
            chunk,
            sampling_arrays(samplings),
            control_arrays(controls),
            self.allow_all[n] if mask is None else mask,
        )

    # decode ---------------------------------------------------------------------------------

    def _run_step(self, ids: np.ndarray, live: np.ndarray, steps: int = 1):
        """One decode call for slots `ids` (padded with the id past the last slot; only those
        `live` advance): the decoding's results (`decoding.py`): tokens, how many, their
        log-probabilities. The call reads its rows' block tables on the device, from the
        device's copy of every slot's (`device_inputs`)."""
        return self.decoding.run(self, ids, live, self.device_inputs(ids, live), steps)

    def device_inputs(self, ids: np.ndarray, live: np.ndarray) -> tuple:
        """(every slot's block table, ids, live) on the device, each sent only when it changed
        since the last call: in a run of decode calls over the same requests, the tables change
        when a request crosses into a new block, and the rows not at all (vLLM's persistent
        batch, its block table committed to the device as a whole after a change)."""
        if self._tables_version != self.sched.version:
            # (a copy: on CPU the device may read a numpy array in place, and the scheduler
            # changes its tables while a dispatched call still reads them)
            self._device_tables = jax.device_put(self.tables.copy())
            self._tables_version = self.sched.version
        key = (ids.tobytes(), live.tobytes())
        if key != self._rows_key:
            self._rows_key, self._device_rows = key, jax.device_put((ids.astype(np.int32), live))
        return (self._device_tables, *self._device_rows)

    def _decode(self) -> None:
        """Dispatch this iteration's decode steps, then deliver the previous iteration's tokens
        while they run.

        A step reads each slot's last token from the device, so step t + 1 need not wait for
        the host to see step t's: the host's work (delivering, detokenising, streaming) overlaps
        the device's. A request that needs its tokens first (a grammar's next mask, a draft
        round's count) makes the engine deliver at once. A request ended by step t wastes its
        row of step t + 1, whose token is dropped; one that reaches max_tokens is not scheduled
        past it. A call runs several steps while nothing needs the host between them
        (`Scheduler.run_ahead`). One call in `sample_every` runs alone, timed (stats.py).
        """
        timed = self.steps % self.sample_every == self.sample_every - 1
        if timed:
            self._flush()
        steps = self.sched.run_ahead()
        self.sched.grow(steps)
        self.sched.compact()
        ready = self.sched.ready()
        if not ready:
            self._flush()
            return
        self.sched.decoded(steps)  # (only a call dispatched counts as a wait)
        start, dispatched = time.perf_counter(), []
        decoding = self.decoding
        for group in self.sched.groups(ready):
            ids = decoding.ids(self.sched, group, self.num_slots)
            batch = [self.active[i] if i in group else None for i in ids.tolist()]
            live = np.asarray([r is not None for r in batch])
            dispatched.append((*self._run_step(ids, live, steps), batch))
            self.stats.row_steps += int(live.sum()) * steps
            for request in filter(None, batch):
                request.scheduled += steps
                decoding.dispatched(request, steps)
        self.steps += 1
        self.stats.steps += 1
        self.stats.steps_run += steps
        if timed:
            jax.block_until_ready([step[0] for step in dispatched])
            self.stats.timed_steps += steps
            self.stats.timed_s += time.perf_counter() - start
        previous, self._inflight = self._inflight, dispatched
        for step in previous or ():
            self._deliver_step(step)
        if decoding.must_deliver() or any(self.active[i].grammar for i in ready if self.active[i]):
            self._flush()

    def _fill_due_masks(self) -> None:
        """The next masks of the grammars that just consumed a token, in one parallel call
        (llguidance computes them on its own threads, without the interpreter lock)."""
        due = [(r.grammar, r.slot) for r in self._masks_due if self.sched.holds(r)]
        self._masks_due.clear()
        if due:
            from llguidance import LLExecutor
            from llguidance.numpy import fill_next_token_bitmask_par

            self._mask_executor = self._mask_executor or LLExecutor()
            fill_next_token_bitmask_par(self._mask_executor, due, self.masks)

    def _flush(self) -> None:
        inflight, self._inflight = self._inflight, None
        for step in inflight or ():
            self._deliver_step(step)

    def _deliver_step(self, inflight) -> None:
        """Deliver a dispatched step's tokens to the requests it ran for that are still on."""
        tokens, produced, info, batch = inflight
        tokens = self._fetch(tokens)
        if isinstance(produced, int):  # decode steps: (k, rows) -> (rows, produced) each
            tokens = tokens[:produced].T
            produced = np.full(len(tokens), produced, np.int32)
        produced = self._fetch(produced)
        info = _host_info(info, any(r is not None and r.controls.logprobs for r in batch))
        for row, request in enumerate(batch):
            if request is None or not self.sched.holds(request):
                continue  # ended, cancelled or preempted since
            self.decoding.delivered(request, int(produced[row]))
            if request.grammar is None and not request.controls.logprobs:
                self._deliver_run(request, tokens[row, : produced[row]].tolist())
                continue
            for j, token in enumerate(tokens[row, : produced[row]]):
                if not self.sched.holds(request):  # it ended within this round
                    break
                lp = info and (info[0][j, row], info[1][j, row], info[2][j, row])
                self._deliver(request.slot, int(token), lp)
        self._fill_due_masks()

    # the device work of the scheduler's decisions (scheduler.SlotDevice) ----------------------

    def move_slot(self, src: int, dst: int) -> None:
        self.slots, self.ctl = programs.move(self.slots, self.ctl, np.int32(src), np.int32(dst))
        self.masks[dst] = self.masks[src]

    def fork_slot(self, src: int, dst: int, request: Request) -> None:
        L = len(request.prompt)
        self.slots, self.ctl = programs.fork(
            self.slots,
            self.ctl,
            np.int32(src),
            np.int32(dst),
            np.int32(request.prompt[-1]),
            np.int32(L - 1),
            np.uint32(request.sampling.seed),
        )
        if request.grammar is not None:
            _fill_mask(request.grammar, self.masks, dst)

    def restore_counts(self, slot: int, request: Request) -> None:
        ids = np.full((self.max_len,), self.vocab_size, np.int32)
        ids[: len(request.output)] = request.output
        self.ctl = programs.restore_slot_counts(self.ctl, np.int32(slot), ids)

    def clear_slot(self, slot: int) -> None:
        self.masks[slot] = -1

    def _deliver_run(self, request: Request, tokens: list[int]) -> None:
        """A request's tokens from one call (a grammar's or log-probabilities' request: one
        token, from `_deliver`), in one pass: up to the first stop id or the token that reaches
        max_tokens, which ends it; the clock read once (tokens that arrive together: one
        inter-token gap observed per delivery, as vLLM's per-iteration one)."""
        if not tokens:  # (a call that produced none for this row)
            return
        if request.cancelled:
            self.sched.finish(request.slot, None, "cancelled")
            return
        end, reason = len(tokens), None
        room = max(request.max_tokens - request.generated, 1)
        if room <= end:
            end, reason = room, "length"
        stops = request.stop_ids
        for i in range(end) if stops else ():
            if tokens[i] in stops:
                end, reason = i + 1, "stop"
                break
        run = tokens[:end]
        self._account(request, run)
        emit = request.emit
        for token in run[:-1] if reason else run:
            emit(token, None)
        if reason is not None:
            self.sched.finish(request.slot, run[-1], reason)

    def _account(self, request: Request, run: list[int]) -> None:
        """A delivery's books: its time observed, the tokens counted and kept."""
        now = time.perf_counter()
        if request.generated == 0:
            self.observe("ttft", now - request.submitted)
        else:
            self.observe("itl", now - request.last_token_at)
        request.last_token_at = now
        request.generated += len(run)
        self.stats.tokens += len(run)
        request.output.extend(run)

    def _deliver(self, slot: int, token: int, info=None) -> None:
        """One token, with its log-probabilities and its grammar's step where it has them."""
        request = self.active[slot]
        if request.cancelled:
            self.sched.finish(slot, None, "cancelled")
            return
        if request.controls.logprobs and info is not None:
            request.logprobs.append((float(info[0]), info[1].tolist(), info[2].tolist()))
        if request.grammar is not None and token not in request.stop_ids:
            request.grammar.consume_token(token)
            if request.grammar.is_stopped():  # the grammar is complete: this token ends it
                self._account(request, [token])
                self.sched.finish(slot, token, "end")
                return
            self._masks_due.append(request)  # its next mask: all of a step's at once
        self._deliver_run(request, [token])


def _host_info(info, wanted: bool):
    """The step's log-probabilities as host arrays, fetched only when a request wants them."""
    if info is None or not wanted:
        return None
    return tuple(np.asarray(x) for x in info)


def _fill_mask(grammar, masks: np.ndarray, row: int) -> None:
    """Row `row` of `masks` := the tokens `grammar` allows next."""
    from llguidance.numpy import fill_next_token_bitmask

    fill_next_token_bitmask(grammar, masks, row)
