"""transformers' `config.json` <-> our `ModelConfig`, for every supported family.

`model_config_from_hf` maps a checkpoint's config onto the options of the one Transformer
(RoPE scaling, biases, q/k norms, head dim, sliding window, Gemma's norm and MLP); anything it
cannot represent is one error line naming the field. `hf_config` writes the config that
transformers' class for the family reads back.
"""

from __future__ import annotations

from pipeline.config import ConfigError, ModelConfig

SUPPORTED = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma")
ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma": "GemmaForCausalLM",
}


class _Unsupported:
    """Builds the one error line that names an unsupported field of a config.json."""

    def __init__(self, source: str):
        self.source = source

    def __call__(self, field: str, value, why: str = "") -> ConfigError:
        return ConfigError(f"{self.source}: {field}={value!r} is not supported{why}")


VOCAB_MULTIPLE = 128  # an imported vocabulary's embedding rows: padded to a multiple of this


def _vocab_fields(hf: dict) -> dict:
    """vocab_size padded to a multiple of VOCAB_MULTIPLE (GPT-2's 50,257 -> 50,304; Llama 3's,
    Qwen's, SmolLM's and Gemma's already are one), vocab_used the checkpoint's own."""
    used = hf["vocab_size"]
    padded = -(-used // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return {"vocab_size": padded, "vocab_used": used if padded != used else None}


def exported_vocab(cfg: ModelConfig) -> int:
    """The rows an export writes: the real vocabulary, without the padding."""
    return cfg.vocab_used or cfg.vocab_size


def model_config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Our model config for a transformers `config.json`; unsupported options name the field."""
    unsupported = _Unsupported(source)
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise unsupported("model_type", kind, f" (supported: {', '.join(SUPPORTED)})")
    if kind == "gpt2":
        return _gpt2_config(hf, unsupported)
    return _llama_like_config(hf, kind, unsupported)


def _gpt2_config(hf: dict, unsupported: _Unsupported) -> ModelConfig:
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
        **_vocab_fields(hf),
        num_layers=hf["n_layer"],
        embed_dim=D,
        num_heads=hf["n_head"],
        mlp_dim=hf.get("n_inner") or 4 * D,
        max_seq_len=hf["n_positions"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def _llama_like_config(hf: dict, kind: str, unsupported: _Unsupported) -> ModelConfig:
    """Llama and its relatives: one layout, a few options each."""
    act_field = "hidden_activation" if hf.get("hidden_activation") else "hidden_act"
    act = hf.get(act_field, "gelu_pytorch_tanh" if kind == "gemma" else "silu")
    wanted = ("gelu_pytorch_tanh", "gelu_fast", "gelu_new") if kind == "gemma" else ("silu",)
    if act not in wanted:
        raise unsupported(act_field, act, f" ({kind}: {' or '.join(wanted)})")
    if hf.get("mlp_bias"):
        raise unsupported("mlp_bias", True)
    if hf.get("attention_bias") and kind != "qwen2":
        raise unsupported("attention_bias", True, " (biases on q, k, v and o)")
    for field in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(field):
            raise unsupported(field, hf[field], " (Gemma 2/3 soft-capping)")
    D, N = hf["hidden_size"], hf["num_attention_heads"]
    return ModelConfig(
        family=kind,
        **_vocab_fields(hf),
        num_layers=hf["num_hidden_layers"],
        embed_dim=D,
        num_heads=N,
        num_kv_heads=hf.get("num_key_value_heads") or N,
        head_dim=hf.get("head_dim") or D // N,
        mlp_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tied_embeddings=bool(hf.get("tie_word_embeddings", kind == "gemma")),
        **{"max_seq_len": hf["max_position_embeddings"], **_rope_fields(hf, unsupported)},
        **_window_fields(hf, kind, unsupported),
    )


def _rope_fields(hf: dict, unsupported: _Unsupported) -> dict:
    """RoPE's base and scaling, from `rope_parameters` (transformers 5) or `rope_scaling`."""
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(field) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    out = {"rope_theta": float(hf.get("rope_theta") or rope.get("rope_theta", 10000.0))}
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise unsupported(f"{field}.partial_rotary_factor", rope["partial_rotary_factor"])
    if rope_type == "default":
        return out
    if rope_type not in ROPE_TYPES:
        raise unsupported(f"{field}.rope_type", rope_type, f" (supported: {', '.join(ROPE_TYPES)})")
    original = rope.get("original_max_position_embeddings")
    factor = rope.get("factor")
    if factor is None and rope_type == "yarn" and original:
        factor = hf["max_position_embeddings"] / original
    out.update(rope_scaling=rope_type, rope_factor=float(factor))
    if rope_type == "dynamic":  # max_position_embeddings is the context it extends
        context = hf["max_position_embeddings"]
        out.update(rope_original_max_len=context, max_seq_len=int(context * factor))
    elif rope_type == "llama3":
        out.update(
            rope_original_max_len=int(original),
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
        )
    elif rope_type == "yarn":
        out.update(
            rope_original_max_len=int(original or hf["max_position_embeddings"]),
            rope_beta_fast=float(rope.get("beta_fast") or 32.0),
            rope_beta_slow=float(rope.get("beta_slow") or 1.0),
            rope_attention_factor=rope.get("attention_factor"),
            rope_mscale=rope.get("mscale"),
            rope_mscale_all_dim=rope.get("mscale_all_dim"),
            rope_truncate=bool(rope.get("truncate", True)),
        )
    return out


def _window_fields(hf: dict, kind: str, unsupported: _Unsupported) -> dict:
    """Sliding-window attention: Mistral's on every layer; Qwen2/3's (when `use_sliding_window`)
    on the layers from `max_window_layers` on, as their `layer_types` say."""
    window = hf.get("sliding_window")
    if kind in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
        window = None
    if kind in ("llama", "gemma") or window is None:
        return {}
    L = hf["num_hidden_layers"]
    start = hf.get("max_window_layers", 0) if kind in ("qwen2", "qwen3") else 0
    types = hf.get("layer_types")
    if types is not None:
        sliding = [i for i, name in enumerate(types) if name == "sliding_attention"]
        start = sliding[0] if sliding else L
        if sliding != list(range(start, L)):
            raise unsupported("layer_types", types, " (sliding layers must be the last ones)")
    return {"sliding_window": int(window), "sliding_window_from": int(start)}


def hf_config(cfg: ModelConfig, tokenizer) -> dict:
    """transformers' `config.json` for our model config (GPT-2, or Llama and its relatives)."""
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    if cfg.family == "gpt2" and _is_gpt2(cfg):
        return _gpt2_hf_config(cfg, ids)
    if cfg.family == "gpt2" or not _matches_family(cfg):
        raise ConfigError(
            f"export-hf: this model's options do not match its family {cfg.family!r} as "
            "transformers builds it (gpt2: learned positions, LayerNorm, GELU, biases, tied "
            "embeddings; llama and its relatives: RoPE, their norm and MLP, no other biases)"
        )
    out = {
        "architectures": [ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": exported_vocab(cfg),
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.rope_original_max_len
        if cfg.rope_scaling == "dynamic"
        else cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": _hf_rope(cfg),
        "hidden_act": "gelu_pytorch_tanh" if cfg.family == "gemma" else "silu",
        "attention_bias": bool(cfg.qkv_bias),
        "tie_word_embeddings": bool(cfg.tied_embeddings),
        "torch_dtype": "float32",
        **ids,
    }
    if cfg.family != "qwen2":
        out["attention_bias"] = False
    if cfg.family in ("llama", "mistral", "qwen2", "qwen3"):
        out["mlp_bias"] = False
    if cfg.sliding_window is not None:
        out["sliding_window"] = cfg.sliding_window
        if cfg.family in ("qwen2", "qwen3"):
            out.update(use_sliding_window=True, max_window_layers=cfg.sliding_window_from)
    elif cfg.family == "mistral":
        out["sliding_window"] = None
    return out


def _gpt2_hf_config(cfg: ModelConfig, ids: dict) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": exported_vocab(cfg),
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


def _is_gpt2(cfg: ModelConfig) -> bool:
    return (
        cfg.positions == "learned"
        and cfg.norm == "layernorm"
        and cfg.mlp == "gelu"
        and cfg.use_bias
        and cfg.qkv_bias
        and cfg.tied_embeddings
        and cfg.num_kv_heads == cfg.num_heads
        and cfg.head_dim * cfg.num_heads == cfg.embed_dim
    )


def _matches_family(cfg: ModelConfig) -> bool:
    """Whether transformers' class for `cfg.family` computes what our options say."""
    gemma = cfg.family == "gemma"
    return (
        cfg.positions == "rope"
        and cfg.norm == ("gemma_rmsnorm" if gemma else "rmsnorm")
        and cfg.mlp == ("geglu" if gemma else "swiglu")
        and not cfg.use_bias
        and bool(cfg.qkv_bias) == (cfg.family == "qwen2")
        and bool(cfg.qk_norm) == (cfg.family == "qwen3")
        and bool(cfg.embed_scale) == gemma
        and (cfg.sliding_window is None or cfg.family in ("mistral", "qwen2", "qwen3"))
        and (cfg.sliding_window_from == 0 or cfg.family in ("qwen2", "qwen3"))
    )


def _hf_rope(cfg: ModelConfig) -> dict:
    out = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling}
    out["rope_theta"] = cfg.rope_theta
    if cfg.rope_scaling == "none":
        return out
    out["factor"] = cfg.rope_factor
    original = cfg.rope_original_max_len or cfg.max_seq_len
    if cfg.rope_scaling == "llama3":
        out.update(
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=original,
        )
    elif cfg.rope_scaling == "yarn":
        out.update(
            original_max_position_embeddings=original,
            beta_fast=cfg.rope_beta_fast,
            beta_slow=cfg.rope_beta_slow,
            truncate=cfg.rope_truncate,
        )
        for key, value in (
            ("attention_factor", cfg.rope_attention_factor),
            ("mscale", cfg.rope_mscale),
            ("mscale_all_dim", cfg.rope_mscale_all_dim),
        ):
            if value is not None:
                out[key] = value
    return out
