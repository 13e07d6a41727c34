"""The PyTorch peer of a training benchmark: the same architecture in transformers, same batch.

`python -m pipeline.bench.torch_peer --config C [key=value ...] --steps N [--compile]`
builds `GPT2LMHeadModel` (family gpt2) or `LlamaForCausalLM` (llama) from our model config,
trains it with `torch.optim.AdamW` (our optimizer's hyper-parameters, global-norm clipping) on
random tokens of our batch shape, and prints one JSON line: tokens/s, step time, MFU against
the card's data-sheet peak, peak memory. With `--generate BATCH`, greedy `generate` (KV cache)
instead, on `pipeline bench generate`'s prompt shape. bfloat16 compute is autocast over float32
weights, as ours keeps float32 master weights. Runs in its own process: torch and JAX never
share a device. Needs torch and transformers (the `interop` extra; on GPU machines, the
image's own).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from pipeline.config import Config, ModelConfig, load_config


def build_model(m: ModelConfig):
    """A transformers model of our architecture, randomly initialised."""
    import transformers

    if m.family == "gpt2":
        hf = transformers.GPT2Config(
            vocab_size=m.vocab_size,
            n_positions=m.max_seq_len,
            n_embd=m.embed_dim,
            n_layer=m.num_layers,
            n_head=m.num_heads,
            n_inner=m.mlp_dim,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=m.norm_eps,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.GPT2LMHeadModel(hf)
    if m.family == "llama":
        hf = transformers.LlamaConfig(
            vocab_size=m.vocab_size,
            hidden_size=m.embed_dim,
            intermediate_size=m.mlp_dim,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads,
            num_key_value_heads=m.num_kv_heads,
            head_dim=m.head_dim,
            max_position_embeddings=m.max_seq_len,
            rms_norm_eps=m.norm_eps,
            rope_theta=m.rope_theta,
            tie_word_embeddings=bool(m.tied_embeddings),
        )
        return transformers.LlamaForCausalLM(hf)
    raise ValueError(f"torch peer: family {m.family!r} is not built (gpt2, llama)")


def matmul_flops_per_token(model, m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, counted as ours counts them (`pipeline.model.flops_per_token`):
    6 x the parameters used in matmuls (the tied head counted, lookups not) + attention."""
    params = sum(p.numel() for p in model.parameters())
    lookups = m.max_seq_len * m.embed_dim if m.family == "gpt2" else 0  # positions
    if not m.tied_embeddings:
        lookups += m.vocab_size * m.embed_dim  # the input embedding (the head is a matmul)
    attention = 12 * m.num_layers * m.num_heads * m.head_dim * seq_len
    return 6.0 * (params - lookups) + attention


def make_step(model, o, device, compute_dtype: str, cuda: bool):
    """One training step (forward under autocast, float32 cross-entropy, backward, clipping,
    fused AdamW: torch's single-kernel AdamW, on CPU and CUDA): `step(batch (B, T+1)) ->
    loss`."""
    import torch

    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=o.lr,
        betas=(o.b1, o.b2),
        eps=o.eps,
        weight_decay=o.weight_decay,
        fused=True,
    )
    half = compute_dtype in ("bfloat16", "float16")
    autocast_dtype = getattr(torch, compute_dtype) if half else None

    def step(batch):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=half):
            logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        loss.backward()
        if o.clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


PEER_TRAIN = {
    False: "PyTorch eager, fused AdamW",
    True: "PyTorch + torch.compile (inductor), fused AdamW",
}


def _timed(fn, batches, steps: range, sync) -> tuple[float, float]:
    """(seconds for `steps` steps, synchronised, the last loss)."""
    start = time.perf_counter()
    for i in steps:
        loss = fn(batches[i % len(batches)])
    loss = float(loss.detach())
    sync()
    return time.perf_counter() - start, loss


