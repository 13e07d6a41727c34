"""Hugging Face interop: checkpoints of every supported family in and out, PEFT adapters out.

`import_hf(SRC, OUT)` reads a local model directory (`config.json`, one safetensors file or the
shards its index lists, `tokenizer.json`) tensor by tensor (no torch) into a run directory that
every stage accepts. `export_hf(RUN, DST)` writes `config.json`, `generation_config.json`,
`model.safetensors` and the tokenizer back in transformers' layout; for a LoRA run the base goes
there and the adapter (`adapter_model.safetensors`, `adapter_config.json` with the module names
transformers uses) to `DST/adapter`, so `PeftModel.from_pretrained(
AutoModelForCausalLM.from_pretrained(DST), DST/adapter)` rebuilds the fine-tuned model. The
configs' mapping is `hf_config.py`.

Layouts: torch `nn.Linear` stores (out, in), our kernels are (in, out); GPT-2's `Conv1D` already
stores (in, out) and fuses q, k and v into `c_attn` (in, 3 x out).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from pipeline.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    config_from_dict,
    dump_config,
)
from pipeline.inference.runs import load_model, save_params
from pipeline.interop.hf_config import exported_vocab, hf_config, model_config_from_hf
from pipeline.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from pipeline.model import abstract_model
from pipeline.tokenizer import GENERATION_EOS, Tokenizer, read_chat_template
from pipeline.weights import SafetensorsReader, weight_name, write_safetensors

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers' names
CHAT_TEMPLATE_DIR = "additional_chat_templates"
ADAPTER_DIR = "adapter"  # export-hf of a LoRA run: the base in DST, the adapter in DST/adapter


# Our name -> (transformers name, how to convert): "T" transposes a torch Linear weight.
_LLAMA_LAYER = {
    "attn.q.kernel": ("self_attn.q_proj.weight", "T"),
    "attn.k.kernel": ("self_attn.k_proj.weight", "T"),
    "attn.v.kernel": ("self_attn.v_proj.weight", "T"),
    "attn.o.kernel": ("self_attn.o_proj.weight", "T"),
    "mlp.gate.kernel": ("mlp.gate_proj.weight", "T"),
    "mlp.up.kernel": ("mlp.up_proj.weight", "T"),
    "mlp.down.kernel": ("mlp.down_proj.weight", "T"),
    "attn_norm.scale": ("input_layernorm.weight", ""),
    "mlp_norm.scale": ("post_attention_layernorm.weight", ""),
}
_GPT2_LAYER = {  # q, k, v are the thirds of c_attn
    "attn.o.kernel": ("attn.c_proj.weight", ""),
    "attn.o.bias": ("attn.c_proj.bias", ""),
    "mlp.up.kernel": ("mlp.c_fc.weight", ""),
    "mlp.up.bias": ("mlp.c_fc.bias", ""),
    "mlp.down.kernel": ("mlp.c_proj.weight", ""),
    "mlp.down.bias": ("mlp.c_proj.bias", ""),
    "attn_norm.scale": ("ln_1.weight", ""),
    "attn_norm.bias": ("ln_1.bias", ""),
    "mlp_norm.scale": ("ln_2.weight", ""),
    "mlp_norm.bias": ("ln_2.bias", ""),
}
# Our LoRA targets -> transformers module names (GPT-2's q, k and v share c_attn).
LLAMA_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
GPT2_MODULES = {"o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}


def _llama_layer(cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    """The per-layer names of a Llama-layout model with `cfg`'s options."""
    names = dict(_LLAMA_LAYER)
    if cfg.qkv_bias:
        for n in "qkv":
            names[f"attn.{n}.bias"] = (f"self_attn.{n}_proj.bias", "")
    if cfg.qk_norm:
        names["attn.q_norm.scale"] = ("self_attn.q_norm.weight", "")
        names["attn.k_norm.scale"] = ("self_attn.k_norm.weight", "")
    return names


