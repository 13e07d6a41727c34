"""GGUF in and out (llama.cpp, Ollama and LM Studio's format) for the Llama-layout families that
transformers' GGUF loader reads too: llama, mistral (GGUF's `llama`), qwen2, qwen3.

`export_gguf(RUN, OUT, dtype)` writes a run's model (a LoRA run merged first) with the `gguf`
package's writer: its config as GGUF metadata, its byte-level BPE tokenizer (`tokenizer.ggml.*`:
tokens, merges, types, special ids) and chat template, and each tensor in f32, f16, bf16 or
q8_0 (norms stay f32, as llama.cpp keeps them; a matrix whose rows do not split into q8_0's
blocks of 32 goes in f16). `import_gguf(FILE, OUT, dtype)` reads one back into a run
directory: the config and tokenizer as transformers builds them from the file (its
`AutoConfig` / `AutoTokenizer` with `gguf_file=`), the tensors with `gguf`'s reader, each
dequantized (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K and the rest `gguf` knows) into
`dtype` one at a time, as `import_hf` reads safetensors.

llama.cpp stores the llama architecture's q and k rows permuted for its rotary layout; both
directions undo or redo that permutation (transformers' loader reverses it the same way).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError

# our family -> GGUF's architecture name
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
DTYPES = ("f32", "f16", "bf16", "q8_0")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError(
            "GGUF needs the gguf package (and transformers to read a GGUF tokenizer): "
            "pip install 'gguf>=0.17' transformers, or make install (the interop extra)"
        ) from None
    return gguf


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' q or k rows -> llama.cpp's (convert_hf_to_gguf's `permute`)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q or k rows -> transformers' (the inverse of `_permute`)."""
    return (
        w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _heads(hf_name: str, cfg) -> int | None:
    """How many heads a llama-architecture tensor's rows are permuted by (None: not permuted)."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return cfg.num_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return cfg.num_kv_heads
    return None


def _name_map(gguf, arch: str, layers: int):
    for key, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return gguf.get_tensor_name_map(key, layers)
    raise ConfigError(f"GGUF architecture {arch!r} is not one the gguf package knows")


def gguf_name(name_map, hf_name: str) -> str:
    """transformers' tensor name -> GGUF's (`blk.N.attn_q.weight`, ...)."""
    base, _, suffix = hf_name.rpartition(".")
    found = name_map.get_name(base)
    if found is None:
        raise ConfigError(f"no GGUF name for the tensor {hf_name}")
    return f"{found}.{suffix}"


# --- out ---------------------------------------------------------------------------------------


def export_gguf(run_dir: str | Path, out: str | Path, dtype: str = "f16") -> Path:
    """A run (a LoRA run merged into its base) -> one GGUF file."""
    from flax import nnx

    from pipeline.inference.runs import load_model
    from pipeline.interop.hf import to_hf
    from pipeline.lora import merge
    from pipeline.weights import weight_name

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    gguf = _gguf()
    cfg, model, tokenizer = load_model(run_dir, key="export-gguf")
    cfg = cfg.model
    arch = ARCHITECTURES.get(cfg.family)
    if arch is None:
        raise ConfigError(
            f"export-gguf: the {cfg.family!r} family has no GGUF layout here "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    _check_exportable(cfg)
    import jax

    state = nnx.state(merge(model))
    ours = {
        weight_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
    }
    tensors = to_hf(cfg, ours)
    del ours
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch)
    _write_metadata(gguf, writer, cfg, tokenizer, Path(run_dir).name, dtype)
    names = _name_map(gguf, arch, cfg.num_layers)
    for hf_name in list(tensors):
        value = tensors.pop(hf_name)
        heads = _heads(hf_name, cfg) if arch == "llama" else None
        if heads is not None:
            value = _permute(value, heads)
        data, qtype = _encode(gguf, value, dtype)
        writer.add_tensor(gguf_name(names, hf_name), data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _check_exportable(cfg) -> None:
    """What GGUF's keys cannot say is refused, not written wrong: RoPE scaling (llama.cpp
    stores Llama 3's as a tensor of frequencies, which transformers' GGUF loader ignores), a
    sliding window (llama.cpp's llama architecture has none) and biases on q, k, v beyond
    Qwen2's."""
    if cfg.rope_scaling not in (None, "none"):
        raise ConfigError(f"export-gguf: RoPE scaling {cfg.rope_scaling!r} has no GGUF form here")
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_seq_len:
        raise ConfigError(
            f"export-gguf: a sliding window ({cfg.sliding_window}) shorter than the context "
            f"({cfg.max_seq_len}) has no GGUF form for {cfg.family}"
        )


def _encode(gguf, value: np.ndarray, dtype: str):
    """A tensor in the file's type: 1-D ones (norms, biases) in f32, as llama.cpp keeps them."""
    T = gguf.GGMLQuantizationType
    value = np.ascontiguousarray(value, np.float32)
    if value.ndim == 1 or dtype == "f32":
        return value, T.F32
    if dtype == "q8_0" and value.shape[-1] % 32:
        dtype = "f16"
    if dtype == "f16":
        return value.astype(np.float16), T.F16
    qtype = T.BF16 if dtype == "bf16" else T.Q8_0
    return gguf.quants.quantize(value, qtype), qtype


def _write_metadata(gguf, writer, cfg, tokenizer, name: str, dtype: str) -> None:
    """The config and the tokenizer as GGUF keys."""
    writer.add_name(name)
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[dtype]
    )
    writer.add_vocab_size(cfg.vocab_used or cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.embed_dim)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.mlp_dim)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    _write_tokenizer(gguf, writer, tokenizer, cfg.vocab_used or cfg.vocab_size)