def run(cfg: Config, steps: int, warmup: int, compile_model: bool) -> dict:
    import torch

    from pipeline.runtime import nominal_peak_flops

    torch.manual_seed(cfg.train.seed)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    m = cfg.model
    model = build_model(m).to(device).train()
    flops_per_token = matmul_flops_per_token(model, m, cfg.data.seq_len)
    step = make_step(model, cfg.optimizer, device, m.compute_dtype, cuda)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, m.vocab_size, (B, T + 1), generator=gen).to(device)
        for _ in range(min(warmup + steps, 8))
    ]
    fn = torch.compile(step) if compile_model else step
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    warmup_s, _ = _timed(fn, batches, range(warmup), sync)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    total_s, loss = _timed(fn, batches, range(warmup, warmup + steps), sync)
    step_s = total_s / steps
    kind = torch.cuda.get_device_name() if cuda else "cpu"
    nominal = nominal_peak_flops(kind, m.compute_dtype)
    tokens_per_sec = B * T / step_s
    return {
        "case": f"train/torch/{m.family}",
        "kind": "torch_train",
        "peer": "torch",
        "torch": torch.__version__,
        "compiled": compile_model,
        "peer_config": PEER_TRAIN[compile_model],
        "batch": B,
        "seq_len": T,
        "tokens_per_sec": tokens_per_sec,
        "step_time_s": step_s,
        "warmup_s": warmup_s,
        "flops_per_token": flops_per_token,
        "mfu_nominal": tokens_per_sec * flops_per_token / nominal if nominal else None,
        "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "compute_dtype": m.compute_dtype,
        "loss": loss,
        "device": kind,
    }


def generate_run(
    cfg: Config, batch: int, compiled: bool = False, prompt_len: int = 64, new_tokens: int = 128
) -> dict:
    """transformers' `generate` (greedy) on the same model and prompt shape as `pipeline bench
    generate`, in one of its two configurations: eager with its dynamic cache (the default), or
    `compiled`: a static cache with `torch.compile` of the forward (transformers' own fast
    path, `cache_implementation="static"` + `compile_config`; on CPU too). Tokens/s over
    prefill and decode; the time to first token as ours is timed: a whole one-token `generate`
    call, from the call to the token on the host; decode tokens/s over the rest."""
    import torch

    torch.manual_seed(cfg.train.seed)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = build_model(cfg.model).to(device).eval()
    if cuda and cfg.model.compute_dtype in ("bfloat16", "float16"):  # as users serve on a GPU
        model = model.to(getattr(torch, cfg.model.compute_dtype))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (batch, prompt_len), generator=gen).to(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fast = _static_compiled(cuda) if compiled else {}

    def timed(n):
        args = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "use_cache": True}
        start = time.perf_counter()
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **args, **fast
        )
        sync()
        assert out.shape[1] == prompt_len + n
        return time.perf_counter() - start

    with torch.inference_mode():
        timed(new_tokens), timed(1)  # warm-up (compiled: both shapes of the static cache)
        first, total = timed(1), timed(new_tokens)
    return {
        "case": f"generate/torch/b{batch}",
        "kind": "torch_generate",
        "peer": "torch",
        "peer_config": PEER_GENERATE[compiled],
        "compiled": compiled,
        "torch": torch.__version__,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "tokens_per_sec": batch * new_tokens / total,
        "decode_tokens_per_sec": batch * (new_tokens - 1) / max(total - first, 1e-9),
        "ttft_ms": first * 1e3,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


PEER_GENERATE = {
    False: "transformers generate, eager, dynamic cache",
    True: "transformers generate, static cache + torch.compile",
}


def _static_compiled(cuda: bool) -> dict:
    """`generate`'s arguments for a static cache and a compiled forward (CUDA graphs on a GPU:
    "reduce-overhead"; on CPU inductor's default mode, which transformers compiles only when
    asked to on every device)."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, mode="reduce-overhead" if cuda else "default")
    config._compile_all_devices = True  # transformers' own switch for compiling on CPU
    return {"cache_implementation": "static", "compile_config": config}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.torch_peer")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value, as the pipeline's commands take")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training step; with --generate: a static cache + compiled forward",
    )
    parser.add_argument(
        "--generate", type=int, metavar="BATCH", help="time greedy `generate` at this batch"
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.generate:
        result = generate_run(cfg, args.generate, args.compile)
    else:
        result = run(cfg, args.steps, args.warmup, args.compile)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
