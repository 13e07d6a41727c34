"""`python -m pipeline <command> --config FILE [key=value ...]`: the command-line entry point.

Each subcommand is a small function; a user mistake (`ConfigError`) prints one `error:` line
and exits with status 2, never a traceback. Commands import what they use inside their own
function, so `pipeline --help` starts in a tenth of a second without importing JAX. (Elsewhere
imports sit at the top of their module, except for optional dependencies and in the load
generators, whose spawned client processes import the module without JAX.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from functools import partial
from pathlib import Path

from pipeline.config import Config, ConfigError, load_config, with_overrides
from pipeline.training.stages import STAGES


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=4")


def _config(args) -> Config:
    return load_config(args.config, args.overrides)


def cmd_tokenize(args) -> int:
    """Build (or find) the token store of the config's corpus and tokenizer (a store per source
    of a mixture); print its figures."""
    import resource

    from pipeline.data import prepare_dataset, prepare_mixture

    cfg = _config(args)
    if cfg.data.mixture:
        parts = [(p.name, p.dataset) for p in prepare_mixture(cfg)]
    else:
        parts = [(None, prepare_dataset(cfg))]
    rss = max(
        resource.getrusage(who).ru_maxrss * 1024
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    keys = ("shards", "tokenize_workers", "tokenize_seconds", "mb_per_s_per_core")
    reports = [
        {**({"name": name} if name else {}), **ds.summary(), **{k: ds.meta.get(k) for k in keys}}
        for name, ds in parts
    ]
    if args.json:  # the largest RSS of this process and its workers
        one = reports[0] if len(reports) == 1 and not cfg.data.mixture else {"sources": reports}
        print(json.dumps({**one, "peak_rss_bytes": rss}))
        return 0
    for r in reports:
        print(
            f"{r.get('name', r['source'])}: {r['documents']:,} documents, {r['bytes'] / 1e6:.1f} "
            f"MB -> train {r['train_tokens']:,} + validation {r['val_tokens']:,} tokens; "
            f"{r['shards']} shards by {r['tokenize_workers']} worker(s) in "
            f"{r['tokenize_seconds']:.1f} s ({r['mb_per_s_per_core']:.2f} MB/s per core, when "
            f"built); store {r['cache']}"
        )
    print(f"peak RSS {rss / 2**20:.0f} MiB")
    return 0


def cmd_info(args) -> int:
    """Print the resolved config, model size, FLOPs per token and the data summary."""
    from pipeline.data import prepare_dataset, prepare_mixture
    from pipeline.model import count_params, flops_per_token

    cfg = _config(args)
    params = count_params(cfg.model)
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    if args.no_data:
        data = None
    elif cfg.data.mixture:  # a summary per source
        data = [{"name": p.name, **p.dataset.summary()} for p in prepare_mixture(cfg)]
    else:
        data = prepare_dataset(cfg).summary()
    if args.json:
        print(
            json.dumps(
                {"config": cfg.to_dict(), "params": params, "flops_per_token": flops, "data": data}
            )
        )
        return 0
    print(cfg.to_yaml(), end="")
    print("---")
    print(f"parameters:        {params:,} ({params / 1e6:.2f} M)")
    print(f"flops per token:   {flops:,.0f} (training, seq_len={cfg.data.seq_len})")
    for part in data if isinstance(data, list) else [data] if data else []:
        print(f"data source:       {part['source']} ({part['bytes'] / 1e6:.1f} MB)")
        print(
            f"documents:         {part['documents']:,} "
            f"(train {part['train_docs']:,}, validation {part['val_docs']:,})"
        )
        print(
            f"tokens:            train {part['train_tokens']:,}, validation {part['val_tokens']:,}"
        )
        print(f"tokenizer:         {part['vocab_size']:,} tokens; cache {part['cache']}")
    return 0


def _train(args, stage: str) -> int:
    """Run a training stage; a training failure is one error line and status 1."""
    cfg = with_overrides(_config(args), run={"stage": stage})
    from pipeline.runtime import enable_compilation_cache, init_distributed

    init_distributed(cfg.run)  # before anything touches a device
    enable_compilation_cache(cfg.run.compilation_cache)
    from pipeline.training.train import TrainingError

    try:
        result = STAGES[stage].run(cfg, fresh=args.fresh)
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _report(result)
    return 0


def cmd_merge(args) -> int:
    """Fold a LoRA run's adapters into its base and write a plain model run directory."""
    from pipeline.inference.runs import load_model, save_model
    from pipeline.lora import merge

    cfg, model, tokenizer = load_model(args.run, key="--run")
    out = save_model(cfg, merge(model), tokenizer, args.out)
    print(f"merged model written to {out}")
    return 0


