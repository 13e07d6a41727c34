"""The engine's host-side books: which request runs in which slot and which wait, the KV blocks
each holds, admission, growth and preemption, and how the decoding slots are grouped into calls.

Nothing here touches a device. What a decision needs done there (a slot's sampling state moved
or forked, a block copied, a resumed request's token counts restored, a slot's grammar mask
cleared) goes to `device`, which the engine implements with its jitted programs; a test can
drive the whole schedule with a recorder in its place, compiling nothing.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from typing import TYPE_CHECKING, Protocol

import numpy as np

from pipeline.serving.blocks import BlockPool, OutOfBlocksError, block_digests

if TYPE_CHECKING:
    from pipeline.serving.engine import Request


class SlotDevice(Protocol):
    """The device work the scheduler's decisions need (the engine's programs)."""

    def move_slot(self, src: int, dst: int) -> None: ...
    def fork_slot(self, src: int, dst: int, request: Request) -> None: ...
    def copy_block(self, src: int, dst: int) -> None: ...
    def restore_counts(self, slot: int, request: Request) -> None: ...
    def clear_slot(self, slot: int) -> None: ...


class Scheduler:
    """Slots, the waiting queue and the KV blocks of one engine."""

    def __init__(
        self,
        device: SlotDevice,
        slots: int,
        blocks: BlockPool,
        width: int,
        lookahead: int = 0,
        decode_steps: int = 1,
        speculative: bool = False,
        row_buckets: tuple[int, ...] = (1,),
        call_blocks: int = 0,
        lock: threading.Condition | None = None,
        wait_ratio: float = 0.0,
        max_wait: int = 0,
    ):
        """`width` block-table entries per slot; `lookahead` positions a step may write past a
        slot's last token (a draft round's); a decode call of a group of rows costs
        `call_blocks` KV blocks' worth of reads besides its rows' blocks (the weights);
        `wait_ratio` and `max_wait`: when admitted prompts wait for their prefill
        (`prefill_due`)."""
        self.device, self.num_slots, self.blocks = device, slots, blocks
        self.block_size, self.width, self.lookahead = blocks.block_size, width, lookahead
        self.decode_steps, self.speculative = decode_steps, speculative
        self.row_buckets, self.call_blocks = row_buckets, call_blocks
        self.lock = lock or threading.Condition()
        self.none = blocks.num_blocks  # the table entry of no block
        # each slot's block table, kept here and changed by differences (a row set at
        # admission, a block appended as a request grows, a row moved or emptied); `version`
        # counts the changes, so the device's copy is sent again only after one
        self.tables = np.full((slots, width), self.none, np.int32)
        self.version = 0
        self.active: list[Request | None] = [None] * slots
        self.waiting: deque[Request] = deque()
        self.preemptions = 0
        self._admitted = itertools.count()
        self.wait_ratio, self.max_wait = wait_ratio, max_wait
        self.waited = 0  # decode steps run while admitted prompts waited for their prefill
        self._prefilling = False  # a round of prefill calls is under way
        self._deferring = False  # admitted prompts wait for their prefill this iteration

    # the slots -------------------------------------------------------------------------------

    def holds(self, request: Request) -> bool:
        return request.slot >= 0 and self.active[request.slot] is request

    def running_any(self) -> bool:
        return any(r is not None for r in self.active)

    def release(self, slot: int) -> None:
        """Slot `slot`'s request leaves it: its blocks back to the pool (full prompt blocks
        stay cached), its table row emptied."""
        request = self.active[slot]
        self.blocks.release(request.blocks)
        request.blocks = []
        self.tables[slot] = self.none
        self.version += 1
        self.active[slot] = None
        self.device.clear_slot(slot)
        request.slot = -1

    def finish(self, slot: int, token: int | None, reason: str) -> None:
        request = self.active[slot]
        self.release(slot)
        request.emit(token, reason)

    def free_cancelled(self) -> None:
        for slot, request in enumerate(self.active):
            if request is not None and request.cancelled:
                self.finish(slot, None, "cancelled")
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            request.emit(None, "cancelled")

    def compact(self) -> None:
        """Keep the active requests in slots 0..n-1: move the highest into the lowest hole."""
        while True:
            used = [i for i, r in enumerate(self.active) if r is not None]
            holes = [i for i, r in enumerate(self.active) if r is None]
            if not used or not holes or holes[0] > used[-1]:
                return
            src, dst = used[-1], holes[0]
            self.device.move_slot(src, dst)
            self.tables[dst] = self.tables[src]
            self.tables[src] = self.none
            self.version += 1
            self.active[dst], self.active[src] = self.active[src], None
            self.active[dst].slot = dst

    def _set_table(self, slot: int, blocks: list[int]) -> None:
        self.tables[slot] = self.none
        self.tables[slot, : len(blocks)] = blocks
        self.version += 1

    # admission: a free slot and the blocks for the whole context -------------------------------

    def admit(self) -> None:
        """Waiting requests into free slots, first come first served, while the pool has the
        blocks of their contexts (less what the prefix cache already holds) to spare; another
        choice of a request that is decoding shares its prompt's blocks instead."""
        reserve = max(1, self.blocks.num_blocks // 100)  # room for the running ones to grow
        skipped = []
        while self.waiting and None in self.active:
            request = self.waiting.popleft()
            parent = request.parent
            if parent is not None and parent in self.active:
                if parent.prefilling:  # fork once its prompt is in the cache
                    skipped.append(request)
                    continue
                if not self._fork_admit(request, parent, reserve):
                    self.waiting.appendleft(request)
                    break
                continue
            if not self._fresh_admit(request, reserve):
                self.waiting.appendleft(request)
                break
        self.waiting.extendleft(reversed(skipped))

    def _fresh_admit(self, request: Request, reserve: int) -> bool:
        request.parent = None
        request.context = request.prompt + request.output
        bs = self.block_size
        if not request.digests:
            request.digests = block_digests(request.context, bs, request.salt)
        cached = self.blocks.lookup(request.digests, (len(request.context) - 1) // bs)
        need = -(-(len(request.context) + 1) // bs) - len(cached)
        if self.blocks.available - need < reserve and self.running_any():
            self.blocks.release(cached)
            return False
        try:
            fresh = [self.blocks.allocate() for _ in range(need)]
        except OutOfBlocksError:  # only when nothing else runs: it waits for nothing
            raise RuntimeError("a request needs more KV blocks than the pool has") from None
        slot = self.active.index(None)
        request.blocks = cached + fresh
        request.computed = request.started = len(cached) * bs
        request.prefilling = True
        request.order, request.slot = next(self._admitted), slot
        request.scheduled = len(request.output)
        self._set_table(slot, request.blocks)
        self.active[slot] = request
        if request.output and request.controls.shapes_logits:
            self.device.restore_counts(slot, request)
        return True

    def _fork_admit(self, request: Request, parent: Request, reserve: int) -> bool:
        """Another choice of `parent`: its prompt's blocks shared, the block of the prompt's
        last token copied (the choice rewrites that position), its state forked."""
        if self.blocks.available - 1 < reserve:
            return False
        bs, L = self.block_size, len(request.prompt)
        shared = [self.blocks.share(b) for b in parent.blocks[: (L - 1) // bs]]
        copy = self.blocks.allocate()
        self.device.copy_block(parent.blocks[(L - 1) // bs], copy)
        src, slot = self.active.index(parent), self.active.index(None)
        request.blocks, request.prefilling = [*shared, copy], False
        request.context, request.position = list(request.prompt), L - 1
        request.order, request.slot, request.scheduled = next(self._admitted), slot, 0
        self._set_table(slot, request.blocks)
        self.active[slot] = request
        self.device.fork_slot(src, slot, request)
        return True

    # decoding ----------------------------------------------------------------------------------

    def grow(self, steps: int = 1) -> None:
        """Give every decoding request the blocks its next `steps` steps write (those within
        its budget: a step past it writes nothing, its token dropped); when the pool is out,
        preempt the most recently admitted request (it is recomputed later)."""
        for slot, request in enumerate(self.active):
            if request is None or request.prefilling:
                continue
            ahead = max(1, min(steps, request.max_tokens - request.scheduled)) - 1
            need = (request.position + ahead + self.lookahead) // self.block_size + 1
            while self.active[slot] is request and len(request.blocks) < need:
                try:
                    block = self.blocks.allocate()
                except OutOfBlocksError:
                    self.preempt()
                    continue
                self.tables[slot, len(request.blocks)] = block
                self.version += 1
                request.blocks.append(block)

    def preempt(self) -> None:
        """Free the blocks of the latest admitted request and queue it first again: it will be
        prefilled anew from its prompt and the tokens it produced."""
        slot = max(
            (i for i, r in enumerate(self.active) if r is not None),
            key=lambda i: self.active[i].order,
        )
        request = self.active[slot]
        self.release(slot)
        request.digests, request.parent = [], None
        request.preemptions += 1
        self.preemptions += 1
        with self.lock:
            self.waiting.appendleft(request)

    def ready(self) -> list[int]:
        """The decoding slots with tokens of their budget still to schedule."""
        return [
            i
            for i, r in enumerate(self.active)
            if r is not None and not r.prefilling and r.scheduled < r.max_tokens
        ]

    def prefill_due(self) -> bool:
        """Whether the admitted prompts are prefilled in this iteration, or wait while the
        requests already running decode (text-generation-inference's `waiting_served_ratio`
        and `max_waiting_tokens`). They wait while they are fewer than `wait_ratio` times the
        decoding requests and have waited fewer than `max_wait` decode steps; once a round of
        prefill calls starts it runs until every admitted prompt is in. Prompts that arrive
        one by one as requests end then go in together, in fuller prefill calls that stall
        the decoding requests fewer times, and requests that started together end together.
        Nothing decoding, or `wait_ratio` 0: at once."""
        prefilling = sum(1 for r in self.active if r is not None and r.prefilling)
        if not prefilling:
            self._prefilling = self._deferring = False
            self.waited = 0
            return False
        self._prefilling = (
            self._prefilling
            or prefilling >= self.wait_ratio * len(self.ready())
            or self.waited >= self.max_wait
        )
        self._deferring = not self._prefilling
        return self._prefilling

    def decoded(self, steps: int) -> None:
        """A decode call of `steps` steps was dispatched (the admitted prompts' wait grows)."""
        if any(r is not None and r.prefilling for r in self.active):
            self.waited += steps

    def run_ahead(self) -> int:
        """Decode steps the next call may run: `decode_steps` while no request needs the host
        between its tokens (none that a free slot could admit, none being prefilled, no
        grammar, no draft, none cancelled), else 1; never more than the largest budget left,
        nor past the wait left to prompts waiting for their prefill (`prefill_due`).
        (Requests waiting while every slot is busy wait for a request to end either way: one
        ending inside a call frees its slot when the call returns.)"""
        if self.decode_steps == 1 or self.speculative or (self.waiting and None in self.active):
            return 1
        running = [r for r in self.active if r is not None]
        prefilling = any(r.prefilling for r in running)
        if (prefilling and not self._deferring) or any(
            r.grammar is not None or r.cancelled for r in running
        ):
            return 1
        left = max((r.max_tokens - r.scheduled for r in running if not r.prefilling), default=1)
        if prefilling:
            left = min(left, self.max_wait - self.waited)
        return max(1, min(self.decode_steps, left))

    def rows(self, n: int) -> int:
        """The decode programs' row count for n rows (the next power of two)."""
        return next(b for b in self.row_buckets if b >= n)

    def groups(self, ready: list[int]) -> list[list[int]]:
        """The decoding slots in one call, or two when that reads fewer bytes: a call's
        attention reads, for each of its rows, as many KV blocks as its longest row holds, so
        the few long requests among many short ones go in a call of their own once the blocks
        that spares outweigh a second read of the weights."""
        if self.speculative or len(ready) < 2:
            return [ready]
        bs = self.block_size
        ready = sorted(ready, key=lambda i: self.active[i].position)
        columns = [self.active[i].position // bs + 1 for i in ready]
        rows = self.rows
        best, split = rows(len(ready)) * columns[-1], None
        for k in range(1, len(ready)):
            cost = rows(k) * columns[k - 1] + rows(len(ready) - k) * columns[-1] + self.call_blocks
            if cost < best:
                best, split = cost, k
        return [ready] if split is None else [ready[:split], ready[split:]]