def to_hf(cfg: ModelConfig, ours: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our parameters (by `weight_name`) -> transformers' state dict (the vocabulary's padding
    rows left out)."""
    used = exported_vocab(cfg)
    ours = {**ours, "embed.embedding": ours["embed.embedding"][:used]}
    if "lm_head.kernel" in ours:
        ours["lm_head.kernel"] = ours["lm_head.kernel"][:, :used]
    out = {}
    if _layout(cfg) == "gpt2":
        out["transformer.wte.weight"] = ours["embed.embedding"]
        out["transformer.wpe.weight"] = ours["pos_embed.embedding"]
        out["transformer.ln_f.weight"] = ours["final_norm.scale"]
        out["transformer.ln_f.bias"] = ours["final_norm.bias"]
        for i in range(cfg.num_layers):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            out[h + "attn.c_attn.weight"] = np.concatenate(
                [ours[b + f"attn.{n}.kernel"] for n in "qkv"], axis=1
            )
            out[h + "attn.c_attn.bias"] = np.concatenate(
                [ours[b + f"attn.{n}.bias"] for n in "qkv"]
            )
            for name, (theirs, _) in _GPT2_LAYER.items():
                out[h + theirs] = ours[b + name]
        return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}
    out["model.embed_tokens.weight"] = ours["embed.embedding"]
    out["model.norm.weight"] = ours["final_norm.scale"]
    if not cfg.tied_embeddings:
        out["lm_head.weight"] = ours["lm_head.kernel"].T
    for i in range(cfg.num_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        for name, (theirs, how) in _llama_layer(cfg).items():
            out[h + theirs] = ours[b + name].T if how == "T" else ours[b + name]
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def hf_sources(cfg: ModelConfig) -> dict[str, tuple[str, Callable]]:
    """Our parameter name -> (the transformers tensor it comes from, how to turn one into the
    other): a transpose for torch Linear weights, a slice of GPT-2's fused c_attn."""
    same, transpose = (lambda x: x), (lambda x: x.T)
    extra = cfg.vocab_size - exported_vocab(cfg)  # padding rows past the checkpoint's vocabulary

    def rows(x):  # the embedding, its padding rows zero
        return np.pad(x, ((0, extra), (0, 0))) if extra else x

    def head(x):  # lm_head.weight (V, D) -> our kernel (D, V + padding)
        return np.pad(x.T, ((0, 0), (0, extra))) if extra else x.T

    out = {}
    if _layout(cfg) == "gpt2":
        out["embed.embedding"] = ("transformer.wte.weight", rows)
        out["pos_embed.embedding"] = ("transformer.wpe.weight", same)
        out["final_norm.scale"] = ("transformer.ln_f.weight", same)
        out["final_norm.bias"] = ("transformer.ln_f.bias", same)
        D = cfg.embed_dim
        for i in range(cfg.num_layers):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            for j, n in enumerate("qkv"):
                part = slice(j * D, (j + 1) * D)
                out[b + f"attn.{n}.kernel"] = (h + "attn.c_attn.weight", lambda x, s=part: x[:, s])
                out[b + f"attn.{n}.bias"] = (h + "attn.c_attn.bias", lambda x, s=part: x[s])
            for name, (theirs, _) in _GPT2_LAYER.items():
                out[b + name] = (h + theirs, same)
        return out
    out["embed.embedding"] = ("model.embed_tokens.weight", rows)
    out["final_norm.scale"] = ("model.norm.weight", same)
    if not cfg.tied_embeddings:
        out["lm_head.kernel"] = ("lm_head.weight", head)
    for i in range(cfg.num_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        for name, (theirs, how) in _llama_layer(cfg).items():
            out[b + name] = (h + theirs, transpose if how == "T" else same)
    return out


def hf_reader(src: Path) -> SafetensorsReader:
    """The tensors of a model directory: one file, or the shards its index lists."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({src / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = [f for f in sorted(src.glob("*.safetensors")) if not f.name.startswith("adapter")]
    if not files:
        raise ConfigError(f"{src}: no *.safetensors file (a .bin checkpoint needs converting)")
    return SafetensorsReader(files, str(src))


def read_params(cfg: ModelConfig, reader: SafetensorsReader, like) -> Any:
    """Our parameters (the structure of `like`), converted tensor by tensor into their dtype:
    one model's worth of memory plus one tensor, never two copies of the model."""
    sources = hf_sources(cfg)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, leaf in paths_leaves:
        name = weight_name(path)
        if name not in sources:
            raise ConfigError(f"{reader.source}: no weight for {name}")
        hf_name, convert = sources[name]
        if hf_name not in reader and hf_name.removeprefix("transformer.") in reader:
            hf_name = hf_name.removeprefix("transformer.")  # GPT-2 saved without its prefix
        value = convert(reader.get(hf_name))  # a view: transposed or sliced
        if value.shape != leaf.shape:
            raise ConfigError(
                f"{reader.source}: {hf_name} gives {name} the shape {value.shape}, "
                f"expected {leaf.shape}"
            )
        leaves.append(np.ascontiguousarray(value, dtype=leaf.dtype))
        del value
    return jax.tree.unflatten(treedef, leaves)


def _layout(cfg: ModelConfig) -> str:
    return "gpt2" if cfg.positions == "learned" else "llama"


def import_hf(
    src: str | Path, out: str | Path, dtype: str = "float32", chat_template: str | None = None
) -> Path:
    """A transformers model directory -> a run directory (`model/`, config.yaml, tokenizer).

    `dtype` (float32 or bfloat16) is the parameters' and the computation's: each tensor is
    converted as it is read. The tokenizer keeps the model's chat templates (wherever
    transformers saves them, see `chat_templates`) or the one in the file `chat_template`.
    """

    src = model_source(src)
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{src}: no config.json (not a Hugging Face model directory)")
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype: {dtype!r} is not one of float32, bfloat16")
    hf = json.loads(config_file.read_text())
    model_cfg = model_config_from_hf(hf, str(config_file))
    model_cfg = dataclasses.replace(model_cfg, param_dtype=dtype, compute_dtype=dtype)
    tokenizer = _imported_tokenizer(src, hf, chat_template)
    _, like = nnx.split(abstract_model(model_cfg))
    params = read_params(model_cfg, hf_reader(src), like)
    return write_run(model_cfg, tokenizer, params, out, str(config_file))


# A Hub id (ORG/NAME) where no such local path exists, and the files an import reads from it.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    CHAT_TEMPLATE_FILE,
    "chat_template.json",
    f"{CHAT_TEMPLATE_DIR}/*.jinja",
    "*.safetensors",
    "model.safetensors.index.json",
]


