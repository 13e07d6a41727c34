"""Run an artifact written by `pipeline export` with JAX alone (no Flax, no model code).

    python -m pipeline.exported model.zip --prompt "def main(" --max-new-tokens 40 [--json]

`ExportedModel.load(path)` deserialises the prefill programs (one per prompt-length bucket)
and the decode step, and reads the weights; `generate` prefills a batch of prompts and runs
the decode step once per token. Sampling follows `pipeline.inference.sampling` exactly (the
key of step s is `request_keys(seed, s)`), so the tokens equal the live model's for the same
inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load as load_safetensors

from pipeline.inference.sampling import request_keys

FORMAT = "pipeline-export/1"


class ExportedModel:
    def __init__(self, manifest: dict, prefills: dict, decode, weights: dict, tokenizer_json):
        self.manifest = manifest
        self.prefills = prefills  # prompt bucket -> jax.export.Exported
        self.decode = decode
        self.weights = {name: jnp.asarray(w) for name, w in weights.items()}
        self.tokenizer_json = tokenizer_json
        self.max_seq_len = manifest["max_seq_len"]

    @classmethod
    def load(cls, path: str | Path) -> ExportedModel:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"exported model not found: {path}")
        try:
            with zipfile.ZipFile(path) as archive:
                manifest = json.loads(archive.read("manifest.json"))
                if manifest.get("format") != FORMAT:
                    raise ValueError(f"{path}: format {manifest.get('format')!r}, not {FORMAT}")
                prefills = {
                    P: jax.export.deserialize(bytearray(archive.read(f"prefill-{P}.bin")))
                    for P in manifest["prefill_buckets"]
                }
                decode = jax.export.deserialize(bytearray(archive.read("decode.bin")))
                weights = load_safetensors(archive.read("weights.safetensors"))
                tokenizer_json = archive.read("tokenizer.json").decode()
        except (zipfile.BadZipFile, KeyError) as err:
            raise ValueError(f"{path} is not a complete exported model: {err}") from None
        return cls(manifest, prefills, decode, weights, tokenizer_json)

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.tokenizer_json)

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_id: int | list[int] = -1,
    ) -> list[list[int]]:
        """Token ids for each prompt (each row stops at `eos_id`, or at any of a list of end
        ids, which it includes)."""
        stops = {eos_id} if isinstance(eos_id, int) else set(eos_id)
        B, longest = len(prompts), max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0 or longest + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompts of 1..{self.max_seq_len - max_new_tokens} tokens are needed "
                f"for {max_new_tokens} new tokens within a context of {self.max_seq_len}"
            )
        P = min(b for b in self.prefills if b >= longest)
        tokens = np.zeros((B, P), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
        logits, cache = self.prefills[P].call(self.weights, jnp.asarray(tokens), lengths)
        seeds = jnp.full((B,), seed, jnp.uint32)
        rows = (
            jnp.full((B,), temperature, jnp.float32),
            jnp.full((B,), top_k, jnp.int32),
            jnp.full((B,), top_p, jnp.float32),
        )
        out, done = [[] for _ in range(B)], np.zeros(B, bool)
        for step in range(max_new_tokens):
            keys = request_keys(seeds, step)
            token, logits, cache = self.decode.call(
                self.weights, logits, cache, lengths + step, keys, *rows
            )
            for i, t in enumerate(np.asarray(token)):
                if not done[i]:
                    out[i].append(int(t))
                    done[i] = int(t) in stops
            if done.all():
                break
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.exported", description=__doc__)
    parser.add_argument("artifact")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        model = ExportedModel.load(args.artifact)
        tokenizer = model.tokenizer()
        ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
        start = time.perf_counter()
        (tokens,) = model.generate(
            [ids],
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            args.seed,
            eos_id=model.manifest.get("stop_ids", model.manifest["eos_id"]),
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"text": text, "tokens": tokens, "seconds": seconds}))
    else:
        print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