def cmd_generate(args) -> int:
    """Generate from a run's model (pre-trained, fine-tuned with an adapter, or merged)."""
    from pipeline.inference.runs import load_for_inference
    from pipeline.inference.sampling import Sampling, check_sampling
    from pipeline.runtime import enable_compilation_cache
    from pipeline.tokenizer import prompt_ids, read_chat_template

    if not args.prompt:
        raise ConfigError("--prompt is empty")
    if args.chat_template and not args.chat:
        raise ConfigError("--chat-template is for --chat")
    template = read_chat_template(args.chat_template) if args.chat_template else None
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    try:
        check_sampling(sampling)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    enable_compilation_cache(args.compilation_cache)
    loaded = load_for_inference(args.run, args.quantize, args.draft)
    tokenizer = loaded.tokenizer
    tokenizer.template_override = template
    try:
        stop = set(tokenizer.stop_ids)  # the end of text, and the model's other end ids
        if args.chat:
            ids = prompt_ids(tokenizer, [{"role": "user", "content": args.prompt}])
            stop.add(tokenizer.end_id)  # the end of a turn
        else:
            ids = tokenizer.encode(args.prompt)
        result = _generate(loaded, ids, sampling, tuple(stop - {None}), args)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    tokens = result.tokens[0]
    text = tokenizer.decode(tokens)
    if not args.json:
        print(args.prompt + text if not args.chat else text)
        return 0
    fields = {
        "text": text,
        "tokens": tokens,
        "prompt_tokens": len(ids),
        "ttft_ms": result.ttft_s * 1e3 if result.ttft_s is not None else None,
        "tokens_per_sec": result.tokens_per_sec,
        "decode_s": result.decode_s if result.decode_s is not None else result.seconds,
        "compile_s": result.compile_s,
    }
    if args.draft:
        fields["acceptance"] = result.acceptance
    print(json.dumps(fields))
    return 0


def _generate(loaded, ids: list[int], sampling, eos_id: tuple[int, ...], args):
    """One prompt through `generate`, or speculative decoding with a draft."""
    if loaded.draft is None:
        from pipeline.inference.generate import generate

        return generate(loaded.model, [ids], args.max_new_tokens, sampling, eos_id=eos_id)
    from pipeline.inference.speculative import speculative_generate

    return speculative_generate(
        loaded.model, loaded.draft, [ids], args.max_new_tokens, sampling, eos_id, k=args.draft_k
    )


def cmd_export(args) -> int:
    """Serialise a run's prefill and decode programs, with its weights, into one file."""
    from pipeline.inference.export import export_model
    from pipeline.inference.runs import load_for_inference
    from pipeline.runtime import run_dir_lock

    with run_dir_lock(args.run, shared=True):  # not while a training process writes it
        loaded = load_for_inference(args.run, args.quantize)
    platforms = tuple(args.platforms.split(",")) if args.platforms else None
    manifest = export_model(loaded.model, loaded.tokenizer, args.out, platforms)
    print(
        f"exported {args.run} to {args.out} (prompt buckets {manifest['prefill_buckets']}, "
        f"platforms {','.join(manifest['platforms'])}); run it with "
        f"python -m pipeline.exported {args.out} --prompt TEXT"
    )
    return 0


