"""Typed, frozen experiment configs loaded from YAML with `base:` inheritance.

A config file is a mapping of sections (`model`, `tokenizer`, `data`, `train`, `optimizer`,
`run`); `base: other.yaml` (relative to the file) names a file it extends. Command-line
overrides are dotted (`model.num_layers=4 optimizer.lr=1e-3`). Every key is checked against
the dataclasses below; a mistake raises one `ConfigError` line naming the key, where it came
from and the closest valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

COMMAND_LINE = "command line"
LORA_TARGETS = {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}
DTYPES = Literal["float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message is the whole story."""


FAMILIES = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma")


@dataclass(frozen=True)
class ModelConfig:
    """The decoder-only Transformer; `family` fills in the architecture options left unset.

    gpt2: learned positions, LayerNorm, GELU, biases, tied embeddings. llama: RoPE, RMSNorm,
    SwiGLU, no biases, an untied head. qwen2: llama with q/k/v biases. qwen3: llama with a
    per-head RMSNorm of q and k. mistral: llama (with `sliding_window` when it has one). gemma:
    RoPE, RMSNorm scaled by (1 + w), GeGLU, embeddings scaled by sqrt(width), tied embeddings.
    """

    family: Literal["gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma"] = "gpt2"
    vocab_size: int = 320
    # The tokens the vocabulary really has, where vocab_size pads the embedding past them (to a
    # multiple of 128, as matrix units and TPU lanes want): the padded rows' logits are the
    # lowest value, never sampled nor counted in a softmax; exports drop them. None: every row.
    vocab_used: int | None = None
    num_layers: int = 2
    embed_dim: int = 32
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: equal to num_heads (no grouped-query attention)
    head_dim: int | None = None  # None: embed_dim / num_heads (Qwen3 and Gemma set their own)
    mlp_dim: int | None = None  # None: 4*embed_dim (gpt2) or ~8/3*embed_dim rounded to 64
    max_seq_len: int = 64
    positions: Literal["learned", "rope"] | None = None
    norm: Literal["layernorm", "rmsnorm", "gemma_rmsnorm"] | None = None
    mlp: Literal["gelu", "swiglu", "geglu"] | None = None
    use_bias: bool | None = None
    qkv_bias: bool | None = None  # biases on q, k and v alone (Qwen2); None: use_bias
    qk_norm: bool | None = None  # RMSNorm of each head's q and k before RoPE (Qwen3)
    embed_scale: bool | None = None  # embeddings multiplied by sqrt(embed_dim) (Gemma)
    tied_embeddings: bool | None = None
    rope_theta: float = 10000.0
    # Context extension of RoPE, as transformers' rope_scaling / rope_parameters: linear,
    # dynamic (NTK), yarn or llama3 (Llama 3.1+), with their parameters.
    rope_scaling: Literal["none", "linear", "dynamic", "yarn", "llama3"] = "none"
    rope_factor: float = 1.0
    rope_original_max_len: int | None = (
        None  # llama3, yarn: pre-training context; None: max_seq_len
    )
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_attention_factor: float | None = None  # yarn; None: from the factor (and mscale)
    rope_mscale: float | None = None  # yarn
    rope_mscale_all_dim: float | None = None  # yarn
    rope_truncate: bool = True  # yarn: round the correction range to whole dimensions
    sliding_window: int | None = None  # a query sees the last `sliding_window` positions
    sliding_window_from: int = 0  # the first layer with the window (Qwen2's max_window_layers)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    param_dtype: DTYPES = "float32"
    compute_dtype: DTYPES = "float32"
    remat: Literal["none", "block", "dots"] = "none"  # rematerialisation; never changes parameters
    # Training cross-entropy this many positions at a time (0: all at once); never changes results
    # beyond rounding. Saves the (batch, sequence, vocabulary) float32 logits and their gradient.
    loss_chunk: int = 0
    # The training cross-entropy's logits: float32 (made and kept in float32), or compute (kept
    # in the compute dtype, the log-sum-exp and the gradient's softmax still taken in float32
    # inside the same pass): half the memory and traffic of the (batch, sequence, vocabulary)
    # logits in bfloat16 runs; the same as float32 where the compute dtype is float32.
    loss_dtype: Literal["float32", "compute"] = "float32"
    # Training attention: auto (einsum on CPU, cuDNN flash attention on NVIDIA GPUs in bfloat16 or
    # float16, Pallas's splash attention on TPUs, XLA's jax.nn.dot_product_attention otherwise), or
    # one of them by name. Never changes results beyond rounding; decoding with a KV cache always
    # reads the cache in place (einsum).
    attention: Literal["auto", "einsum", "xla", "cudnn", "splash"] = "auto"

    # The options the family filled in, with the values it gave them (not a config key). A copy
    # made by `dataclasses.replace` receives it, so an option still holding its filled value is
    # filled again for the copy's family and sizes: replace(cfg, family="llama") gets llama's
    # options, replace(cfg, embed_dim=64) its head and MLP widths. Values set by hand are kept.
    filled: dict = field(default_factory=dict, compare=False, repr=False, metadata={"internal": 1})

    def __post_init__(self):
        inherited = {k: v for k, v in self.filled.items() if getattr(self, k) == v}
        for name in inherited:
            object.__setattr__(self, name, None)
        defaults = _family_defaults(self)
        filled = {}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
                filled[name] = value
        object.__setattr__(self, "filled", filled)

    def uses_window(self, layer: int) -> bool:
        """Whether layer `layer` attends within the sliding window."""
        return self.sliding_window is not None and layer >= self.sliding_window_from


