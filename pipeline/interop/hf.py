"""Hugging Face interop: GPT-2 and Llama checkpoints in and out, and PEFT adapters out.

`import_hf(SRC, OUT)` reads a local model directory (`config.json`, `*.safetensors`,
`tokenizer.json`) with the `safetensors` library (no torch) into a run directory that every
stage accepts. `export_hf(RUN, DST)` writes `config.json`, `model.safetensors` and the tokenizer
back in transformers' layout; for a LoRA run the base goes there and the adapter
(`adapter_model.safetensors`, `adapter_config.json` with the module names transformers uses) to
`DST/adapter`, so `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DST),
DST/adapter)` rebuilds the fine-tuned model.

Layouts: torch `nn.Linear` stores (out, in), our kernels are (in, out); GPT-2's `Conv1D` already
stores (in, out) and fuses q, k and v into `c_attn` (in, 3 x out).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from pipeline.config import Config, ConfigError, ModelConfig, config_from_dict
from pipeline.inference.export import weight_name

SUPPORTED = ("gpt2", "llama")
ADAPTER_DIR = "adapter"  # export-hf of a LoRA run: the base in DST, the adapter in DST/adapter


# --- configs --------------------------------------------------------------------------------


def model_config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Our model config for a transformers `config.json`; unsupported options name the field."""

    def unsupported(field: str, value, why: str = "") -> ConfigError:
        return ConfigError(f"{source}: {field}={value!r} is not supported{why}")

    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise unsupported("model_type", kind, f" (supported: {', '.join(SUPPORTED)})")
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise unsupported("activation_function", act, " (GPT-2's tanh GELU only)")
        for field, ok in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True)):
            if hf.get(field, ok) != ok:
                raise unsupported(field, hf[field])
        if hf.get("tie_word_embeddings", True) is not True:
            raise unsupported("tie_word_embeddings", False)
        D = hf["n_embd"]
        return ModelConfig(
            family="gpt2",
            vocab_size=hf["vocab_size"],
            num_layers=hf["n_layer"],
            embed_dim=D,
            num_heads=hf["n_head"],
            mlp_dim=hf.get("n_inner") or 4 * D,
            max_seq_len=hf["n_positions"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise unsupported("hidden_act", hf["hidden_act"], " (SwiGLU with SiLU only)")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
        raise unsupported(f"{field}.rope_type", rope_type, " (plain RoPE only)")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise unsupported(field, True)
    D, N = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, D // N):
        raise unsupported("head_dim", hf["head_dim"], f" (must be hidden_size / heads = {D // N})")
    return ModelConfig(
        family="llama",
        vocab_size=hf["vocab_size"],
        num_layers=hf["num_hidden_layers"],
        embed_dim=D,
        num_heads=N,
        num_kv_heads=hf.get("num_key_value_heads") or N,
        mlp_dim=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def hf_config(cfg: ModelConfig, tokenizer) -> dict:
    """transformers' `config.json` for our model config (GPT-2 or Llama layout)."""
    gpt2 = (
        cfg.positions == "learned"
        and cfg.norm == "layernorm"
        and cfg.mlp == "gelu"
        and cfg.use_bias
        and cfg.tied_embeddings
        and cfg.num_kv_heads == cfg.num_heads
    )
    llama = cfg.positions == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu"
    if not (gpt2 or llama) or (llama and cfg.use_bias):
        raise ConfigError(
            "export-hf: this model's options match neither GPT-2 (learned positions, LayerNorm, "
            "GELU, biases, tied embeddings) nor Llama (RoPE, RMSNorm, SwiGLU, no biases)"
        )
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    if gpt2:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len,
            "n_embd": cfg.embed_dim,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "n_inner": cfg.mlp_dim,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
            **ids,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": bool(cfg.tied_embeddings),
        "torch_dtype": "float32",
        **ids,
    }


# --- weights --------------------------------------------------------------------------------

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


def to_hf(cfg: ModelConfig, ours: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our parameters (by `weight_name`) -> transformers' state dict."""
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
        for name, (theirs, how) in _LLAMA_LAYER.items():
            out[h + theirs] = ours[b + name].T if how == "T" else ours[b + name]
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def from_hf(cfg: ModelConfig, theirs: dict[str, np.ndarray], source: str) -> dict:
    """transformers' state dict -> our parameters (by `weight_name`); missing names are named."""

    def get(name: str, *alternatives: str) -> np.ndarray:
        for key in (name, *alternatives):
            if key in theirs:
                return np.asarray(theirs[key], np.float32)
        raise ConfigError(f"{source}: tensor {name!r} is missing")

    ours = {}
    if _layout(cfg) == "gpt2":
        t = lambda n: get(f"transformer.{n}", n)  # noqa: E731  (saved with or without prefix)
        ours["embed.embedding"] = t("wte.weight")
        ours["pos_embed.embedding"] = t("wpe.weight")
        ours["final_norm.scale"], ours["final_norm.bias"] = t("ln_f.weight"), t("ln_f.bias")
        D = cfg.embed_dim
        for i in range(cfg.num_layers):
            b, h = f"blocks.{i}.", f"h.{i}."
            w, bias = t(h + "attn.c_attn.weight"), t(h + "attn.c_attn.bias")
            for j, n in enumerate("qkv"):
                ours[b + f"attn.{n}.kernel"] = w[:, j * D : (j + 1) * D]
                ours[b + f"attn.{n}.bias"] = bias[j * D : (j + 1) * D]
            for name, (hf_name, _) in _GPT2_LAYER.items():
                ours[b + name] = t(h + hf_name)
        return ours
    ours["embed.embedding"] = get("model.embed_tokens.weight")
    ours["final_norm.scale"] = get("model.norm.weight")
    if not cfg.tied_embeddings:
        ours["lm_head.kernel"] = get("lm_head.weight").T
    for i in range(cfg.num_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        for name, (hf_name, how) in _LLAMA_LAYER.items():
            value = get(h + hf_name)
            ours[b + name] = value.T if how == "T" else value
    return ours


def _layout(cfg: ModelConfig) -> str:
    return "gpt2" if cfg.positions == "learned" else "llama"


def read_safetensors(src: Path) -> dict[str, np.ndarray]:
    """Every tensor of a model directory (one file or shards), with clear errors."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    files = sorted(src.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("adapter_")]
    if not files:
        raise ConfigError(f"{src}: no *.safetensors file (a .bin checkpoint needs converting)")
    tensors = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as err:
            raise ConfigError(f"{file}: not a readable safetensors file ({err})") from None
    return tensors


# --- whole directories ----------------------------------------------------------------------


def import_hf(src: str | Path, out: str | Path) -> Path:
    """A transformers model directory -> a run directory (`model/`, config.yaml, tokenizer)."""
    from tokenizers import Tokenizer as HFTokenizer

    from pipeline.inference.runs import save_model
    from pipeline.model import create_model
    from pipeline.tokenizer import Tokenizer

    src = Path(src)
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{src}: no config.json (not a Hugging Face model directory)")
    hf = json.loads(config_file.read_text())
    model_cfg = model_config_from_hf(hf, str(config_file))
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
    imported = {k: v for k, v in names.items() if k.endswith("_token") or k == "chat_template"}
    tokenizer = Tokenizer(hf_tok, imported=imported)
    model = create_model(model_cfg)
    ours = from_hf(model_cfg, read_safetensors(src), str(src))
    _load_named(model, ours, str(src))
    cfg = config_from_dict(
        {
            "model": {k: v for k, v in Config(model=model_cfg).to_dict()["model"].items()},
            "tokenizer": {"kind": "bpe", "path": str(Path(out).absolute() / "tokenizer.json")},
            "run": {"name": Path(out).name, "dir": str(out)},
        },
        origin=str(config_file),
    )
    return save_model(cfg, model, tokenizer, out)


def _load_named(model, ours: dict[str, np.ndarray], source: str) -> None:
    state = nnx.state(model)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    leaves = []
    for path, leaf in paths_leaves:
        name = weight_name(path)
        value = ours.get(name)
        if value is None:
            raise ConfigError(f"{source}: no weight for {name}")
        if value.shape != leaf.shape:
            raise ConfigError(f"{source}: {name} has shape {value.shape}, expected {leaf.shape}")
        leaves.append(value.astype(leaf.dtype))
    nnx.update(model, jax.tree.unflatten(treedef, leaves))


def export_hf(run_dir: str | Path, dst: str | Path) -> Path:
    """A run directory -> a transformers directory (plus a PEFT adapter for a LoRA run)."""
    from safetensors.numpy import save_file

    from pipeline.inference.runs import load_model
    from pipeline.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    run_dir, dst = Path(run_dir), Path(dst)
    cfg, model, tokenizer = load_model(run_dir, key="export-hf")
    adapter = (run_dir / ADAPTER_CONFIG).is_file()
    if adapter:  # the base alone goes to model.safetensors; the adapter beside it
        _, model, _ = load_model(cfg.init.from_run, key=f"{run_dir}/config.yaml init.from")
    ours = {
        weight_name(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
    }
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(hf_config(cfg.model, tokenizer), indent=2))
    save_file(to_hf(cfg.model, ours), str(dst / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.hf.save(str(dst / "tokenizer.json"))
    special = {
        "eos_token": tokenizer.hf.id_to_token(tokenizer.eos_id),
        "bos_token": tokenizer.hf.id_to_token(tokenizer.bos_id)
        if tokenizer.bos_id is not None
        else None,
        "pad_token": tokenizer.hf.id_to_token(tokenizer.pad_id),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.model.max_seq_len,
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(special, indent=2))
    if adapter:
        from safetensors.numpy import load_file

        peft_config = json.loads((run_dir / ADAPTER_CONFIG).read_text())
        tensors, peft_config = adapter_to_hf(
            cfg.model, load_file(str(run_dir / ADAPTER_WEIGHTS)), peft_config, str(dst.absolute())
        )
        (dst / ADAPTER_DIR).mkdir(exist_ok=True)
        save_file(tensors, str(dst / ADAPTER_DIR / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (dst / ADAPTER_DIR / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2))
    return dst


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
            out["base_model.model.lm_head.lora_B.weight"] = b
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
