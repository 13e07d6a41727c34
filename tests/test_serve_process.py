"""`pipeline serve` as a real process: a LoRA run (base + adapter), SIGTERM drains and exits.

Run: pytest -m slow tests/test_serve_process.py
"""

import json
import signal

import httpx
import pytest
from conftest import make_tiny_runs
from helpers import serve_process


@pytest.mark.slow
def test_serve_a_lora_run_then_sigterm_finishes_the_stream_and_exits(tmp_path):
    make_tiny_runs(tmp_path)
    proc, url = serve_process(str(tmp_path / "ft"), tmp_path / "jax", "serve.slots=2")
    try:
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "ft"
        body = {
            "model": "ft",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 150,
            "temperature": 0,
            "stream": True,
        }
        lines = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line and not lines:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
                if line:
                    lines.append(line)
        assert lines[-1] == "data: [DONE]"
        finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-1]]
        assert finish[-1] in ("stop", "length")
        assert proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.e2e
def test_bench_serve_reports_the_engine_loop_the_generate_ratio_and_start_up(tiny_config):
    """`bench serve` on a tiny model: the load's figures come with the engine loop's (host time,
    device waits, tokens per iteration), the same model's `generate` at the same batch and
    the server's share of it; the `startup` case times a real `pipeline serve` process from a
    cold and then a warm compilation cache to its first answer."""
    from dataclasses import replace

    from pipeline.bench.inference import REPEAT_RUNS
    from pipeline.bench.loadgen import bench_serve

    cfg = replace(tiny_config, serve=replace(tiny_config.serve, slots=4))
    rows = list(bench_serve(cfg, "tiny", (4, "startup"), 8, 8, baseline_concurrency=0))
    load, *startup = rows
    assert load["case"] == "serve/tiny/batched/c4" and load["tokens_per_sec"] > 0
    assert load["engine_iterations"] > 0 and load["engine_tokens_per_iteration"] >= 1
    assert load["engine_host_ms_per_iteration"] > 0 and 0 < load["engine_host_share"] <= 1
    # at most the 4 slots run in a decode step; every prompt was prefilled by some call
    assert 0 < load["engine_rows_per_step"] <= 4 and load["engine_prefills_per_iteration"] > 0
    assert load["generate_decode_tokens_per_sec"] > 0
    assert 1 <= load["generate_runs"] <= REPEAT_RUNS
    assert load["vs_generate"] == load["tokens_per_sec"] / load["generate_decode_tokens_per_sec"]
    # generate's whole run (its prefill counted) is slower than its decode alone
    assert load["vs_generate_with_prefill"] > load["vs_generate"]
    # each process's CPU per request, counted to the nanosecond: none is zero, and the server's
    # two over the load's wall are at least the cores busy over the whole measurement (which
    # also holds the clients' start and their results' return)
    cpu = {k: load[f"{k}_cpu_us_per_request"] for k in ("server", "engine", "clients")}
    assert all(v > 0 for v in cpu.values()) and "cpu_s" not in load
    busy = (cpu["server"] + cpu["engine"]) * load["requests"] / 1e6 / load["wall_s"]
    assert busy >= 0.98 * load["cores_busy"] > 0
    assert [r["case"] for r in startup] == [
        f"serve/tiny/startup/{label}" for label in ("cold", "warm", "warm")
    ]
    assert all(r["seconds_to_first_answer"] > 0 for r in startup)


@pytest.mark.e2e
def test_bench_serve_engine_case_times_the_engine_alone_and_its_step_against_generate(
    tiny_config,
):
    """`bench serve --cases engine`: every request of the engine-alone waves delivers its whole
    budget (no stop token), and the row's ratios are the engine's figures over `generate`'s
    at the same batch, measured in the same round."""
    from pipeline.bench.engine_case import MAX_TOKENS, engine_case

    (row,) = engine_case(tiny_config, "tiny", None, {}, rounds=1, waves=2, batch=4)
    assert row["case"] == "serve/tiny/engine/b4" and row["kind"] == "serve-engine"
    assert row["engine_tokens"] == 2 * 4 * MAX_TOKENS
    assert row["engine_tokens_per_sec"] > 0 and row["engine_device_ms_per_step"] > 0
    assert row["generate_step_ms"] == 4e3 / row["generate_decode_tokens_per_sec"]
    assert (
        row["vs_generate"] == row["engine_tokens_per_sec"] / row["generate_decode_tokens_per_sec"]
    )
    assert row["step_vs_generate"] == row["engine_device_ms_per_step"] / row["generate_step_ms"]