def _family_defaults(m: ModelConfig) -> dict[str, Any]:
    """The architecture options `m.family` gives those left unset (None)."""
    gpt2, gemma = m.family == "gpt2", m.family == "gemma"
    return {
        "num_kv_heads": m.num_heads,
        "head_dim": m.embed_dim // max(m.num_heads, 1),
        "mlp_dim": 4 * m.embed_dim if gpt2 else _round_up(int(8 * m.embed_dim / 3), 64),
        "positions": "learned" if gpt2 else "rope",
        "norm": "layernorm" if gpt2 else "gemma_rmsnorm" if gemma else "rmsnorm",
        "mlp": "gelu" if gpt2 else "geglu" if gemma else "swiglu",
        "use_bias": gpt2,
        "qkv_bias": m.family == "qwen2" or (m.use_bias if m.use_bias is not None else gpt2),
        "qk_norm": m.family == "qwen3",
        "embed_scale": gemma,
        "tied_embeddings": gpt2 or gemma,
    }


@dataclass(frozen=True)
class TokenizerConfig:
    """`byte`: an id per byte plus specials; `bpe`: trained on the corpus or loaded from `path`."""

    kind: Literal["byte", "bpe"] = "byte"
    vocab_size: int | None = None  # BPE target size; None: model.vocab_size
    path: str | None = None  # an existing tokenizer.json (or a directory holding one)
    train_max_bytes: int = 50_000_000  # BPE trains on at most this many bytes of the train split


@dataclass(frozen=True)
class MixtureSource:
    """One source of a `data.mixture`: what `data.source` takes, and its share of the rows."""

    source: str
    weight: float = 1.0
    text_field: str = "text"


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is cut into training windows."""

    # "stdlib", a text file, a folder, a glob, a .jsonl(.gz/.zst) file, a Parquet or Arrow file
    # or folder of them (a datasets.save_to_disk folder too)
    source: str = "stdlib"
    text_field: str = "text"  # the field read from each JSONL line
    max_docs: int | None = None  # keep only the first N documents (a slice for quick runs)
    seq_len: int = 64
    val_fraction: float = 0.05
    cache_dir: str = "data_cache"
    seed: int = 0  # the document split; the sampler uses train.seed
    # pre-training windows span documents (each ends with EOS): true masks attention across
    # them, restarts positions and never predicts a document's first token from the one before
    document_masking: bool = False
    # pre-training rows: "concat" (windows of the documents end to end, as above) or
    # "best_fit" (whole documents packed into rows by best-fit decreasing, padded; segment ids
    # as document_masking; documents longer than a row are cut into row-sized pieces)
    packing: Literal["concat", "best_fit"] = "concat"
    # the token store (`pipeline tokenize`): shards of about this much text, tokenized by this
    # many worker processes (0: one per core)
    shard_mb: float = 16.0
    tokenize_workers: int = 0
    # several sources, each with its own token store and validation split, mixed row by row
    # with these weights: [{source: ..., weight: 0.7}, {source: ..., weight: 0.3}]; replaces
    # data.source (evaluation reports a loss per source)
    mixture: tuple[MixtureSource, ...] = ()


@dataclass(frozen=True)
class TrainConfig:
    """The training loop."""

    steps: int = 100
    batch_size: int = 8  # global, across every device and process
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    eval_at_start: bool = False  # also evaluate before the first step (fine-tuning: "before")
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    grad_accum: int = 1  # micro-batches per step, accumulated inside the step
    parallelism: Literal["pmap", "mesh"] = "pmap"
    # mesh: device-mesh axis sizes (one may be -1: the rest of the devices)
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None: measured at start
    prefetch: int = 2  # batches prepared ahead on a background thread
    num_devices: int | None = None  # local devices to use; None: all
    stop_at: int | None = (
        None  # checkpoint and stop at this step (resume later with the same command)
    )
    # "METRIC >= VALUE" or "METRIC <= VALUE" of the evaluation's metrics (eval_loss,
    # eval_pass_rate, ...): the run finishes at the first evaluation that meets it
    stop_when: str | None = None


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer (AdamW by default), its learning-rate schedule and global-norm clipping."""

    # muon: Muon for the blocks' weight matrices, AdamW for embeddings, norms, biases and the
    # head; lion, adafactor: optax's, for every parameter
    name: Literal["adamw", "muon", "lion", "adafactor"] = "adamw"
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    # wsd: warmup, stable at lr, then decay over the last decay_fraction of train.steps
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    decay_fraction: float = 0.2  # wsd
    decay_shape: Literal["linear", "1-sqrt"] = "linear"  # wsd
    warmup_steps: int = 10
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    decay_embeddings: bool = False  # norms and biases never decay
    muon_beta: float = 0.95  # Muon's momentum (Nesterov)
    # Muon's orthogonalised update scaled to this RMS (x sqrt(max(fan_in, fan_out))), about
    # AdamW's, so one lr and weight decay serve both groups (as Moonlight does)
    muon_rms: float = 0.2


