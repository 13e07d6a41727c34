"""One human-readable line per benchmark result (or, with --json, the result as JSON)."""

from __future__ import annotations

import json


def emit(result: dict, as_json: bool) -> None:
    print(json.dumps(result) if as_json else format_result(result), flush=True)


def format_result(r: dict) -> str:
    """The line for a result, by the `kind` its benchmark gave it."""
    return FORMATS[r["kind"]](r)


def _soak(r: dict) -> str:
    return (
        f"{r['case']:<24} {r['requests']:,} requests in {r['wall_s']:.0f} s: answered "
        f"{r['answered']:,}, refused {r['refused']:,}, left {r['left']:,}, failed {r['failed']}  "
        f"latency p50 {r['latency_p50_ms']:.0f} ms p99 {r['latency_p99_ms']:.0f} ms  after: busy "
        f"slots {r['busy_slots_after']}, KV blocks in use {r['kv_blocks_in_use_after']}  RSS "
        f"{r['rss_start_bytes'] / 2**20:,.0f} -> {r['rss_end_bytes'] / 2**20:,.0f} MiB "
        f"({r['rss_growth']:+.1%})"
    )


def _speculative(r: dict) -> str:
    return (
        f"{r['case']:<24} {r['tokens_per_sec']:8,.0f} tokens/s  "
        f"speed-up {r['speedup']:.2f}x  acceptance {r['acceptance']:.1%}  "
        f"same tokens as the teacher: {r['same_tokens']}"
    )


def _distilled(r: dict) -> str:
    loss = r["eval_loss"]
    return (
        f"{r['case']:<24} {r['tokens_per_sec']:8,.0f} tokens/s  "
        f"eval loss {loss if loss is None else round(loss, 4)}  "
        f"({r['params'] / 1e6:.2f}M params, {r['allocator']})"
    )


def _startup(r: dict) -> str:
    return f"{r['case']:<32} {r['seconds_to_first_answer']:6.1f} s to the first answer"


def _serving(r: dict) -> str:
    return (
        f"{r['case']:<32} {r['requests_per_sec']:6.2f} req/s  "
        f"{r['tokens_per_sec']:8,.0f} tokens/s  TTFT p50 {r['ttft_p50_ms']:7.1f} "
        f"p99 {r['ttft_p99_ms']:7.1f} ms  latency p50 {r['latency_p50_ms']:7.0f} "
        f"p99 {r['latency_p99_ms']:7.0f} ms  ({r['requests']} requests, "
        f"{r['slots']} slots, prompt {r['prompt_len']}, "
        f"{r['max_tokens']} tokens, {r['allocator']})"
        + (
            f"  ITL p50 {r['itl_p50_ms']:.1f} p99 {r['itl_p99_ms']:.1f} ms  "
            f"cores busy {r['cores_busy']:.2f}  peak running {r['peak_running']}  "
            f"preemptions {r['preemptions']}  prefix hits {r['prefix_hit_rate']:.0%}"
            if "peak_running" in r
            else ""
        )
        + (f"  TTFT {r['ttft_speedup']:.1f}x lower cached" if "ttft_speedup" in r else "")
        + (
            f"  = {r['vs_generate']:.1%} of generate's batch-{r['concurrency']} decode "
            f"({r['generate_decode_tokens_per_sec']:,.0f} tokens/s)"
            + (
                f", {r['vs_generate_with_prefill']:.1%} of its whole run"
                if "vs_generate_with_prefill" in r
                else ""
            )
            if "vs_generate" in r
            else ""
        )
        + (
            f"  engine: host {r['engine_host_ms_per_iteration']:.2f} ms + waiting "
            f"{r['engine_wait_ms_per_iteration']:.2f} ms per iteration, "
            f"{r['engine_tokens_per_iteration']:.1f} tokens per iteration"
            + (
                f", device {r['engine_device_ms_per_step']:.2f} ms per step"
                if r["engine_device_ms_per_step"] is not None
                else ""
            )
            if "engine_iterations" in r
            else ""
        )
        + (
            f"  ours / this: {r['ours_tokens_per_sec_ratio']:.2f}x tokens/s, "
            f"{r['ours_ttft_p50_ratio']:.2f}x TTFT p50"
            if "ours_tokens_per_sec_ratio" in r
            else ""
        )
    )


def _quantized(r: dict) -> str:
    return (
        f"{r['case']:<22} weights {r['weight_bytes'] / 2**20:8.2f} MiB "
        f"({r['bytes_ratio']:.3f}x)  eval loss {r['eval_loss']:.4f} "
        f"({r['eval_loss_delta']:+.4f})  next-token agreement "
        f"{r['next_token_agreement']:.1%}  greedy agreement {r['greedy_agreement']:.1%}"
    )


