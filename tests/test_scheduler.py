"""The serving engine's scheduler on its own: admission, growth, preemption, prefix reuse, n
choices, compaction and decode grouping, with a recorder in the device's place (nothing is
compiled or run on a device).

Run: pytest tests/test_scheduler.py
"""

from pipeline.inference.sampling import Sampling
from pipeline.serving.blocks import BlockPool
from pipeline.serving.controls import Controls
from pipeline.serving.engine import Request
from pipeline.serving.scheduler import Scheduler


class Recorder:
    """The device work the scheduler asks for, in order."""

    def __init__(self):
        self.calls = []

    def move_slot(self, src, dst):
        self.calls.append(("move", src, dst))

    def fork_slot(self, src, dst, request):
        self.calls.append(("fork", src, dst))

    def copy_block(self, src, dst):
        self.calls.append(("copy", src, dst))

    def restore_counts(self, slot, request):
        self.calls.append(("restore", slot, tuple(request.output)))

    def clear_slot(self, slot):
        self.calls.append(("clear", slot))


def _request(prompt, max_tokens, ended, **kw):
    return Request(prompt, max_tokens, Sampling(), lambda t, r: ended.append((t, r)), **kw)


def _prefilled(sched, request):
    """What the engine's prefill does to the books: the context computed, its full blocks
    registered in the prefix cache, decoding from the next position."""
    request.computed = len(request.context)
    for b, digest in enumerate(request.digests):
        sched.blocks.register(request.blocks[b], digest)
    request.prefilling, request.position = False, len(request.context)
    request.scheduled += 1


def test_admission_growth_preemption_and_prefix_reuse_without_a_device():
    device, ended = Recorder(), []
    sched = Scheduler(device, slots=2, blocks=BlockPool(8, 4), width=8, decode_steps=4)
    a, b, c = (_request(list(range(i, i + 6)), 20, ended) for i in (0, 20, 50))
    b.controls = Controls(presence=0.5)  # its counts are restored when it resumes
    for r in (a, b, c):
        sched.waiting.append(r)
    sched.admit()  # two slots: a and b in, c waits; 6 tokens + 1 = 2 blocks each
    assert sched.active == [a, b] and list(sched.waiting) == [c]
    assert sched.blocks.used == 4 and (a.slot, b.slot) == (0, 1)
    assert sched.run_ahead() == 1  # prefilling: one step per call
    for r in (a, b):
        _prefilled(sched, r)
    assert b.computed == 6 and len(b.digests) == 1  # one full block of 4 in its prompt
    assert sched.run_ahead() == 4  # c waits, but for a slot: nothing to admit between steps
    sched.waiting.clear()
    assert sched.run_ahead() == 4
    sched.grow(4)  # positions 6..9 -> 3 blocks each
    assert [len(r.blocks) for r in (a, b)] == [3, 3] and sched.blocks.used == 6
    assert list(sched.tables[0, :3]) == a.blocks and sched.tables[0, 3] == sched.none
    for r in (a, b):
        r.position, r.scheduled = r.position + 4, r.scheduled + 4
        r.output = [7] * 5  # delivered so far
    sched.grow(4)  # 10..13 -> 4 blocks each: the last two free blocks
    assert sched.blocks.available == 0 and sched.preemptions == 0
    for r in (a, b):
        r.position, r.scheduled = r.position + 4, r.scheduled + 4
    sched.grow(4)  # 14..17 -> 5 blocks: none free, so b (admitted last) is preempted
    assert sched.preemptions == 1 and b.preemptions == 1 and b.slot == -1
    assert sched.active == [a, None] and list(sched.waiting) == [b]
    assert len(a.blocks) == 5 and ("clear", 1) in device.calls
    sched.finish(0, 9, "length")
    assert ended == [(9, "length")] and sched.blocks.used == 0
    sched.admit()  # b again, from its prompt and its output: its prompt's block is cached
    assert sched.active[0] is b and b.context == list(range(20, 26)) + [7] * 5
    assert b.computed == b.started == 4 and b.prefilling  # prefix reuse: 4 tokens not recomputed
    assert ("restore", 0, (7,) * 5) in device.calls
    assert sched.blocks.hits >= 4