@dataclass(frozen=True)
class RunConfig:
    """Where the run directory lives."""

    name: str = "default"
    dir: str | None = None  # None: runs/<name>
    # The stage this config runs (pretrain, finetune, dpo, grpo, distill): what `sweep` runs
    # without --stage. A stage's command sets it, so a run's config.yaml records its stage.
    stage: str | None = None
    progress: bool = True  # console progress bar
    # Multi-process runs: set here or with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    # JAX_PROCESS_ID (or a cluster JAX detects by itself, with distributed: true).
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    # A directory for compiled programs shared by every run (JAX's persistent compilation
    # cache): a second start skips compilation. None: off.
    compilation_cache: str | None = None
    # Where metrics go besides metrics.jsonl (always written): tensorboard, wandb (Weights &
    # Biases; the `trackers` extra), mlflow (MLflow; the same extra)
    trackers: tuple[str, ...] = ("jsonl", "tensorboard")
    project: str = "pipeline"  # the W&B project, the MLflow experiment
    entity: str | None = None  # the W&B team or user; None: the account's default
    tags: tuple[str, ...] = ()
    group: str | None = None  # W&B group / MLflow parent run (a sweep sets its name)
    wandb_mode: str | None = None  # online, offline, disabled; None: WANDB_MODE or wandb's
    mlflow_uri: str | None = None  # None: a local file store, ./mlruns

    def __post_init__(self):
        if self.dir is None:
            object.__setattr__(self, "dir", f"runs/{self.name}")