def cmd_serve(args) -> int:
    """Serve a run over HTTP (OpenAI-compatible) until SIGTERM or Ctrl-C."""
    cfg = _config(args)
    flags = {
        "compilation_cache": args.compilation_cache,
        "host": args.host,
        "port": args.port,
        "api_key": args.api_key or os.environ.get("PIPELINE_API_KEY"),
        "quantize": args.quantize,
        "model_name": args.model_name,
        "draft": args.draft,
        "chat_template": args.chat_template,
    }
    cfg = with_overrides(cfg, serve={k: v for k, v in flags.items() if v is not None})
    s, runs = cfg.serve, adapter_runs(args.adapter) if args.adapter else {}
    if s.chat_template:  # a missing or unreadable file: refused before anything loads
        from pipeline.tokenizer import read_chat_template

        read_chat_template(s.chat_template)
    spawned = None
    if s.engine_process:  # first: the engine imports and loads while this process imports
        from pipeline.serving.launch import spawn_engine

        spawned = spawn_engine(args.run, s, runs)
    else:  # the engine on a thread of this process, which compiles: the cache here
        from pipeline.runtime import enable_compilation_cache, serving_cache_dir

        enable_compilation_cache(serving_cache_dir(s.compilation_cache))
    from pipeline.serving.serve import serve

    return serve(args.run, s, runs, spawned)


def adapter_runs(specs: list[str]) -> dict[str, str]:
    """--adapter NAME=RUN or a directory of LoRA runs -> {name: run}."""
    from pipeline.lora import ADAPTER_CONFIG

    runs = {}
    for spec in specs:
        if "=" in spec:
            name, run = spec.split("=", 1)
            found = {name: run}
        else:
            found = {
                p.parent.name: str(p.parent) for p in sorted(Path(spec).glob(f"*/{ADAPTER_CONFIG}"))
            }
            if not found:
                raise ConfigError(
                    f"--adapter {spec}: no NAME=RUN, and no LoRA run in that directory"
                )
        for name, run in found.items():
            if not name or name in runs:
                raise ConfigError(f"--adapter {spec}: the name {name!r} is empty or given twice")
            runs[name] = run
    return runs


def cmd_import_hf(args) -> int:
    """A local Hugging Face GPT-2 / Llama directory -> a run directory."""
    from pipeline.interop.hf import import_hf

    if args.src.endswith(".gguf"):  # one GGUF file (llama.cpp's format)
        from pipeline.interop.gguf import import_gguf

        out = import_gguf(args.src, args.out, args.dtype, chat_template=args.chat_template)
    else:
        out = import_hf(args.src, args.out, args.dtype, chat_template=args.chat_template)
    print(f"imported {args.src} into {out}")
    return 0


def cmd_export_hf(args) -> int:
    """A run directory -> a Hugging Face directory (plus a PEFT adapter for a LoRA run)."""
    from pipeline.interop.hf import export_hf
    from pipeline.runtime import run_dir_lock

    with run_dir_lock(args.run, shared=True):  # not while a training process writes it
        out = export_hf(args.run, args.out)
    print(f"exported {args.run} to {out}")
    return 0


def cmd_export_gguf(args) -> int:
    """A run directory -> one GGUF file (a LoRA run merged into its base first)."""
    from pipeline.interop.gguf import export_gguf
    from pipeline.runtime import run_dir_lock

    with run_dir_lock(args.run, shared=True):
        out = export_gguf(args.run, args.out, args.dtype)
    print(f"exported {args.run} to {out}")
    return 0