def model_source(src: str | Path) -> Path:
    """A local model directory, or, for ORG/NAME where no such path exists, the Hub's files of
    that model (only those an import reads: configs, tokenizer, templates, safetensors) in
    huggingface_hub's cache. An unreachable Hub is one error naming the local form."""
    path = Path(src).expanduser()
    if path.exists() or not HUB_ID.fullmatch(str(src)):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(
            f"{src}: not a local directory, and downloading it needs huggingface_hub "
            "(pip install huggingface_hub)"
        ) from None
    try:
        return Path(
            snapshot_download(
                str(src), allow_patterns=HUB_FILES, endpoint=os.environ.get("HF_ENDPOINT") or None
            )
        )
    except Exception as err:  # offline, unknown repository, gated model: one line says which
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{src}: not a local directory, and the Hugging Face Hub did not give it "
            f"({type(err).__name__}: {reason}); download it elsewhere and import the directory: "
            "import-hf path/to/model --out RUN"
        ) from None


def write_run(model_cfg: ModelConfig, tokenizer, params, out: str | Path, origin: str) -> Path:
    """An imported model as a run directory: config.yaml, the tokenizer, `model/`."""
    out = Path(out).absolute()
    cfg = config_from_dict(
        {
            "model": Config(model=model_cfg).to_dict()["model"],
            "tokenizer": {"kind": "bpe", "path": str(out / "tokenizer.json")},
            "data": {"seq_len": min(DataConfig().seq_len, model_cfg.max_seq_len)},
            "run": {"name": out.name, "dir": str(out)},
        },
        origin=origin,
    )
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    tokenizer.save(out)
    save_params(params, out)
    return out