@dataclass(frozen=True)
class InitConfig:
    """Where a stage's starting weights come from."""

    from_run: str | None = field(default=None, metadata={"key": "from"})  # a run directory


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters: W x + (alpha / rank) * B A x, with B = 0 at the start."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    base_quantize: Literal["none", "int8"] = "none"  # QLoRA: the frozen base kept in int8


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning data and method."""

    method: Literal["lora", "full"] = "lora"
    data: str = "stdlib-docstrings"  # the embedded instruction set, or a .jsonl file
    packing: bool = False  # several examples per row instead of one padded example
    val_fraction: float = 0.1
    max_examples: int | None = None


@dataclass(frozen=True)
class DpoConfig:
    """`pipeline dpo`: preference tuning of init.from (LoRA or full, as finetune.method says)."""

    # the embedded pairs (a function's real docstring line preferred over another function's;
    # stdlib-docstring-shuffled: over the same line with its words shuffled), or a .jsonl file
    # of {"prompt" | "messages", "chosen", "rejected"}
    data: str = "stdlib-docstring-pairs"
    loss: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"  # DPO, IPO, or reference-free SimPO
    beta: float = 0.1
    simpo_gamma: float = 0.5  # SimPO's target margin
    # full fine-tuning keeps a frozen copy of the initial model as the reference (int8: a
    # quarter of its size); LoRA needs none: the reference is the base, adapters switched off
    reference_quantize: Literal["none", "int8"] = "none"
    val_fraction: float = 0.1
    max_examples: int | None = None


@dataclass(frozen=True)
class GrpoConfig:
    """`pipeline grpo`: group-relative policy optimisation of init.from on a verifiable task."""

    task: str = "addition"  # built in: addition, reversal; or a .jsonl of {"prompt", "answer"}
    digits: int = 2  # addition: operands of up to this many digits; reversal: words of 3..+2
    reward: str | None = None  # "module:function"(prompt, completion, example); None: exact
    group_size: int = 8  # completions sampled per prompt (train.batch_size prompts per step)
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int = 0
    updates_per_batch: int = 2  # optimizer steps on each batch of rollouts
    clip_eps: float = 0.2  # the ratio's clip range: 1 +- clip_eps
    kl_beta: float = 0.04  # weight of the KL penalty to the reference (k3 estimator)
    reference_quantize: Literal["none", "int8"] = "none"  # as dpo.reference_quantize
    train_prompts: int = 5000  # the training prompts drawn from the task
    eval_prompts: int = 100  # held-out prompts, answered greedily at each evaluation


@dataclass(frozen=True)
class DistillConfig:
    """`pipeline distill`: a student (this config's model) learns from a teacher run."""

    teacher: str | None = None  # the teacher's run directory
    alpha: float = 0.5  # weight of the distillation term; 1 - alpha weighs cross-entropy
    temperature: float = 2.0
    teacher_quantize: Literal["none", "int8"] = "none"


@dataclass(frozen=True)
class ServeConfig:
    """`pipeline serve`: the HTTP server and its continuous-batching engine."""

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    api_key: str | None = None  # or $PIPELINE_API_KEY; required on every /v1 route when set
    model_name: str | None = None  # the id clients send as "model"; None: the run's folder name
    quantize: Literal["none", "int8", "int4"] = "none"
    slots: int = 64  # requests running together at most (vLLM's max_num_seqs)
    max_len: int | None = None  # positions per request; None: the model's context
    # the paged KV cache: blocks of block_size positions, shared by every request; None: sized
    # by kv_memory_gb, at most every slot at max_len
    kv_blocks: int | None = None
    kv_memory_gb: float | None = None  # the pool's size when kv_blocks is None; None: automatic
    block_size: int = 16
    prefix_caching: bool = True  # share the full blocks of prompts that start the same way
    prefill_chunk: int = 256  # prompt tokens per prefill call: longer prompts go in chunks
    # a prompt's tokens per prefill call while other requests decode (each call delays their
    # next token); None: 32 on CPU, prefill_chunk on accelerators
    decode_prefill_chunk: int | None = None
    # decode steps per device call while no request needs the host between its tokens (none
    # waiting or prefilling, no grammar, no draft): the host's cost per call is shared by that
    # many tokens; a request arriving meanwhile waits at most that many steps for its slot
    decode_steps: int = 4
    # prompts admitted while other requests decode wait for their prefill until they are at
    # least prefill_wait_ratio times as many as the decoding requests, or have waited
    # prefill_max_wait decode steps (text-generation-inference's waiting_served_ratio and
    # max_waiting_tokens): prompts arriving one by one go in together, in fuller prefill calls
    # that stall the decoding requests fewer times; 0: prefilled at once
    prefill_wait_ratio: float = 0.0
    prefill_max_wait: int = 20
    # tokens per streamed chunk: 1 sends each token as it comes; N, a chunk per N tokens (and
    # the last), fewer messages for the server to write and the client to parse (vLLM's
    # --stream-interval)
    stream_interval: int = 1
    # LoRA adapters served beside the base (serve --adapter NAME=RUN; more can be loaded at run
    # time through /v1/load_lora_adapter): room for max_adapters of rank <= max_lora_rank
    max_adapters: int = 0
    max_lora_rank: int = 16
    max_queue: int = 64  # requests waiting for a slot before 429
    max_tokens: int | None = None  # the largest max_tokens accepted; None: max_len
    default_max_tokens: int = 16  # when a request gives none (as OpenAI's completions)
    max_n: int = 8  # the largest n (choices per request)
    max_body_bytes: int = 1_048_576
    graceful_seconds: float = 60.0  # SIGTERM: how long in-flight requests may take to finish
    # how long an idle keep-alive connection stays open: longer than clients' pools keep theirs
    # (httpx and the openai package 5 s, aiohttp 15 s), so a client never sends a request on a
    # connection the server is closing (that race dropped requests without a response)
    keep_alive_s: float = 75.0
    max_connections: int = 1024  # open connections + requests at most; beyond: 503 at once
    # a request's wall-clock limit from its arrival, waiting included: when it runs out the
    # request ends as if its token budget had (what it generated, finish_reason "length")
    request_timeout_s: float | None = 600.0
    draft: str | None = None  # a draft run (e.g. a distilled student): speculative decoding
    draft_k: int = 4  # draft tokens per round
    # compiled programs kept on disk, so a restart loads them: "auto" (the user's cache,
    # ~/.cache/pipeline/jax; see runtime.serving_cache_dir), a directory, or "off"
    compilation_cache: str | None = "auto"
    # the engine (model, scheduler, device loop) in a process of its own, apart from the HTTP
    # side's tokenising, detokenising and streaming (which then never hold its interpreter
    # lock); false: a thread of the server's process
    engine_process: bool = True
    # a chat template file (Jinja, or JSON with "chat_template") for /v1/chat/completions, in
    # place of the model's own (an imported model without one refuses chat requests otherwise)
    chat_template: str | None = None


@dataclass(frozen=True)
class Config:
    """The whole experiment."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    init: InitConfig = field(default_factory=InitConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict with the YAML key names (tuples as lists)."""
        out = {}
        for section in fields(self):
            value = getattr(self, section.name)
            out[section.name] = {
                _yaml_key(f): _plain(getattr(value, f.name)) for f in _public_fields(value)
            }
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(value):
    """Tuples as lists and dataclasses (mixture sources) as mappings, for YAML and JSON."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        return {_yaml_key(f): getattr(value, f.name) for f in fields(value)}
    return value


def _public_fields(cls_or_obj) -> list[dataclasses.Field]:
    """A section's config keys: its fields less the internal ones (`ModelConfig.filled`)."""
    return [f for f in fields(cls_or_obj) if not f.metadata.get("internal")]


def _yaml_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load `path` (following `base:` files), apply dotted `key=value` overrides, validate."""
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        _merge_file(Path(path), raw, origins, seen=())
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value, origins, COMMAND_LINE)
    return build_config(raw, origins)


def config_from_dict(raw: dict[str, Any], origin: str = "dict") -> Config:
    """Build a validated Config from a plain nested mapping (e.g. a saved config.yaml)."""
    origins: dict[str, str] = {}
    merged: dict[str, Any] = {}
    _deep_merge(merged, raw, origins, origin, prefix="")
    return build_config(merged, origins)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(cfg.to_yaml())


def _merge_file(path: Path, raw: dict, origins: dict, seen: tuple[Path, ...]) -> None:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    resolved = path.resolve()
    if resolved in seen:
        raise ConfigError(f"{path}: `base:` files form a cycle through {resolved.name}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        _merge_file(path.parent / base, raw, origins, seen + (resolved,))
    _deep_merge(raw, data, origins, str(path), prefix="")


def _deep_merge(dst: dict, src: dict, origins: dict, origin: str, prefix: str) -> None:
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_merge(dst[key], value, origins, origin, dotted + ".")
        else:
            dst[key] = _copy_dict(value)
            _record_origins(origins, dotted, value, origin)


def _copy_dict(value):
    return {k: _copy_dict(v) for k, v in value.items()} if isinstance(value, dict) else value


def _record_origins(origins: dict, dotted: str, value, origin: str) -> None:
    origins[dotted] = origin
    if isinstance(value, dict):
        for key, sub in value.items():
            _record_origins(origins, f"{dotted}.{key}", sub, origin)


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} on the command line is not of the form key=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_dotted(raw: dict, key: str, value, origins: dict, origin: str) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key} ({origin}): {part} is a value, not a section")
        node = child
    node[parts[-1]] = value
    _record_origins(origins, key, value, origin)


def build_config(raw: dict[str, Any], origins: dict[str, str]) -> Config:
    """Turn a merged nested mapping into a validated Config."""
    sections = {}
    section_types = {f.name: f.type for f in fields(Config)}
    hints = typing.get_type_hints(Config)
    for name, value in raw.items():
        if name not in section_types:
            _unknown_key(name, list(section_types), origins, "")
        if not isinstance(value, dict):
            raise ConfigError(
                f"{name} ({origins.get(name, '?')}): expected a section (mapping), got {value!r}"
            )
        sections[name] = _build_section(name, hints[name], value, origins)
    cfg = Config(**sections)
    _check_values(cfg, origins)
    return cfg


def _build_section(section: str, cls: type, values: dict, origins: dict):
    hints = typing.get_type_hints(cls)
    names = {_yaml_key(f): f.name for f in _public_fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{section}.{key}"
        if key not in names:
            _unknown_key(dotted, [f"{section}.{k}" for k in names], origins, section)
        name = names[key]
        kwargs[name] = _coerce(dotted, hints[name], value, origins.get(dotted, "?"))
    return cls(**kwargs)


def _unknown_key(dotted: str, valid: list[str], origins: dict, section: str) -> None:
    where = origins.get(dotted, "?")
    close = difflib.get_close_matches(dotted, valid, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    what = f"key in {section}" if section else "section"
    raise ConfigError(f"unknown {what} '{dotted}' ({where}); {hint}valid: {', '.join(valid)}")


def _coerce(dotted: str, hint, value, origin: str):
    """Check `value` against a type hint, converting the few safe cases (int -> float, '1e-3')."""
    options = _options(hint)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{dotted} ({origin}): must be set, got null")
    for option in options:
        if typing.get_origin(option) is Literal:
            if value in typing.get_args(option):
                return value
        elif option is bool:
            if isinstance(value, bool):
                return value
        elif option is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif option is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif option is str and isinstance(value, str):
            return value
        elif typing.get_origin(option) is tuple and dataclasses.is_dataclass(
            item_type := typing.get_args(option)[0]
        ):
            if isinstance(value, list | tuple) and all(isinstance(i, item_type) for i in value):
                return tuple(value)
            if isinstance(value, list) and all(isinstance(i, dict) for i in value):
                return tuple(
                    _build_section(f"{dotted}[{i}]", item_type, item, {})
                    for i, item in enumerate(value)
                )
        elif typing.get_origin(option) is tuple:
            items = value.split(",") if isinstance(value, str) else value
            if isinstance(items, list) and all(isinstance(i, str) for i in items):
                return tuple(i.strip() for i in items if i.strip())
    raise ConfigError(f"{dotted} ({origin}): expected {_describe(options)}, got {value!r}")


def _options(hint) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(o for arg in typing.get_args(hint) for o in _options(arg))
    return (hint,)


def _describe(options: tuple) -> str:
    names = []
    for option in options:
        if typing.get_origin(option) is Literal:
            names.append("one of " + ", ".join(repr(a) for a in typing.get_args(option)))
        elif option is type(None):
            names.append("null")
        elif typing.get_origin(option) is tuple and dataclasses.is_dataclass(
            item_type := typing.get_args(option)[0]
        ):
            keys = ", ".join(_yaml_key(f) for f in fields(item_type))
            names.append(f"a list of mappings with keys {keys}")
        elif typing.get_origin(option) is tuple:
            names.append("a list of strings")
        else:
            names.append(option.__name__)
    return " or ".join(names)


TRACKERS = ("jsonl", "tensorboard", "wandb", "mlflow")


def optional_import(module: str, what: str, extra: str):
    """`module`, or a ConfigError naming what needs it and the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"{what} needs the {module} package, which is not installed: "
            f"pip install -e '.[{extra}]'"
        ) from None


