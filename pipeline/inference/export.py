"""`pipeline export`: a run's prefill and decode programs as a `jax.export` artifact.

The artifact (one zip file) holds the serialised StableHLO of one prefill program per
prompt-length bucket and of one decode step (sampling included), each taking the weights as
an argument; the weights themselves (`weights.safetensors`, optionally int8/int4); the
tokenizer; and a manifest. `pipeline/exported.py` runs it with JAX alone, without this
package's model code or Flax. The batch dimension is symbolic, so any batch size runs; the
cache spans the model's whole context.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save as save_safetensors

from pipeline.inference.generate import buckets, decode_step, prefill
from pipeline.inference.sampling import sample
from pipeline.model import init_cache
from pipeline.weights import weight_name

FORMAT = "pipeline-export/1"


def export_model(model, tokenizer, out: str | Path, platforms: tuple[str, ...] | None = None):
    """Export `model`'s prefill and decode step to the zip file `out`; returns the manifest."""
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = [weight_name(path) for path, _ in paths_leaves]
    if len(set(names)) != len(names):
        raise ValueError("two parameters share a name; cannot export")
    weights = {name: np.asarray(leaf) for name, (_, leaf) in zip(names, paths_leaves, strict=True)}

    def merged(weights):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, [weights[n] for n in names]))

    files, prompt_buckets, exported = _programs(cfg, merged, weights, platforms)
    manifest = {
        "format": FORMAT,
        "max_seq_len": cfg.max_seq_len,
        "vocab_size": cfg.vocab_size,
        "prefill_buckets": prompt_buckets,
        "platforms": list(exported.platforms),
        "eos_id": tokenizer.eos_id,
        # every id that ends a generation (an imported model's generation_config.json may
        # name several: Llama 3's end of turn beside its end of text)
        "stop_ids": sorted(tokenizer.stop_ids),
        "end_id": tokenizer.end_id,
        "jax_version": jax.__version__,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("manifest.json", json.dumps(manifest, indent=2))
        archive.writestr("weights.safetensors", save_safetensors(weights))
        archive.writestr("tokenizer.json", tokenizer.hf.to_str())
        for name, data in files.items():
            archive.writestr(name, bytes(data))
    return manifest


def _programs(cfg, merged, weights: dict, platforms):
    """The serialised programs: a prefill per prompt bucket and one decode step, each for a
    symbolic batch size `b`. Returns (files, prompt buckets, the decode step's Exported)."""
    max_len = cfg.max_seq_len

    def prefill_fn(weights, tokens, lengths):
        model = merged(weights)
        return prefill(model, tokens, lengths, init_cache(cfg, tokens.shape[0], max_len))

    def step_fn(weights, logits, cache, positions, keys, temperature, top_k, top_p):
        token = sample(logits, keys, temperature, top_k, top_p)
        logits, cache = decode_step(merged(weights), token, positions, cache)
        return token, logits, cache

    (b,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct
    w_spec = {n: spec(w.shape, w.dtype) for n, w in weights.items()}
    cache_spec = jax.tree.map(
        lambda x: spec((b, *x.shape[1:]), x.dtype),
        jax.eval_shape(lambda: init_cache(cfg, 1, max_len)),
    )
    kw = {"platforms": platforms} if platforms else {}
    files = {}
    prompt_buckets = buckets(max_len)
    for P in prompt_buckets:
        exported = jax.export.export(jax.jit(prefill_fn), **kw)(
            w_spec, spec((b, P), jnp.int32), spec((b,), jnp.int32)
        )
        files[f"prefill-{P}.bin"] = exported.serialize()
    row = lambda dtype: spec((b,), dtype)  # noqa: E731
    exported = jax.export.export(jax.jit(step_fn), **kw)(
        w_spec,
        spec((b, cfg.vocab_size), jnp.float32),
        cache_spec,
        row(jnp.int32),
        spec((b, 2), jnp.uint32),
        row(jnp.float32),
        row(jnp.int32),
        row(jnp.float32),
    )
    files["decode.bin"] = exported.serialize()
    return files, prompt_buckets, exported