def _recompute(r: dict) -> str:
    return (
        f"{r['case']:<22} {r['recompute_tokens_per_sec']:10,.1f} tokens/s without "
        f"a cache, {r['tokens_per_sec']:,.1f} with: {r['speedup']:.1f}x  "
        f"(prompt {r['prompt_len']}, {r['new_tokens']} new tokens, {r['allocator']})"
    )


def _generation(r: dict) -> str:
    return (
        f"{r['case']:<22} {r['tokens_per_sec']:10,.0f} tokens/s  "
        f"(decode {r['decode_tokens_per_sec']:,.0f})  "
        f"TTFT {r['ttft_ms']:7.1f} ms  compile {r['compile_s']:.1f} s  "
        f"weights {r['weight_bytes'] / 2**20:.1f} MiB  "
        f"(batch {r['batch']}, prompt {r['prompt_len']}, "
        f"{r['new_tokens']} new tokens, {r['allocator']})"
    )


def _matmul(r: dict) -> str:
    gflops = r["flops_per_sec"] / 1e9
    precision = r.get("precision", "")
    return f"{r['case']:<22} {gflops:8.1f} GFLOP/s {precision} ({r['device']}, {r['allocator']})"


def _torch(r: dict) -> str:
    return (
        f"{r['case']:<22} {r['tokens_per_sec']:10,.0f} tokens/s  "
        f"step {r['step_time_s'] * 1e3:8.1f} ms  MFU {r['mfu']:.3f} (PaLM's count), "
        f"{r['mfu_causal']:.3f} (causal)  "
        f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB  ({r['peer_config']}, "
        f"torch {r['torch']}, batch {r['batch']}x{r['seq_len']}, {r['compute_dtype']}, "
        f"{r['allocator']})"
    )


def _torch_generation(r: dict) -> str:
    return (
        f"{r['case']:<22} {r['tokens_per_sec']:10,.0f} tokens/s  "
        f"(decode {r['decode_tokens_per_sec']:,.0f})  TTFT {r['ttft_ms']:7.1f} ms  "
        f"({r['peer_config']}, torch {r['torch']}, batch {r['batch']}, prompt {r['prompt_len']}, "
        f"{r['new_tokens']} new tokens, {r['allocator']})"
    )


def _ratios(r: dict) -> str:
    """ours / torch, medians of the alternated rounds, for each field the row compares."""
    parts = []
    for key in [k for k in r if k.endswith("_ratio")]:
        field = key[: -len("_ratio")]
        ours, peer, unit = r[f"ours_{field}"], r[f"peer_{field}"], ""
        if field.endswith("_bytes"):
            ours, peer, unit = ours / 2**30, peer / 2**30, " GiB"
        parts.append(f"{field} {r[key]:.2f}x ({ours:,.2f} vs {peer:,.2f}{unit})")
    rounds = f"ours / torch, medians of {r['rounds']} alternated rounds: "
    against = f" (against {r['peer_config']})" if r.get("peer_config") else ""
    return f"{r['case']:<22} {rounds}" + ", ".join(parts) + against


def _training(r: dict) -> str:
    return (
        f"{r['case']:<22} {r['tokens_per_sec']:10,.0f} tokens/s  "
        f"step {r['step_time_s'] * 1e3:8.1f} ms  MFU {r['mfu']:.3f} (PaLM's count), "
        f"{r['mfu_causal']:.3f} (causal)  compile {r['compile_s']:.1f} s  "
        f"memory {r['peak_bytes'] / 2**20:,.0f} MiB "
        f"(state {r['state_bytes'] / 2**20:,.0f})  ({r['params'] / 1e6:.1f}M params, "
        f"batch {r['batch']}x{r['seq_len']}, {r['devices']} device(s), "
        f"{r['compute_dtype']}, {r['allocator']})"
    )


def _peer_failed(r: dict) -> str:
    return f"{r['case']:<22} {r['peer_config']} did not run: {r['error']}"


# A result's kind -> its line (every benchmark result carries its kind).
FORMATS = {
    "train": _training,
    "matmul": _matmul,
    "generate": _generation,
    "recompute": _recompute,
    "quantize": _quantized,
    "distill": _distilled,
    "speculative": _speculative,
    "serve": _serving,
    "serve-startup": _startup,
    "soak": _soak,
    "torch_train": _torch,
    "torch_generate": _torch_generation,
    "ratio": _ratios,
    "peer_failed": _peer_failed,
}