def flat_keys(data: dict, prefix: str = "") -> dict:
    """{"model.embed_dim": 64, ...} from nested sections."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_stop_when(text: str) -> tuple[str, str, float] | None:
    """("eval_loss", "<=", 2.5) from "eval_loss <= 2.5"; None if it does not read so."""
    match = re.fullmatch(
        r"\s*([A-Za-z_][\w/]*)\s*(>=|<=)\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*", text
    )
    if not match:
        return None
    try:
        return match[1], match[2], float(match[3])
    except ValueError:
        return None


def _check_values(cfg: Config, origins: dict) -> None:
    """Cross-field checks: each names the offending key and where it was set."""
    for key, ok, message in [*_model_rules(cfg.model, origins), *_run_rules(cfg)]:
        if not ok:
            raise ConfigError(f"{key} ({origins.get(key, 'default')}): {message}")


def _model_rules(m: ModelConfig, origins: dict) -> list[tuple[str, bool, str]]:
    """(key, holds, message) for the model section, a rule per line."""
    return [
        ("model.vocab_size", m.vocab_size > 0, "must be positive"),
        (
            "model.vocab_used",
            m.vocab_used is None or 0 < m.vocab_used <= m.vocab_size,
            f"must be in [1, model.vocab_size={m.vocab_size}] (or null: every row)",
        ),
        ("model.num_layers", m.num_layers > 0, "must be positive"),
        ("model.embed_dim", m.embed_dim > 0, "must be positive"),
        ("model.num_heads", m.num_heads > 0, "must be positive"),
        (
            "model.num_heads",
            "model.head_dim" in origins or m.embed_dim % max(m.num_heads, 1) == 0,
            f"{m.num_heads} does not divide model.embed_dim={m.embed_dim} (or set model.head_dim)",
        ),
        ("model.head_dim", m.head_dim > 0, "must be positive"),
        (
            "model.num_kv_heads",
            m.num_kv_heads > 0 and m.num_heads % max(m.num_kv_heads, 1) == 0,
            f"{m.num_kv_heads} does not divide model.num_heads={m.num_heads}",
        ),
        ("model.mlp_dim", m.mlp_dim > 0, "must be positive"),
        ("model.max_seq_len", m.max_seq_len > 0, "must be positive"),
        ("model.loss_chunk", m.loss_chunk >= 0, "must be 0 (all at once) or positive"),
        (
            "model.positions",
            m.positions == "learned" or m.head_dim % 2 == 0,
            f"rope needs an even head dim, got {m.head_dim}",
        ),
        ("model.rope_factor", m.rope_factor > 0, "must be positive"),
        (
            "model.rope_high_freq_factor",
            m.rope_scaling != "llama3" or m.rope_high_freq_factor > m.rope_low_freq_factor,
            "must exceed model.rope_low_freq_factor",
        ),
        (
            "model.sliding_window",
            m.sliding_window is None or m.sliding_window > 0,
            "must be positive",
        ),
    ]


def _run_rules(cfg: Config) -> list[tuple[str, bool, str]]:
    """(key, holds, message) for the data, training, fine-tuning and serving sections."""
    m, d = cfg.model, cfg.data
    return [
        (
            "data.seq_len",
            0 < d.seq_len <= m.max_seq_len,
            f"{d.seq_len} must be in 1..model.max_seq_len={m.max_seq_len}",
        ),
        ("data.val_fraction", 0.0 <= d.val_fraction < 1.0, "must be in [0, 1)"),
        ("data.max_docs", d.max_docs is None or d.max_docs > 0, "must be positive"),
        ("data.shard_mb", d.shard_mb > 0, "must be positive"),
        *(
            (f"data.mixture[{i}].weight", m.weight > 0, "must be positive")
            for i, m in enumerate(d.mixture)
        ),
        ("data.tokenize_workers", d.tokenize_workers >= 0, "must be 0 (one per core) or more"),
        *_train_rules(cfg),
        ("lora.rank", cfg.lora.rank > 0, "must be positive"),
        ("lora.dropout", 0.0 <= cfg.lora.dropout < 1.0, "must be in [0, 1)"),
        (
            "lora.targets",
            bool(cfg.lora.targets) and set(cfg.lora.targets) <= LORA_TARGETS,
            f"{list(cfg.lora.targets)}: each must be one of {sorted(LORA_TARGETS)}",
        ),
        ("finetune.val_fraction", 0.0 < cfg.finetune.val_fraction < 1.0, "must be in (0, 1)"),
        (
            "tokenizer.vocab_size",
            (cfg.tokenizer.vocab_size or m.vocab_size) <= m.vocab_size,
            f"{cfg.tokenizer.vocab_size} exceeds model.vocab_size={m.vocab_size}",
        ),
        *_post_training_rules(cfg),
        *_serve_rules(cfg.serve),
    ]


def _train_rules(cfg: Config) -> list[tuple[str, bool, str]]:
    """(key, holds, message) for the training loop, the optimizer and the trackers."""
    t = cfg.train
    return [
        ("train.steps", t.steps >= 0, "must be >= 0"),
        ("train.batch_size", t.batch_size > 0, "must be positive"),
        ("train.log_every", t.log_every > 0, "must be positive"),
        ("train.eval_every", t.eval_every > 0, "must be positive"),
        ("train.checkpoint_every", t.checkpoint_every > 0, "must be positive"),
        ("train.keep_checkpoints", t.keep_checkpoints > 0, "must be positive"),
        ("train.grad_accum", t.grad_accum > 0, "must be positive"),
        (
            "train.batch_size",
            t.batch_size % max(t.grad_accum, 1) == 0,
            f"{t.batch_size} is not a multiple of train.grad_accum={t.grad_accum}",
        ),
        (
            "train.stop_when",
            t.stop_when is None or parse_stop_when(t.stop_when) is not None,
            f"{t.stop_when!r} must read METRIC >= VALUE or METRIC <= VALUE (e.g. eval_loss <= 2.5)",
        ),
        (
            "run.trackers",
            set(cfg.run.trackers) <= set(TRACKERS),
            f"{list(cfg.run.trackers)}: each must be one of {list(TRACKERS)}",
        ),
        (
            "run.wandb_mode",
            cfg.run.wandb_mode in (None, "online", "offline", "disabled"),
            f"{cfg.run.wandb_mode!r} must be online, offline or disabled",
        ),
        ("optimizer.lr", cfg.optimizer.lr > 0, "must be positive"),
        ("optimizer.warmup_steps", cfg.optimizer.warmup_steps >= 0, "must be >= 0"),
        (
            "optimizer.decay_fraction",
            0.0 < cfg.optimizer.decay_fraction <= 1.0,
            "must be in (0, 1]",
        ),
        ("optimizer.muon_rms", cfg.optimizer.muon_rms > 0, "must be positive"),
    ]


def _post_training_rules(cfg: Config) -> list[tuple[str, bool, str]]:
    """(key, holds, message) for distillation, preference tuning and GRPO."""
    return [
        ("distill.alpha", 0.0 <= cfg.distill.alpha <= 1.0, "must be in [0, 1]"),
        ("distill.temperature", cfg.distill.temperature > 0, "must be positive"),
        ("dpo.beta", cfg.dpo.beta > 0, "must be positive"),
        ("dpo.val_fraction", 0.0 < cfg.dpo.val_fraction < 1.0, "must be in (0, 1)"),
        *(
            (f"grpo.{name}", getattr(cfg.grpo, name) >= 1, "must be at least 1")
            for name in (
                "digits",
                "max_new_tokens",
                "updates_per_batch",
                "train_prompts",
                "eval_prompts",
            )
        ),
        ("grpo.group_size", cfg.grpo.group_size >= 2, "must be at least 2 (a group to compare)"),
        ("grpo.temperature", cfg.grpo.temperature > 0, "must be positive (sampling)"),
        ("grpo.kl_beta", cfg.grpo.kl_beta >= 0, "must be >= 0"),
        ("grpo.clip_eps", cfg.grpo.clip_eps > 0, "must be positive"),
    ]


def _serve_rules(serve: ServeConfig) -> list[tuple[str, bool, str]]:
    """(key, holds, message) for the serving section."""
    return [
        ("serve.port", 0 <= serve.port < 65536, "must be in 0..65535"),
        *(
            (f"serve.{name}", getattr(serve, name) >= 1, "must be at least 1")
            for name in (
                "slots",
                "max_queue",
                "default_max_tokens",
                "max_body_bytes",
                "block_size",
                "prefill_chunk",
                "max_connections",
                "decode_steps",
                "stream_interval",
            )
        ),
        ("serve.keep_alive_s", serve.keep_alive_s > 0, "must be positive"),
        ("serve.request_timeout_s", (serve.request_timeout_s or 1) > 0, "must be positive"),
        *(  # None: sized automatically
            (
                f"serve.{name}",
                (v := getattr(serve, name)) is None or v >= 1,
                "must be at least 1",
            )
            for name in ("kv_blocks", "decode_prefill_chunk")
        ),
        ("serve.max_adapters", serve.max_adapters >= 0, "must be >= 0"),
        ("serve.prefill_wait_ratio", serve.prefill_wait_ratio >= 0, "must be >= 0"),
        ("serve.prefill_max_wait", serve.prefill_max_wait >= 0, "must be >= 0"),
        ("serve.max_lora_rank", serve.max_lora_rank >= 1, "must be at least 1"),
        ("serve.kv_memory_gb", (serve.kv_memory_gb or 1) > 0, "must be positive"),
    ]


def with_overrides(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy of `cfg` with some fields of some sections replaced (validated again)."""
    raw = cfg.to_dict()
    for section, values in sections.items():
        raw[section].update(values)
    return config_from_dict(raw, origin="code")


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RunConfig",
    "TokenizerConfig",
    "TrainConfig",
    "dump_config",
    "load_config",
    "config_from_dict",
    "replace",
    "with_overrides",
]
