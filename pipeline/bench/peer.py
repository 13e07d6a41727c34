"""`pipeline bench train|generate --peer torch`: our training step and the PyTorch peer's
(`torch_peer.py`: transformers' model of the same config, fused AdamW, the same batch shape;
eager and torch.compile'd), or our generate and transformers' `generate` (eager with its dynamic
cache; static cache + torch.compile), each in a process of its own (peak RSS is the process's;
torch and JAX never share one), alternated round by round on this machine, then the ratios of
the medians against the peer's faster configuration, named.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

ROUNDS = 2  # ours, peer, ours, peer: a shared machine drifts, alternation spreads it
TRAIN_FIELDS = ("tokens_per_sec", "step_time_s", "mfu", "mfu_causal", "peak_rss_bytes")


def train_rows(label: str, config: str, overrides: list[str], steps: int):
    """Rows: each round's ours and the peer's in both configurations (eager; compiled with
    inductor), then `train/{label}/vs-torch` with the ratios to the faster peer."""
    ours, peers = [], {False: [], True: []}
    for round_ in range(ROUNDS):
        command = ["-m", "pipeline", "bench", "train", "--config", config, "--json"]
        rows = _run([*command, "--steps", str(steps), *overrides])
        row = {**next(r for r in rows if r["case"].startswith("train/")), "round": round_}
        row["case"] = f"train/{label}"
        ours.append(row)
        yield row
        for compiled in (False, True):
            command = ["-m", "pipeline.bench.torch_peer", "--config", config]
            command += ["--steps", str(steps), *(["--compile"] if compiled else []), *overrides]
            peer = {**_run(command)[0], "round": round_}
            peer["case"] = f"train/{label}/torch" + ("-compiled" if compiled else "")
            # MFU against the peak our process measured (the peer's is a data-sheet figure)
            peer["mfu"] = peer["tokens_per_sec"] * peer["flops_per_token"] / row["peak_flops"]
            peer["mfu_causal"] = peer["mfu"] * row["mfu_causal"] / row["mfu"]  # the same count
            peer["allocator"] = row["allocator"]
            peers[compiled].append(peer)
            yield peer
    yield summary(f"train/{label}", ours, list(peers.values()), TRAIN_FIELDS)


def generate_rows(
    label: str, config: str, overrides: list[str], cases: list[str], rounds: int | None = None
):
    """`bench generate --peer torch` for batch cases (b1, b32): each of `rounds` rounds ours
    (our jitted generate), then transformers' `generate` eager with its dynamic cache and with a
    static cache + torch.compile, then `generate/{label}/{case}/vs-torch` against the faster
    (`rounds`: ROUNDS unless given)."""
    for case in cases:
        ours, peers = [], {False: [], True: []}
        for round_ in range(rounds or ROUNDS):
            command = ["-m", "pipeline", "bench", "generate", "--config", config, "--json"]
            rows = _run([*command, "--cases", case, *overrides])
            row = {**next(r for r in rows if r["case"].startswith("generate/")), "round": round_}
            row["case"] = f"generate/{label}/{case}"
            ours.append(row)
            yield row
            for compiled in (False, True):
                command = ["-m", "pipeline.bench.torch_peer", "--config", config]
                command += ["--generate", case[1:], *(["--compile"] if compiled else [])]
                peer = {**_run([*command, *overrides])[0], "round": round_}
                suffix = "/torch-compiled" if compiled else "/torch"
                peer["case"] = f"generate/{label}/{case}{suffix}"
                peer["allocator"] = row["allocator"]
                peers[compiled].append(peer)
                yield peer
        fields = ("tokens_per_sec", "decode_tokens_per_sec", "ttft_ms")
        yield summary(f"generate/{label}/{case}", ours, list(peers.values()), fields)


def summary(case: str, ours: list[dict], configs: list[list[dict]], fields: tuple) -> dict:
    """Medians of each side and ours / the peer's ratios (tokens/s above 1 is faster; times
    and peak RSS below 1 are shorter and smaller), against the peer's configuration with the
    highest median tokens/s (`peer_config`); every configuration's medians beside it."""

    def median(rows, field):
        return statistics.median(r[field] for r in rows)

    best = max(configs, key=lambda rows: median(rows, "tokens_per_sec"))
    result = {"case": f"{case}/vs-torch", "kind": "ratio", "peer": "torch", "rounds": len(ours)}
    result["peer_config"] = best[0].get("peer_config")
    for field in fields:
        result[f"ours_{field}"] = median(ours, field)
        result[f"peer_{field}"] = median(best, field)
        result[f"{field}_ratio"] = result[f"ours_{field}"] / result[f"peer_{field}"]
    for side, rows in (("ours", ours), ("peer", best)):
        speeds = [r["tokens_per_sec"] for r in rows]
        result[f"{side}_tokens_per_sec_range"] = [min(speeds), max(speeds)]
    result["peer_configs"] = {
        rows[0].get("peer_config"): {field: median(rows, field) for field in fields}
        for rows in configs
    }
    result["allocator"] = ours[0]["allocator"]
    result["device"] = ours[0]["device"]
    return result


def _run(arguments: list[str]) -> list[dict]:
    """The JSON lines a `python ...` subprocess printed; its error output if it failed."""
    done = subprocess.run([sys.executable, *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"python {' '.join(arguments)} failed ({done.returncode}):\n{tail}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
