"""`run_training`: the loop every stage shares, around the step built in train.py.

It owns the run directory: resume from the latest checkpoint (or refuse), prefetch batches,
log metrics at cadence (the only host syncs), evaluate, checkpoint asynchronously, stop cleanly
on SIGTERM/SIGINT, and stop loudly on a non-finite loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import queue
import threading
import time
from pathlib import Path

import jax
import numpy as np
import yaml
from tqdm import tqdm

from pipeline.checkpoint import Checkpointer, CheckpointError, has_checkpoints, remove_checkpoints
from pipeline.config import Config, parse_stop_when
from pipeline.inference.runs import save_params
from pipeline.runtime import aggregate_peak_flops, is_main_process, run_dir_lock
from pipeline.training.metrics import (
    METRICS_FILE,
    STATE_FILE,
    MetricsLogger,
    plot_losses,
    write_state,
)
from pipeline.training.train import (
    RunResult,
    Stage,
    StopRequested,
    TrainingError,
    create_trainer,
    to_host,
    wait_for_previous_step,
)

# Model keys that may change between a run and its resume: they do not change parameters.
RESUMABLE_MODEL_KEYS = {"remat", "compute_dtype", "loss_chunk", "loss_dtype", "vocab_used"}


def run_training(cfg: Config, stage: Stage, fresh: bool = False) -> RunResult:
    """Train `stage` for `cfg.train.steps` steps in `cfg.run.dir`, resuming if it holds a run.
    The main process holds the run directory's lock throughout (`RunDirInUseError` if another
    process does), before anything in it is read, removed (`fresh`) or written."""
    with run_dir_lock(cfg.run.dir, enabled=is_main_process()):
        return _run_training(cfg, stage, fresh)


def _run_training(cfg: Config, stage: Stage, fresh: bool) -> RunResult:
    run_dir = Path(cfg.run.dir)
    main = is_main_process()
    prepare_run_dir(cfg, stage, fresh, main)
    trainer = create_trainer(stage, cfg)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.train.keep_checkpoints)
    state, start = restore_latest(ckpt, trainer.state)
    strategy, train_fn, eval_fn = trainer.strategy, trainer.train_step, trainer.eval_step
    del trainer  # its initial state: a resumed run keeps only the restored one
    try:
        logger = MetricsLogger(run_dir, enabled=main, resume_step=start, cfg=cfg)
    except BaseException:  # a tracker that cannot start (its library missing, say)
        ckpt.close()
        raise
    loop = _Loop(cfg, stage, strategy, ckpt, logger, (train_fn, eval_fn), main)
    if main:
        write_state(run_dir, status="running", step=start, steps=cfg.train.steps, stage=stage.name)
    try:
        placed = strategy.replicate(state)
        # the unplaced state (on an accelerator, a device copy of the weights and the optimizer)
        # must not outlive its placement: the step donates `placed`, so only the run's copy stays
        del state
        result = loop.run(placed, start)
    except BaseException as err:
        if main:
            with contextlib.suppress(OSError):  # a full disk must not hide the first error
                write_state(
                    run_dir,
                    status="failed",
                    step=loop.step,
                    steps=cfg.train.steps,
                    stage=stage.name,
                    error=str(err)[:500],
                )
        with contextlib.suppress(Exception):  # e.g. a full disk: the first error is the one
            _close(ckpt, logger, "failed")
        raise
    _close(ckpt, logger, "finished" if result.status == "finished" else "interrupted")
    if main:
        if result.status == "finished" and loop.last_saved is not None:
            save_params(loop.last_saved["params"], run_dir)  # model/: what inference reads
            if stage.export:
                stage.export(loop.last_saved["params"], run_dir)
        write_state(
            run_dir,
            status=result.status,
            step=result.step,
            steps=cfg.train.steps,
            stage=stage.name,
        )
        plot_losses(run_dir)
    return dataclasses.replace(result, run_dir=str(run_dir))


def _close(ckpt: Checkpointer, logger: MetricsLogger, status: str) -> None:
    try:
        ckpt.close()
    finally:
        logger.close(status)


ENVIRONMENT_FILE = "environment.json"


def environment(cfg: Config, stage: Stage) -> dict:
    """What reproducing this run needs beside config.yaml: code, library and device versions."""
    import platform
    import subprocess

    import flax
    import optax

    import pipeline

    root = Path(pipeline.__file__).resolve().parent.parent
    try:
        commit = (
            subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            or None
        )
        dirty = (
            bool(
                subprocess.run(
                    ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout.strip()
            )
            if commit
            else None
        )
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    devices = jax.devices()
    return {
        "stage": stage.name,
        "package_version": pipeline.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "seed": cfg.train.seed,
        "data_seed": cfg.data.seed,
    }


def prepare_run_dir(cfg: Config, stage: Stage, fresh: bool, main: bool) -> None:
    """Write config.yaml and the tokenizer; refuse to resume a run of a different model."""
    run_dir = Path(cfg.run.dir)
    ckpt_dir = run_dir / "checkpoints"
    if main and fresh:
        remove_checkpoints(ckpt_dir)
        for name in (METRICS_FILE, STATE_FILE, "loss.png"):
            (run_dir / name).unlink(missing_ok=True)
        remove_checkpoints(run_dir / "tensorboard")
    elif has_checkpoints(ckpt_dir) and (run_dir / "config.yaml").is_file():
        _check_same_model(cfg, run_dir / "config.yaml")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        (run_dir / ENVIRONMENT_FILE).write_text(json.dumps(environment(cfg, stage), indent=2))
        if stage.tokenizer is not None:
            stage.tokenizer.save(run_dir)
    _barrier("run_dir")


def model_differences(old: dict, new: dict) -> str:
    """'model.key: old -> new, ...' for the keys that change parameters; '' when none do."""
    # A key the old config lacks predates that option: the run used its default behaviour.
    changed = sorted(
        k for k in new if k not in RESUMABLE_MODEL_KEYS and k in old and old[k] != new[k]
    )
    return ", ".join(f"model.{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)


def _check_same_model(cfg: Config, saved_path: Path) -> None:
    saved = yaml.safe_load(saved_path.read_text()) or {}
    diffs = model_differences(saved.get("model", {}), cfg.to_dict()["model"])
    # another optimizer's state has another structure: its checkpoints do not restore
    old_name = (saved.get("optimizer") or {}).get("name", "adamw")
    if old_name != cfg.optimizer.name:
        diffs = ", ".join(
            filter(None, [diffs, f"optimizer.name: {old_name!r} -> {cfg.optimizer.name!r}"])
        )
    if diffs:
        raise CheckpointError(
            f"{saved_path.parent} holds checkpoints of a different model ({diffs}); "
            "pass --fresh to start it over, or use another run.dir"
        )


def restore_latest(ckpt: Checkpointer, state: dict) -> tuple[dict, int]:
    """The latest checkpoint's state and step, or the initial state and 0 when there is none."""
    if ckpt.latest_step() is None:
        if has_checkpoints(ckpt.directory):
            raise CheckpointError(
                f"{ckpt.directory} holds checkpoint folders but none is complete; "
                "pass --fresh to start this run over"
            )
        return state, 0
    restored, meta = ckpt.restore(state)
    restored = jax.tree.map(lambda like, x: np.asarray(x, like.dtype), state, restored)
    return restored, int(meta["step"])


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Prefetcher:
    """Prepares and places the batches of steps [start, stop) on a background thread."""

    def __init__(self, make_batch, place, start: int, stop: int, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.done = threading.Event()
        args = (make_batch, place, start, stop)
        self.thread = threading.Thread(target=self._fill, args=args, daemon=True)
        self.thread.start()

    def _fill(self, make_batch, place, start, stop):
        try:
            for step in range(start, stop):
                if not self._put(place(make_batch(step))):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(err)

    def _put(self, item) -> bool:
        while not self.done.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self):
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        """Stop the thread and wait for it: a thread killed inside XLA at exit aborts Python."""
        self.done.set()
        self.thread.join()