def _imported_tokenizer(src: Path, hf: dict, chat_template: str | None = None):
    """The model's own tokenizer.json, with its special tokens, chat templates and the end
    ids of its generation config."""
    from tokenizers import Tokenizer as HFTokenizer

    tokenizer_file = src / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ConfigError(f"{src}: no tokenizer.json (the fast tokenizer file is needed)")
    names = {}
    if (src / "tokenizer_config.json").is_file():
        names = json.loads((src / "tokenizer_config.json").read_text())
    hf_tok = HFTokenizer.from_file(str(tokenizer_file))
    for key in ("eos_token", "bos_token", "pad_token"):
        token_id = hf.get(f"{key}_id")
        if key not in names and isinstance(token_id, int):
            names[key] = hf_tok.id_to_token(token_id)
    imported = {k: v for k, v in names.items() if k.endswith("_token")}
    templates = read_chat_template(chat_template) if chat_template else chat_templates(src, names)
    if templates:
        imported["chat_template"] = templates
    ends = generation_eos(src)
    if ends:
        imported[GENERATION_EOS] = ends
    return Tokenizer(hf_tok, imported=imported)


def chat_templates(src: Path, tokenizer_config: dict) -> str | list | None:
    """A model directory's chat template(s) as transformers finds them: `chat_template.jinja`
    and `additional_chat_templates/NAME.jinja` (what transformers writes today), else
    `chat_template.json`'s, else `tokenizer_config.json`'s `chat_template` (a string, or a
    list of {"name", "template"}). Several come back as that list, one as its string."""
    found = {}
    jinja = src / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        found["default"] = jinja.read_text(encoding="utf-8")
    for path in sorted((src / CHAT_TEMPLATE_DIR).glob("*.jinja")):
        found[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    legacy = src / "chat_template.json"
    if not found and legacy.is_file():
        template = json.loads(legacy.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            found["default"] = template
    if not found:
        return tokenizer_config.get("chat_template") or None
    if list(found) == ["default"]:
        return found["default"]
    return [{"name": name, "template": text} for name, text in found.items()]


def generation_eos(src: Path) -> list[int]:
    """`generation_config.json`'s `eos_token_id` (an int or a list) as a list."""
    path = src / "generation_config.json"
    if not path.is_file():
        return []
    ends = json.loads(path.read_text()).get("eos_token_id")
    ends = ends if isinstance(ends, list) else [ends]
    return [int(i) for i in ends if isinstance(i, int)]


def export_hf(run_dir: str | Path, dst: str | Path) -> Path:
    """A run directory -> a transformers directory (plus a PEFT adapter for a LoRA run)."""

    run_dir, dst = Path(run_dir), Path(dst)
    cfg, model, tokenizer = load_model(run_dir, key="export-hf")
    adapter = (run_dir / ADAPTER_CONFIG).is_file()
    if adapter:  # the base alone goes to model.safetensors; the adapter beside it
        _, model, _ = load_model(cfg.init.from_run, key=f"{run_dir}/config.yaml init.from")
    save_hf(cfg.model, model, tokenizer, dst)
    if adapter:
        from safetensors.numpy import load_file

        peft_config = json.loads((run_dir / ADAPTER_CONFIG).read_text())
        tensors, peft_config = adapter_to_hf(
            cfg.model, load_file(str(run_dir / ADAPTER_WEIGHTS)), peft_config, str(dst.absolute())
        )
        (dst / ADAPTER_DIR).mkdir(exist_ok=True)
        _save_readable(tensors, dst / ADAPTER_DIR / ADAPTER_WEIGHTS)
        (dst / ADAPTER_DIR / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2))
    return dst


def save_hf(cfg: ModelConfig, model, tokenizer, dst: Path) -> Path:
    """A model and its tokenizer as a transformers directory (config, weights, tokenizer)."""
    ours = {
        weight_name(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
    }
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(hf_config(cfg, tokenizer), indent=2))
    (dst / "generation_config.json").write_text(json.dumps(generation_config(tokenizer), indent=2))
    _save_readable(to_hf(cfg, ours), dst / "model.safetensors")
    tokenizer.hf.save(str(dst / "tokenizer.json"))
    special = {
        "eos_token": tokenizer.hf.id_to_token(tokenizer.eos_id),
        "bos_token": tokenizer.hf.id_to_token(tokenizer.bos_id)
        if tokenizer.bos_id is not None
        else None,
        "pad_token": tokenizer.hf.id_to_token(tokenizer.pad_id),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.max_seq_len,
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(special, indent=2))
    write_chat_templates((tokenizer.imported or {}).get("chat_template"), dst)
    return dst


def write_chat_templates(templates, dst: Path) -> None:
    """Chat templates where transformers writes them: the one (or the `default`) in
    `chat_template.jinja`, the others in `additional_chat_templates/NAME.jinja`."""
    if isinstance(templates, str):
        templates = [{"name": "default", "template": templates}]
    for entry in templates or []:
        name, text = entry["name"], entry["template"]
        if name == "default":
            (dst / CHAT_TEMPLATE_FILE).write_text(text, encoding="utf-8")
            continue
        if Path(name).name != name or name.startswith("."):
            raise ValueError(f"a chat template's name is not a file name: {name!r}")
        (dst / CHAT_TEMPLATE_DIR).mkdir(exist_ok=True)
        (dst / CHAT_TEMPLATE_DIR / f"{name}.jinja").write_text(text, encoding="utf-8")


def generation_config(tokenizer) -> dict:
    """`generation_config.json`: sampling on, so a client's temperature and top_p take effect
    (without it transformers decodes greedily whatever the request asks); nothing truncated."""
    ends = [tokenizer.eos_id, *sorted(tokenizer.stop_ids - {tokenizer.eos_id})]
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": ends[0] if len(ends) == 1 else ends,  # several: a list, as Llama 3's
        "pad_token_id": tokenizer.pad_id,
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
    }