def cmd_eval(args) -> int:
    """lm-evaluation-harness against a local server of the run, on the offline stdlib tasks."""
    from pipeline.evaluation import run_eval

    tasks = args.tasks.split(",") if args.tasks else None
    scores = run_eval(args.run, tasks, args.limit, args.examples, chat=args.chat)
    if args.json:
        print(json.dumps(scores))
    else:
        for task, metrics in scores.items():
            print(task + "  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def cmd_fit(args) -> int:
    """Compile the training step from shapes alone; per-device memory and the largest batch."""
    from pipeline.training.fit import device_budget, fit, format_fit

    cfg = _config(args)
    budget = int(args.budget_gb * 2**30) if args.budget_gb else device_budget()
    result = fit(cfg, budget, stage=args.stage)
    print(json.dumps(result) if args.json else format_fit(result))
    if result.get("fits") is False:
        print("warning: this config will not fit the memory budget", file=sys.stderr)
    return 0


def cmd_runs(args) -> int:
    """A table of the run directories under DIR (default runs/)."""
    from pipeline.experiments import find_runs, format_table, sort_rows, summarize

    rows = sort_rows([summarize(d) for d in find_runs(args.dir)], args.sort)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def cmd_compare(args) -> int:
    """The config keys that differ between runs, and their loss curves in one PNG."""
    from pipeline.experiments import config_differences, plot_comparison

    diffs = config_differences(args.runs)
    names = [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if args.json:
        print(json.dumps({"runs": names, "differences": diffs}))
    else:
        width = max([len(k) for k in diffs] + [3])
        print("key".ljust(width) + "  " + "  ".join(names))
        for key, values in diffs.items():
            print(key.ljust(width) + "  " + "  ".join(json.dumps(v) for v in values))
        if not diffs:
            print("(no config differences besides run.*)")
    out = plot_comparison(args.runs, args.out, args.x)
    print(f"loss curves: {out}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_sweep(args) -> int:
    """Run the config's stage once per point of --grid; finished points are skipped."""
    from pathlib import Path

    from pipeline.experiments import sweep, write_sweep_summary

    dirs = sweep(args.config, args.grid, args.overrides, args.name, args.root, stage=args.stage)
    prefix = args.name or Path(args.config).stem
    table, plot = write_sweep_summary(dirs, Path(args.root) / f"{prefix}.sweep", args.x)
    print(table)
    print(f"comparison plot: {plot}")
    return 0


def _report(result) -> None:
    """The one line a finished (or stopped) training run prints: a `RunResult`."""
    import jax

    if jax.process_index() != 0:
        return
    loss, before, after = result.eval_loss, result.initial_eval, result.eval
    loss_text = f"final eval loss {loss:.4f}" if loss is not None else "no eval loss"
    if result.initial_eval_loss is not None:
        loss_text = f"held-out loss before {result.initial_eval_loss:.4f}, after {loss:.4f}"
    if "eval_pass_rate" in after:  # reinforcement learning: no loss to evaluate
        loss_text = f"held-out pass rate {after['eval_pass_rate']:.3f}"
        if "eval_pass_rate" in before:
            loss_text += f" (before {before['eval_pass_rate']:.3f})"
    if "eval_reward_accuracy" in after:  # preference tuning
        loss_text += f"; held-out reward accuracy {after['eval_reward_accuracy']:.3f}"
        if "eval_reward_accuracy" in before:
            loss_text += f" (before {before['eval_reward_accuracy']:.3f})"
    print(f"{result.status} at step {result.step}; {loss_text}; run directory {result.run_dir}")


SOAK = {"requests": 5000, "seconds": 600.0, "concurrency": 32}  # bench soak's defaults


def cmd_bench(args) -> int:
    """Benchmarks: one line (or JSON object) per case."""
    from pipeline.bench import check_flags, run_bench

    options = ("config", "cases", "steps", "run", "request", "peer")
    given = [f"--{name}" for name in (*options, *SOAK) if getattr(args, name) is not None]
    check_flags(args.target, given + (["overrides"] if args.overrides else []))
    cases = args.cases.split(",") if args.cases else None
    try:
        request = json.loads(args.request) if args.request else None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--request is not a JSON object: {err}") from None
    run_bench(
        args.target,
        args.config,
        args.overrides,
        cases,
        5 if args.steps is None else args.steps,
        args.json,
        args.run,
        request,
        peer=args.peer,
        soak={k: v if getattr(args, k) is None else getattr(args, k) for k, v in SOAK.items()},
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_training_commands(sub)
    _add_inference_commands(sub)
    _add_experiment_commands(sub)
    _add_interop_commands(sub)
    _add_bench_command(sub)
    evalp = sub.add_parser("eval", help="lm-eval on the offline stdlib tasks, through the server")
    evalp.add_argument("--run", required=True, help="a run directory (as serve takes)")
    evalp.add_argument("--tasks", help="stdlib_next_line,stdlib_docstring (default both)")
    evalp.add_argument("--limit", type=int, help="examples per task (default all)")
    evalp.add_argument("--examples", type=int, default=200, help="examples built per task")
    evalp.add_argument(
        "--chat",
        action="store_true",
        help="lm-eval's local-chat-completions (generate-until tasks) instead of local-completions",
    )
    evalp.add_argument("--json", action="store_true")
    evalp.set_defaults(func=cmd_eval)
    return parser


def _add_training_commands(sub) -> None:
    info = sub.add_parser("info", help="resolved config, model size and data summary")
    _add_config_args(info)
    info.add_argument("--no-data", action="store_true", help="skip reading the corpus")
    info.add_argument("--json", action="store_true", help="one JSON object instead of text")
    info.set_defaults(func=cmd_info)
    tok = sub.add_parser(
        "tokenize", help="tokenize the corpus into the token store (all cores; resumable)"
    )
    _add_config_args(tok)
    tok.add_argument("--json", action="store_true", help="one JSON object instead of text")
    tok.set_defaults(func=cmd_tokenize)
    for spec in STAGES.values():
        stage = sub.add_parser(spec.name, help=spec.summary)
        _add_config_args(stage)
        stage.add_argument(
            "--fresh", action="store_true", help="discard the run in run.dir and start over"
        )
        stage.set_defaults(func=partial(_train, stage=spec.name))


def _add_inference_commands(sub) -> None:
    merge = sub.add_parser("merge", help="merge a LoRA run's adapters into a full model")
    merge.add_argument("--run", required=True, help="the LoRA run directory")
    merge.add_argument("--out", required=True, help="where to write the merged run directory")
    merge.set_defaults(func=cmd_merge)
    gen = sub.add_parser("generate", help="generate text from a run directory")
    gen.add_argument("--run", required=True, help="a run directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0: off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1: off")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument(
        "--chat-template", metavar="FILE", help="with --chat: this template (Jinja, or JSON)"
    )
    gen.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantisation")
    gen.add_argument("--json", action="store_true", help="one JSON object: text, tokens, timings")
    gen.add_argument("--draft", help="a draft run (e.g. a distilled student): speculative decoding")
    gen.add_argument("--draft-k", type=int, default=4, help="draft tokens per target pass")
    gen.add_argument(
        "--compilation-cache",
        default=os.environ.get("PIPELINE_COMPILATION_CACHE"),
        help="directory of compiled programs kept between processes "
        "(default: $PIPELINE_COMPILATION_CACHE; unset: off)",
    )
    gen.set_defaults(func=cmd_generate)
    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    srv.add_argument("--run", required=True, help="a run directory")
    _add_config_args(srv)
    srv.add_argument("--host", help="default 127.0.0.1 (serve.host)")
    srv.add_argument("--port", type=int, help="default 8000 (serve.port)")
    srv.add_argument("--api-key", help="require Authorization: Bearer KEY (or $PIPELINE_API_KEY)")
    srv.add_argument("--quantize", choices=["none", "int8", "int4"])
    srv.add_argument("--model-name", help="the model id clients use (default: the run's name)")
    srv.add_argument("--draft", help="a draft run: speculative decoding (serve.draft_k tokens)")
    srv.add_argument(
        "--chat-template",
        metavar="FILE",
        help="the template of /v1/chat/completions (serve.chat_template; default: the model's)",
    )
    srv.add_argument(
        "--compilation-cache",
        metavar="DIR",
        help="where compiled programs are kept between starts, or off (serve.compilation_cache; "
        "default: ~/.cache/pipeline/jax)",
    )
    srv.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=RUN",
        help="a LoRA run of the base to serve as model NAME (repeatable); or a directory: each "
        "LoRA run in it, named by its folder",
    )
    srv.set_defaults(func=cmd_serve)


def _add_experiment_commands(sub) -> None:
    fitp = sub.add_parser("fit", help="per-device memory of a training config, before running")
    _add_config_args(fitp)
    fitp.add_argument("--budget-gb", type=float, help="memory per device (default: the device's)")
    fitp.add_argument(
        "--stage",
        default="pretrain",
        choices=["pretrain", "finetune"],
        help="finetune: as finetune.method says (lora: adapters trained, the base frozen)",
    )
    fitp.add_argument("--json", action="store_true")
    fitp.set_defaults(func=cmd_fit)
    runs = sub.add_parser("runs", help="a table of run directories")
    runs.add_argument("dir", nargs="?", default="runs")
    runs.add_argument("--sort", help="a column, e.g. eval_loss")
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(func=cmd_runs)
    cmp = sub.add_parser("compare", help="config differences and loss curves of runs")
    cmp.add_argument("runs", nargs="+", help="run directories")
    cmp.add_argument("--x", default="step", choices=["step", "tokens", "time"])
    cmp.add_argument("--out", default="compare.png", help="the PNG to write")
    cmp.add_argument("--json", action="store_true")
    cmp.set_defaults(func=cmd_compare)
    swp = sub.add_parser("sweep", help="run a stage over a grid of overrides")
    swp.add_argument("--config", required=True)
    swp.add_argument(
        "--grid", nargs="+", required=True, help="key=v1,v2 ... (put plain overrides before it)"
    )
    swp.add_argument("--name", help="run directory prefix (default: the config's name)")
    swp.add_argument("--root", default="runs", help="where the run directories go")
    swp.add_argument("--x", default="step", choices=["step", "tokens", "time"])
    swp.add_argument(
        "--stage",
        choices=list(STAGES),
        help="the stage each point runs (default: the config's run.stage)",
    )
    swp.add_argument("overrides", nargs="*", help="overrides applied to every point")
    swp.set_defaults(func=cmd_sweep)


def _add_interop_commands(sub) -> None:
    imp = sub.add_parser(
        "import-hf",
        help="import a local Hugging Face model (GPT-2, Llama, Qwen, Mistral, Gemma) or GGUF",
    )
    imp.add_argument(
        "src",
        help="a directory with config.json, *.safetensors, tokenizer.json; or a .gguf file",
    )
    imp.add_argument("--out", required=True, help="the run directory to write")
    imp.add_argument(
        "--chat-template",
        metavar="FILE",
        help="a chat template kept in the run, in place of the model's (Jinja, or JSON)",
    )
    imp.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the parameters' and computation's dtype (each tensor converted as it is read)",
    )
    imp.set_defaults(func=cmd_import_hf)
    exp = sub.add_parser("export-hf", help="write a run as a Hugging Face model (and adapter)")
    exp.add_argument("run", help="a run directory")
    exp.add_argument("--out", required=True, help="the directory to write")
    exp.set_defaults(func=cmd_export_hf)
    gg = sub.add_parser("export-gguf", help="write a run as one GGUF file (llama.cpp, Ollama)")
    gg.add_argument("run", help="a run directory (llama, mistral, qwen2, qwen3; LoRA: merged)")
    gg.add_argument("--out", required=True, help="the .gguf file to write")
    gg.add_argument(
        "--dtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"], help="the tensors' type"
    )
    gg.set_defaults(func=cmd_export_gguf)
    export = sub.add_parser("export", help="serialise a run's generate programs (jax.export)")
    export.add_argument("--run", required=True, help="a run directory")
    export.add_argument("--out", required=True, help="the artifact to write (a zip file)")
    export.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantisation")
    export.add_argument(
        "--platforms", help="comma-separated, e.g. cpu,cuda (default: this machine's)"
    )
    export.set_defaults(func=cmd_export)


def _add_bench_command(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: bench train [--config FILE] [--json]")
    bench.add_argument(
        "target",
        choices=["train", "finetune", "generate", "quantize", "serve", "soak", "distill"],
    )
    bench.add_argument("--run", help="quantize: a trained run; distill: a distillation run")
    _add_config_args(bench)
    bench.add_argument(
        "--cases",
        help="train: presets from configs/ (default small,gpt2-124m); "
        "finetune: methods (default lora,qlora,full); "
        "generate: b1,b32,int8,int4,recompute (default all); quantize: int8,int4; "
        "serve: concurrency levels (default 1,8,32) and prefix, long, mixed",
    )
    # (no defaults here: a verb refuses the options it does not read, so "given" must show)
    bench.add_argument("--steps", type=int, help="train, finetune: timed steps per case (5)")
    bench.add_argument("--requests", type=int, help="soak: requests to send (5000)")
    bench.add_argument("--seconds", type=float, help="soak: at most this long (600)")
    bench.add_argument("--concurrency", type=int, help="soak: clients at a time (32)")
    bench.add_argument("--json", action="store_true", help="one JSON object per case")
    bench.add_argument(
        "--request",
        help="serve: more fields for every request, as JSON, e.g. '{\"logprobs\": 5}'",
    )
    bench.add_argument(
        "--peer",
        choices=["transformers", "torch"],
        help="serve: transformers, i.e. also run `transformers serve --continuous-batching` on "
        "the same weights at the same concurrency levels; train: torch, i.e. the same model and "
        "batch in PyTorch (transformers), ours and it alternated, each in its own process; "
        "both print our ratio to the peer",
    )
    bench.set_defaults(func=cmd_bench)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come anywhere, also after options: collect every leftover key=value.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(os.environ.get("PIPELINE_LOG_LEVEL", "INFO").upper())
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