def test_n_choices_fork_compaction_and_grouping_without_a_device():
    device, ended = Recorder(), []
    sched = Scheduler(
        device, slots=4, blocks=BlockPool(64, 4), width=16, row_buckets=(1, 2, 4), call_blocks=1
    )
    first = _request(list(range(10)), 8, ended)
    second = _request(list(range(10)), 8, ended, parent=first)
    sched.waiting.extend([first, second])
    sched.admit()  # the second choice waits until its parent's prompt is in the cache
    assert sched.active[:2] == [first, None] and list(sched.waiting) == [second]
    _prefilled(sched, first)
    sched.admit()  # now forked: the prompt's full blocks shared, the last one copied
    assert sched.active[1] is second and not second.prefilling and second.position == 9
    assert second.blocks[:2] == first.blocks[:2] and second.blocks[2] != first.blocks[2]
    assert ("copy", first.blocks[2], second.blocks[2]) in device.calls
    assert ("fork", 0, 1) in device.calls
    long = _request(list(range(40)), 8, ended)
    sched.waiting.append(long)
    sched.admit()
    _prefilled(sched, long)
    sched.finish(1, None, "cancelled")  # a hole at slot 1: compaction moves slot 2 there
    sched.compact()
    assert ("move", 2, 1) in device.calls and sched.active[1] is long and long.slot == 1
    assert list(sched.tables[1, : len(long.blocks)]) == long.blocks
    assert (sched.tables[2] == sched.none).all()
    # one short row and one long: reading 11 block columns for both costs more than a
    # second call, so the long one decodes in a call of its own
    assert sched.groups(sched.ready()) == [[0], [1]]
    sched.call_blocks = 100
    assert sched.groups(sched.ready()) == [[0, 1]]
    for slot in (0, 1):
        sched.finish(slot, None, "cancelled")
    assert sched.blocks.used == 0 and not sched.running_any()


def test_prompts_that_arrive_while_others_decode_wait_for_a_fuller_prefill_without_a_device():
    ended = []
    sched = Scheduler(
        Recorder(), slots=8, blocks=BlockPool(64, 4), width=8, decode_steps=4,
        wait_ratio=1.0, max_wait=6,
    )  # fmt: skip
    running = [_request([i] * 4, 32, ended) for i in range(1, 5)]
    sched.waiting.extend(running)
    sched.admit()
    assert sched.prefill_due() and sched.run_ahead() == 1  # nothing decodes: at once
    for r in running:
        _prefilled(sched, r)
    assert not sched.prefill_due() and sched.run_ahead() == 4
    late = [_request([i] * 4, 32, ended) for i in range(10, 13)]
    sched.waiting.append(late[0])
    sched.admit()
    assert not sched.prefill_due()  # 1 prompt against 4 decoding: it waits
    assert sched.run_ahead() == 4  # and the decoding requests run whole calls meanwhile
    sched.decoded(4)
    assert not sched.prefill_due() and sched.run_ahead() == 2  # no call past its wait
    sched.decoded(2)
    assert sched.prefill_due()  # waited 6 steps: in it goes
    _prefilled(sched, late[0])
    assert not sched.prefill_due() and sched.waited == 0
    sched.waiting.extend(late[1:])
    sched.admit()
    assert not sched.prefill_due()  # 2 against 5
    sched.finish(0, None, "cancelled")
    sched.finish(1, None, "cancelled")
    sched.finish(2, None, "cancelled")
    assert sched.prefill_due()  # 2 against 2: in they go, and the round runs until both are in
    _prefilled(sched, late[1])
    assert sched.prefill_due() and sched.run_ahead() == 1
    _prefilled(sched, late[2])
    assert not sched.prefill_due() and sched.run_ahead() == 4
    sched.wait_ratio = 0.0  # off: a prompt never waits
    sched.waiting.append(_request([20] * 4, 32, ended))
    sched.admit()
    assert sched.prefill_due()