def _write_tokenizer(gguf, writer, tokenizer, vocab: int) -> None:
    """A byte-level BPE tokenizer as GGUF's `gpt2` model: its tokens by id, merges, types
    (special tokens CONTROL), special ids and chat template."""
    model = json.loads(tokenizer.hf.to_str())["model"]
    if model.get("type") != "BPE":
        raise ConfigError(
            "export-gguf: only byte-level BPE tokenizers are written (GGUF's gpt2 model); "
            f"this one is {model.get('type')}"
        )
    special = {t.content for t in tokenizer.hf.get_added_tokens_decoder().values() if t.special}
    tokens, types = [], []
    for i in range(vocab):
        token = tokenizer.hf.id_to_token(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        unused = token is None
        kind = gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
        types.append(gguf.TokenType.UNUSED if unused else kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_token_scores([0.0] * len(tokens))  # (with no merges, readers derive them: none)
    for add, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_id),
        (writer.add_eos_token_id, tokenizer.eos_id),
        (writer.add_pad_token_id, tokenizer.pad_id),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(False)
    template = (tokenizer.imported or {}).get("chat_template")
    if template:
        writer.add_chat_template(template)


# --- in ----------------------------------------------------------------------------------------


class GGUFTensors:
    """A GGUF file's tensors under transformers' names, each dequantized to float32 when read
    (the reader maps the file; one tensor at a time is in memory): what `read_params` takes."""

    def __init__(self, path: Path, cfg, arch: str):
        gguf = _gguf()
        self.source, self.cfg, self.arch = str(path), cfg, arch
        self.tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
        self.names = _name_map(gguf, arch, cfg.num_layers)
        self.dequantize = gguf.quants.dequantize

    def __contains__(self, hf_name: str) -> bool:
        try:
            return gguf_name(self.names, hf_name) in self.tensors
        except ConfigError:
            return False

    def get(self, hf_name: str) -> np.ndarray:
        tensor = self.tensors[gguf_name(self.names, hf_name)]
        value = np.asarray(self.dequantize(tensor.data, tensor.tensor_type), np.float32)
        heads = _heads(hf_name, self.cfg) if self.arch == "llama" else None
        return _unpermute(value, heads) if heads is not None else value


def import_gguf(
    path: str | Path, out: str | Path, dtype: str = "float32", chat_template: str | None = None
) -> Path:
    """A GGUF file -> a run directory, as `import_hf` writes one."""
    import transformers
    from flax import nnx

    from pipeline.interop.hf import _imported_tokenizer, read_params, write_run
    from pipeline.interop.hf_config import model_config_from_hf
    from pipeline.model import abstract_model

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such GGUF file")
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype: {dtype!r} is not one of float32, bfloat16")
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    field = reader.fields.get(f"{arch}.attention.key_length")
    key_length = int(field.parts[-1][0]) if field is not None else None
    del reader
    if arch not in set(ARCHITECTURES.values()):
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported here")
    where = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    hf = transformers.AutoConfig.from_pretrained(**where).to_dict()
    if key_length:  # (transformers' qwen3 mapping leaves head_dim at its default)
        hf["head_dim"] = key_length
    model_cfg = model_config_from_hf(hf, str(path))
    model_cfg = dataclasses.replace(model_cfg, param_dtype=dtype, compute_dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer as transformers saves it
        transformers.AutoTokenizer.from_pretrained(**where).save_pretrained(tmp)
        tokenizer = _imported_tokenizer(Path(tmp), hf, chat_template)
    _, like = nnx.split(abstract_model(model_cfg))
    params = read_params(model_cfg, GGUFTensors(path, model_cfg, arch), like)
    return write_run(model_cfg, tokenizer, params, out, str(path))