class _Loop:
    """The loop's state between steps: pending device metrics, timers, the progress bar."""

    def __init__(self, cfg: Config, stage: Stage, strategy, ckpt, logger, fns, main: bool):
        self.cfg, self.stage, self.strategy = cfg, stage, strategy
        self.ckpt, self.logger, self.main = ckpt, logger, main
        self.train_fn, self.eval_fn = fns
        self.pending: list[dict] = []
        self.last_saved = None
        self.initial_eval_loss = None
        self.step = 0
        self.last_good = 0
        self.eval_loss = None
        self.rollout_s = 0.0  # on-policy stages: seconds generating since the last log
        self.eval_record: dict = {}  # the last evaluation's metrics
        self.initial_eval: dict = {}
        self.tokens_per_step = cfg.train.batch_size * stage.tokens_per_example
        self.peak = aggregate_peak_flops(cfg.train.peak_flops, cfg.model.compute_dtype)

    def run(self, state, start: int) -> RunResult:
        cfg = self.cfg.train
        self.step = self.last_good = start
        if start >= cfg.steps:
            return RunResult("finished", start)
        end = min(cfg.steps, cfg.stop_at or cfg.steps)
        if start and cfg.stop_when and self.stage.evaluates:  # resumed: met already?
            self._evaluate(state)
            if self._target_met():
                return RunResult("finished", start, eval_loss=self.eval_loss, eval=self.eval_record)
        if end <= start:  # resumed with a train.stop_at already reached: nothing to do
            return RunResult(f"interrupted (train.stop_at={end})", start)
        # an on-policy stage's rows stay on the host: its rollout makes the batch from them
        place = (lambda rows: rows) if self.stage.rollout else self.strategy.shard_batch
        batches = Prefetcher(self.stage.train_batch, place, start, end, cfg.prefetch)
        bar = tqdm(
            total=cfg.steps,
            initial=start,
            disable=not (self.main and self.cfg.run.progress),
            desc=self.stage.name,
            dynamic_ncols=True,
        )
        try:
            state, status = self._steps(state, batches, bar, end)
        finally:
            batches.close()
            bar.close()
        return RunResult(
            status,
            self.step,
            eval_loss=self.eval_loss,
            initial_eval_loss=self.initial_eval_loss,
            eval=self.eval_record,
            initial_eval=self.initial_eval,
        )

    def _steps(self, state, batches, bar, end: int):
        cfg = self.cfg.train
        batch = self._next(batches, state)
        if cfg.eval_at_start and self.step == 0 and self.stage.evaluates:
            self._evaluate(state)
            self.initial_eval_loss, self.initial_eval = self.eval_loss, self.eval_record
        state, train_fn = self._compile(state, batch)
        self.timer, self.rollout_s = (time.perf_counter(), self.step), 0.0
        with StopRequested() as stop:
            while True:
                wait_for_previous_step(self.pending)
                state, metrics = train_fn(state, batch)
                self.pending.append(metrics)
                self.step += 1
                bar.update(1)
                last = self.step == cfg.steps
                if self.step == end and not last:
                    stop.signal = f"train.stop_at={end}"
                if self.step % cfg.log_every == 0 or last or stop:
                    self._log(bar)
                if self.stage.evaluates and (self.step % cfg.eval_every == 0 or last):
                    self._evaluate(state)
                    last = last or self._target_met()
                if self.step % cfg.checkpoint_every == 0 or last or stop:
                    self._save(state)
                if last or stop:
                    return state, "finished" if last else f"interrupted ({stop.signal})"
                batch = self._next(batches, state)

    def _next(self, batches, state) -> dict:
        """The next step's placed batch; an on-policy stage's rolled out with the current
        parameters (the previous step's result: this waits for it)."""
        rows = next(batches)
        if not self.stage.rollout:
            return rows
        start = time.perf_counter()
        params = self.strategy.unreplicate(state["params"])
        batch = self.strategy.shard_batch(self.stage.rollout(params, rows, self.step))
        self.rollout_s += time.perf_counter() - start
        return batch

    def _compile(self, state, batch):
        start = time.perf_counter()
        compiled = self.train_fn.lower(state, batch).compile()
        seconds = time.perf_counter() - start
        self.logger.log(self.step, {"compile_time_s": seconds, "peak_flops": self.peak})
        if self.main:
            tqdm.write(f"compiled the train step in {seconds:.1f} s")
        return state, compiled

    def _log(self, bar) -> None:
        """Fetch the metrics of the steps since the last log (a host sync) and write them."""
        if not self.pending:
            return
        steps = jax.device_get(self.strategy.unreplicate(self.pending))
        n = len(steps)
        self.pending = []
        losses = np.array([float(m["loss"]) for m in steps])
        first_bad = next((i for i, x in enumerate(losses) if not np.isfinite(x)), None)
        if first_bad is not None:
            bad_step = self.step - n + first_bad + 1
            raise TrainingError(
                f"non-finite loss ({losses[first_bad]}) at step {bad_step}; stopped. The last good "
                f"checkpoint is step {self.last_good} in {self.ckpt.directory}: lower optimizer.lr "
                "or raise optimizer.warmup_steps, then rerun to resume from it"
            )
        now = time.perf_counter()
        seconds = (now - self.timer[0]) / max(self.step - self.timer[1], 1)
        self.timer = (now, self.step)
        tokens_per_sec = self.tokens_per_step / seconds
        record = {
            "loss": float(losses.mean()),
            "lr": float(steps[-1]["lr"]),
            "grad_norm": float(steps[-1]["grad_norm"]),
            "tokens_per_sec": tokens_per_sec,
            "step_time_s": seconds,
            "mfu": tokens_per_sec * self.stage.flops_per_token / self.peak,
            "tokens": self.step * self.tokens_per_step,
        }
        for name in sorted(steps[-1].keys() - {"loss", "lr", "grad_norm"}):  # a stage's own metrics
            record[name] = float(np.mean([float(m[name]) for m in steps]))
        if self.stage.rollout:  # generation and the updates, apart
            record["rollout_s"] = self.rollout_s / n
            record["update_s"] = max(seconds - record["rollout_s"], 0.0)
            self.rollout_s = 0.0
        self.logger.log(self.step, record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_sec:,.0f}")

    def _target_met(self) -> bool:
        """Whether the last evaluation meets train.stop_when (an unknown metric is an error
        that names the evaluation's metrics)."""
        if not self.cfg.train.stop_when:
            return False
        metric, op, value = parse_stop_when(self.cfg.train.stop_when)
        if metric not in self.eval_record:
            raise TrainingError(
                f"train.stop_when: this stage's evaluation has no {metric!r}; it has "
                f"{', '.join(sorted(self.eval_record))}"
            )
        got = self.eval_record[metric]
        met = got >= value if op == ">=" else got <= value
        if met and self.main:
            tqdm.write(f"step {self.step}: {metric} {got:.4f} {op} {value} (train.stop_when)")
        return met

    def _evaluate(self, state) -> None:
        """The held-out loss (where the stage has eval batches) and the stage's own evaluation
        (where it has one), logged as one record."""
        record, text = {}, []
        if self.stage.eval_sets or self.stage.eval_batch:
            record = self._loss_record(state)
            text.append(f"eval loss {record['eval_loss']:.4f}")
        if self.stage.evaluate:
            extra = self.stage.evaluate(self.strategy.unreplicate(state["params"]))
            record.update(extra)
            text += [f"{k} {v:.4f}" for k, v in extra.items()]
        self._record_eval(record, ", ".join(text))

    def _loss_record(self, state) -> dict:
        sets = self.stage.eval_sets or {"": (self.stage.eval_batch, 1.0)}
        means = {name: self._eval_means(state, batches) for name, (batches, _) in sets.items()}
        total = sum(w for _, w in sets.values())
        # the loss and a stage's own metrics, each the sets' weighted mean
        record = {
            f"eval_{key}": sum(means[name][key] * w for name, (_, w) in sets.items()) / total
            for key in next(iter(means.values()))
        }
        loss = record["eval_loss"]
        if self.stage.perplexity:
            record["eval_perplexity"] = math.exp(min(loss, 700))
        if self.stage.eval_sets:
            record.update({f"eval_loss/{name}": value["loss"] for name, value in means.items()})
        if self.stage.bytes_per_token:
            record["eval_bits_per_byte"] = loss / math.log(2) / self.stage.bytes_per_token
        return record

    def _record_eval(self, record: dict, text: str) -> None:
        self.eval_loss = record.get("eval_loss")
        self.logger.log(self.step, record)
        self.eval_record = record
        if self.main:
            tqdm.write(f"step {self.step}: {text}")
        self.timer = (time.perf_counter(), self.step)  # eval time is not training time
        self.rollout_s = 0.0

    def _eval_means(self, state, batches) -> dict[str, float]:
        """{"loss": mean loss, NAME: mean of the stage's own metric NAME} over the eval batches."""
        totals = []
        for i in range(self.cfg.train.eval_batches):
            totals.append(self.eval_fn(state, self.strategy.shard_batch(batches(i))))
        totals = jax.device_get(self.strategy.unreplicate(totals))
        count = sum(float(t["count"]) for t in totals)
        means = {"loss": sum(float(t["loss_sum"]) for t in totals) / count}
        for name in totals[0]["extras"]:
            means[name] = sum(float(t["extras"][name]) for t in totals) / count
        return means

    def _save(self, state) -> None:
        self._log_pending_check()
        meta = {"step": self.step, "stage": self.stage.name}
        self.last_saved = to_host(self.strategy.unreplicate(state))
        self.ckpt.save(self.step, self.last_saved, meta)
        self.last_good = self.step
        self.timer = (time.perf_counter(), self.step)

    def _log_pending_check(self) -> None:
        """A checkpoint must never hold a non-finite state: check the steps not yet logged."""
        if self.pending:
            losses = jax.device_get(self.strategy.unreplicate([m["loss"] for m in self.pending]))
            if not all(np.isfinite(x) for x in losses):
                self._log(_NoBar())


class _NoBar:
    def set_postfix(self, **_):
        pass