def _save_readable(tensors: dict, path: Path) -> None:
    write_safetensors(path, tensors.items())


def adapter_to_hf(cfg: ModelConfig, ours: dict, peft_config: dict, base: str):
    """Our PEFT-layout adapter (module names of this package) -> transformers' module names.

    Llama's projections map one to one. GPT-2's q, k and v share `c_attn`, so their adapters
    become one of rank 3r there: A stacks the three A's, B is block-diagonal (zero for a
    projection without an adapter), and the alpha is scaled so alpha / rank is unchanged.
    """
    r, alpha = peft_config["r"], peft_config["lora_alpha"]
    targets = peft_config["target_modules"]
    out, modules, rank_pattern, alpha_pattern = {}, [], {}, {}
    gpt2 = _layout(cfg) == "gpt2"
    prefix = "base_model.model.transformer.h" if gpt2 else "base_model.model.model.layers"
    for i in range(cfg.num_layers):
        ours_prefix = f"base_model.model.blocks.{i}"

        def pair(target: str, ours_prefix=ours_prefix):
            scope = "mlp" if target in ("gate", "up", "down") else "attn"
            key = f"{ours_prefix}.{scope}.{target}"
            return ours[f"{key}.lora_A.weight"], ours[f"{key}.lora_B.weight"]

        names = GPT2_MODULES if gpt2 else LLAMA_MODULES
        for target in targets:
            if target in names:
                module = f"{prefix}.{i}.{names[target]}"
                a, b = pair(target)
                out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = a, b
                modules.append(module.removeprefix("base_model.model."))
        if gpt2 and any(t in targets for t in "qkv"):
            D = cfg.embed_dim
            a_rows, b_full = [], np.zeros((3 * D, 3 * r), np.float32)
            for j, n in enumerate("qkv"):
                a, b = pair(n) if n in targets else (np.zeros((r, D), np.float32), None)
                a_rows.append(a)
                if b is not None:
                    b_full[j * D : (j + 1) * D, j * r : (j + 1) * r] = b
            module = f"{prefix}.{i}.attn.c_attn"
            out[f"{module}.lora_A.weight"] = np.concatenate(a_rows, axis=0)
            out[f"{module}.lora_B.weight"] = b_full
            name = module.removeprefix("base_model.model.")
            modules.append(name)
            rank_pattern[name], alpha_pattern[name] = 3 * r, 3 * alpha
        if "lm_head" in targets and not cfg.tied_embeddings:
            a, b = (
                ours["base_model.model.lm_head.lora_A.weight"],
                ours["base_model.model.lm_head.lora_B.weight"],
            )
            out["base_model.model.lm_head.lora_A.weight"] = a
            out["base_model.model.lm_head.lora_B.weight"] = b[: exported_vocab(cfg)]
            if "lm_head" not in modules:
                modules.append("lm_head")
    config = {
        **peft_config,
        "target_modules": modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": gpt2,
        "base_model_name_or_path": base,
    }
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}, config
