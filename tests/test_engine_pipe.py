"""The server's side of the pipe to the engine core process (`serving/core.py`): what one turn of
the event loop sends crosses as one message, and a batch of replies settles each caller's call
with its own answer. The other end is played by the test on a real pipe, so no model compiles.
"""

import asyncio
import multiprocessing
import os

import pytest

from pipeline.inference.sampling import Sampling
from pipeline.serving.client import Job
from pipeline.serving.core import EngineClient, EngineDeadError
from pipeline.serving.engine import QueueFullError

FACTS = {
    "max_len": 64,
    "vocab_size": 320,
    "num_slots": 4,
    "kv_blocks": 16,
    "pid": 0,
    "compile_s": 0.0,
    "programs": 0,
    "adapters": None,
}


@pytest.fixture
def dead_client():
    """A client whose engine process exited with code 9 and whose pipe's far end is closed."""
    ours, core = multiprocessing.Pipe()
    gone = multiprocessing.get_context("spawn").Process(target=os._exit, args=(9,))
    gone.start()
    gone.join()
    core.close()
    return EngineClient(ours, gone, FACTS)


async def _recv(conn):
    return await asyncio.get_running_loop().run_in_executor(None, conn.recv)


def test_a_burst_of_submits_crosses_as_one_message_and_a_batch_of_replies_settles_each():
    ours, core = multiprocessing.Pipe()
    client = EngineClient(ours, None, FACTS)

    async def main():
        jobs = [Job(prompt=[1, 2, 3], max_tokens=4, sampling=Sampling()) for _ in range(3)]
        calls = [asyncio.create_task(client.submit([job])) for job in jobs]
        message = await _recv(core)
        assert message[0] == "many"
        assert [m[0] for m in message[1]] == ["submit"] * 3
        assert [m[2][0].id for m in message[1]] == [job.id for job in jobs]
        ids = [m[1] for m in message[1]]
        refused = ("QueueFullError", "the queue is full")
        core.send(("many", [("reply", ids[0], None, None), ("reply", ids[1], refused, None)]))
        core.send(("reply", ids[2], None, None))
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], QueueFullError) and "full" in str(results[1])
        # the refused job is cancelled in the engine and forgotten here; the others stay
        assert await _recv(core) == ("cancel", jobs[1].id)
        assert set(client.jobs) == {jobs[0].id, jobs[2].id}
        # a single message of a turn goes alone
        client.cancel(jobs[0])
        assert await _recv(core) == ("cancel", jobs[0].id)

    asyncio.run(main())


def test_a_pipe_closed_before_a_burst_is_sent_fails_every_call_in_it(dead_client):
    client = dead_client

    async def main():
        ended = []
        jobs = [
            Job(prompt=[1], max_tokens=2, sampling=Sampling(), emit=lambda t, r: ended.append(r))
            for _ in range(2)
        ]
        results = await asyncio.wait_for(
            asyncio.gather(*(client.submit([job]) for job in jobs), return_exceptions=True), 30
        )
        assert all(type(r).__name__ == "EngineDeadError" for r in results), results
        assert "exit code 9" in client.dead
        assert ended == ["error", "error"] and not client.jobs  # each stream told, none kept

    asyncio.run(main())


@pytest.mark.parametrize("n", [1, 5])
def test_a_message_sent_before_the_event_loop_runs_goes_at_once(n):
    ours, core = multiprocessing.Pipe()
    client = EngineClient(ours, None, FACTS)
    for i in range(n):
        client._send(("cancel", i))
        assert core.recv() == ("cancel", i)


def test_a_message_sent_before_the_event_loop_runs_on_a_closed_pipe_raises(dead_client):
    client = dead_client
    with pytest.raises(EngineDeadError, match="exit code 9"):
        client._send(("cancel", 0))
    with pytest.raises(EngineDeadError):  # and every later send, without touching the pipe
        client._send(("cancel", 1))
