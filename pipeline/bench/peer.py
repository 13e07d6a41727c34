"""`pipeline bench train|generate --peer torch`: our training step and the PyTorch peer's
(`torch_peer.py`: transformers' model of the same config, AdamW, the same batch shape), or our
generate and transformers' `generate`, each in a process of its own (peak RSS is the process's;
torch and JAX never share one), alternated round by round on this machine, then the ratios of
the medians.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

ROUNDS = 2  # ours, peer, ours, peer: a shared machine drifts, alternation spreads it
TRAIN_FIELDS = ("tokens_per_sec", "step_time_s", "mfu", "peak_rss_bytes")


def train_rows(label: str, config: str, overrides: list[str], steps: int):
    """Rows: each round's ours and peer's, then `train/{label}/vs-torch` with the ratios."""
    ours, peers = [], []
    for round_ in range(ROUNDS):
        command = ["-m", "pipeline", "bench", "train", "--config", config, "--json"]
        rows = _run([*command, "--steps", str(steps), *overrides])
        row = {**next(r for r in rows if r["case"].startswith("train/")), "round": round_}
        row["case"] = f"train/{label}"
        ours.append(row)
        yield row
        command = ["-m", "pipeline.bench.torch_peer", "--config", config, "--steps", str(steps)]
        peer = {**_run([*command, *overrides])[0], "round": round_}
        peer["case"] = f"train/{label}/torch"
        # MFU against the peak our process measured (the peer's is a data-sheet figure)
        peer["mfu"] = peer["tokens_per_sec"] * peer["flops_per_token"] / row["peak_flops"]
        peer["allocator"] = row["allocator"]
        peers.append(peer)
        yield peer
    yield summary(f"train/{label}", ours, peers, TRAIN_FIELDS)


def generate_rows(label: str, config: str, overrides: list[str], cases: list[str]):
    """`bench generate --peer torch` for batch cases (b1, b32): each round ours (our jitted
    generate) then transformers' `generate`, then `generate/{label}/{case}/vs-torch`."""
    for case in cases:
        ours, peers = [], []
        for round_ in range(ROUNDS):
            command = ["-m", "pipeline", "bench", "generate", "--config", config, "--json"]
            rows = _run([*command, "--cases", case, *overrides])
            row = {**next(r for r in rows if r["case"].startswith("generate/")), "round": round_}
            row["case"] = f"generate/{label}/{case}"
            ours.append(row)
            yield row
            command = ["-m", "pipeline.bench.torch_peer", "--config", config]
            peer = {**_run([*command, "--generate", case[1:], *overrides])[0], "round": round_}
            peer["case"], peer["allocator"] = f"generate/{label}/{case}/torch", row["allocator"]
            peers.append(peer)
            yield peer
        fields = ("tokens_per_sec", "decode_tokens_per_sec", "ttft_ms")
        yield summary(f"generate/{label}/{case}", ours, peers, fields)


def summary(case: str, ours: list[dict], peers: list[dict], fields: tuple) -> dict:
    """Medians of each side and ours / peer's ratios (tokens/s above 1 is faster; times and
    peak RSS below 1 are shorter and smaller)."""

    def median(rows, field):
        return statistics.median(r[field] for r in rows)

    result = {"case": f"{case}/vs-torch", "kind": "ratio", "peer": "torch", "rounds": len(ours)}
    for field in fields:
        result[f"ours_{field}"] = median(ours, field)
        result[f"peer_{field}"] = median(peers, field)
        result[f"{field}_ratio"] = result[f"ours_{field}"] / result[f"peer_{field}"]
    for side, rows in (("ours", ours), ("peer", peers)):
        speeds = [r["tokens_per_sec"] for r in rows]
        result[f"{side}_tokens_per_sec_range"] = [min(speeds), max(speeds)]
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
