"""`run(cfg) -> final metrics`: one training run, the one place a Trainer is built.

Order: `check_run` (a config that cannot start fails in one line, in a second), the MLflow run (a store
that cannot be written fails before any work, and every later failure is recorded on the run), then the
data, the model and the Lightning objects, then `fit` (with validations of `train.val_tokens` targets), the
final passes over the whole validation and test splits (`final/val_*`, `final/test_*`: every target of
every document but its first, the same for every row of a grid, docs/models.md#evaluation), and the `final/*` summary.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from lrexp.config.load import load
from lrexp.config.schema import RunConfig
from lrexp.runtime.cpus import usable_cpus
from lrexp.runtime.heap import keep_freed_memory
from lrexp.errors import Interrupted
from lrexp.data_modules import StreamDataModule, prepare
from lrexp.data_modules.datamodule import eval_pass
from lrexp.lit import checkpoint as ckpt_mod
from lrexp.lit import run_logger
from lrexp.lit.module import LMModule
from lrexp.lit.perf import PerfCallback
from lrexp.lit.progress import ProgressFile, ProgressLines, use_bar
from lrexp.lit.saving import LastCheckpoint
from lrexp.lit.seeding import StepSeedCallback
from lrexp.lit.tbptt import TBPTTCallback
from lrexp.model.lm import build_model
from lrexp.tracking.names import TAG_BACKEND, TAG_CHECKPOINT_DIR, TAG_PRECISION, process_tags
from lrexp.train.auto import resolve_auto, train_device
from lrexp.runtime.signals import StopSignals, name
from lrexp.train.validate import check_run, short_run_note

# Metrics summarised as final/* at the end of a run (the final passes log their own final/val_*, final/test_*).
_SUMMARY_PREFIXES = ("train/loss", "perf/")


def cpu_threads(cfg: RunConfig) -> int:
    """train.threads, else $OMP_NUM_THREADS, else all usable CPUs but one, shared by this machine's ranks.

    Measured at the tiny scale on 2 cores (s/step): idle, 1 thread 0.149, 2 threads 0.106, 4 threads 1.49;
    with two other processes busy, 1 thread 0.148 and 2 threads 0.54 to 1.38. A thread more than the free
    cores costs several times over (OpenMP threads wait on a preempted one), a thread fewer than the cores
    at most cores / (cores - 1) (1.4 measured on 2): one core is left to the data loader, the logger and
    whoever else shares the machine."""
    if cfg.train.threads is not None:
        return cfg.train.threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (usable_cpus() - 1) // cfg.train.devices)


def build_trainer(
    cfg: RunConfig, logger: Optional[MLFlowLogger], last: LastCheckpoint, callbacks: Sequence[pl.Callback]
) -> pl.Trainer:
    t = cfg.train
    perf = PerfCallback(cfg.data.tokens_per_step, warmup_steps=cfg.log.perf_warmup_steps)
    progress: List[pl.Callback] = []
    if cfg.log.progress_file:
        progress.append(ProgressFile(Path(cfg.log.progress_file), cfg.data.tokens_per_step))
    bar = use_bar(cfg.log.progress_bar)
    if not bar and cfg.log.progress_every_s:
        progress.append(ProgressLines(cfg.log.progress_every_s, cfg.data.tokens_per_step))
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        max_steps=t.max_steps,
        accumulate_grad_batches=t.lane_groups,  # one micro-batch per lane group
        gradient_clip_val=cfg.optim.grad_clip or None,
        gradient_clip_algorithm="norm",
        # validation every val_every optimiser steps, counted over epochs (check_val_every_n_epoch=None)
        val_check_interval=t.val_every * t.lane_groups,
        check_val_every_n_epoch=None,
        log_every_n_steps=cfg.log.every_n_steps,
        logger=logger if logger is not None else False,
        callbacks=[StepSeedCallback(t.seed), *callbacks, perf, *progress, last],
        plugins=[last.io],
        use_distributed_sampler=False,  # the data module deals whole lanes to ranks itself
        deterministic="warn" if t.deterministic else False,  # warn, not fail, on ops without one (GPU)
        enable_progress_bar=bar,
        default_root_dir=last.dirpath,
    )


def _summary(metrics: Dict[str, Any]) -> Dict[str, float]:
    """train/loss -> final/train_loss; perf/step_time_s -> final/step_time_s."""
    return {
        "final/" + key.removeprefix("perf/").replace("/", "_"): float(value)
        for key, value in sorted(metrics.items())
        if key.startswith(_SUMMARY_PREFIXES)
    }


def eval_tags(cfg: RunConfig, prepared) -> Dict[str, str]:
    """Digests of the targets each evaluation scores, so a reader can check that runs match (docs/models.md#evaluation)."""
    tags = {}
    for evaluation, split, budget in (("val", "validation", None), ("test", "test", None),
                                      ("val_budget", "validation", cfg.train.val_tokens)):
        scored = eval_pass(prepared, split, budget)
        tags[f"lrexp.eval.{evaluation}_targets"] = str(scored.targets)
        tags[f"lrexp.eval.{evaluation}_docs_hash"] = scored.docs_hash
    return tags


def run(cfg: RunConfig, resume: Optional[str] = None, callbacks: Sequence[pl.Callback] = ()) -> Dict[str, Any]:
    """Train one run; returns {"run_id", "checkpoint", "final/...": value}. `resume`: a checkpoint file or
    run id; the run continues the same MLflow run, exactly when the world size is unchanged. `callbacks`:
    more of them for the Trainer (the benchmark's step clock)."""
    check_run(cfg)  # before the MLflow run: a config that cannot start is one line, not a FAILED run
    cfg = resolve_auto(cfg)  # precision and backend `auto` by the device, once: params and tags hold the result
    if cfg.model.attn.deterministic and cfg.model.attn.backend == "triton":
        from lrexp.kernels.attention.op import fix_configs  # needs triton, which only this backend imports

        fix_configs()
    note = short_run_note(cfg)
    if note and rank_zero_only.rank == 0:
        print(note, file=sys.stderr, flush=True)
    threads = cpu_threads(cfg)
    torch.set_num_threads(threads)  # before the model exists: the CLI, unlike the tests, sets no OMP_NUM_THREADS
    if cfg.train.keep_freed_memory and train_device(cfg) == "cpu":
        keep_freed_memory()  # before the first step's large blocks (docs/configuration.md#threads)
    info = ckpt_mod.read(ckpt_mod.locate(resume, cfg.train.checkpoint_dir, say=_say)) if resume else None
    if info is not None:
        ckpt_mod.check_compatible(cfg, info)
    logger = run_logger.open_run(cfg, resume_run_id=info.run_id if info else None)
    run_id = logger.run_id
    checkpoint_dir = ckpt_mod.run_dir(cfg, str(run_id))
    last: Optional[LastCheckpoint] = None

    def stop_unless_training(signum: int) -> None:
        # while training, `last` stops at the end of the optimiser step with a checkpoint; elsewhere at once
        if last is None or not last.training:
            raise Interrupted(signum, f"stopped by {name(signum)}")

    with StopSignals(stop_unless_training) as signals:
        try:
            # first: a grid's --resume tells a run that still trains from one left RUNNING by a dead process
            run_logger.set_tags(logger, {TAG_CHECKPOINT_DIR: str(checkpoint_dir), **process_tags()})
            pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
            prepared = prepare(cfg)
            if info is not None:
                ckpt_mod.check_compatible(cfg, info, prepared.vocab_size)
            model = build_model(cfg, prepared.vocab_size)
            if cfg.train.compile:
                model.compile()  # in place: the checkpoint's keys are the eager model's
            n_params = sum(p.numel() for p in model.parameters())
            run_logger.set_tags(logger, {TAG_BACKEND: model.backend, TAG_PRECISION: cfg.train.precision,
                                         "lrexp.threads": str(threads),
                                         **eval_tags(cfg, prepared)})
            run_logger.log_artifact_dict(logger, prepared.meta, "data_meta.json")

            tbptt = TBPTTCallback(cfg.train.lane_groups, cfg.train.offload_state)
            module = LMModule(cfg, model, tbptt, prepared.vocab_size)
            datamodule = StreamDataModule(cfg)
            t = cfg.train
            last = LastCheckpoint(checkpoint_dir, t.checkpoint_every or t.val_every, t.checkpoint_minutes, signals,
                                  t.keep_checkpoints)
            trainer = build_trainer(cfg, logger, last, [tbptt, *callbacks])
            trainer.fit(module, datamodule=datamodule, ckpt_path=info.path if info else None, weights_only=True)
            if signals.received is not None:  # during the last step: its checkpoint is saved
                signum = signals.received
                raise Interrupted(signum, f"stopped by {name(signum)} at step {trainer.global_step}")
            metrics = dict(trainer.callback_metrics)
            # Rank 0's run id names the folder on every rank (ModelCheckpoint broadcasts its dirpath).
            checkpoint_dir = Path(trainer.checkpoint_callback.dirpath)
            # Under ddp_fork / ddp_spawn the main process's trainer never sees the workers' step (it stays 0,
            # docs/design.md#tests; max_steps > 0 otherwise): the final checkpoint holds it.
            steps = trainer.global_step or ckpt_mod.newest(checkpoint_dir).step
            summary = _summary(metrics)
            summary["final/params"] = float(n_params)
            # the floats a lane carries between steps, in model.state_dtype (docs/knobs.md#state-storage-dtype); meta: nothing allocated
            summary["final/state_bytes_per_lane"] = float(model.initial_state(1, "meta").carried_bytes())
            summary["final/steps"] = float(steps)
            summary["final/tokens_seen"] = float(steps * cfg.data.tokens_per_step)
            # the final passes log final/val_* and final/test_* themselves
            trainer.validate(module, datamodule=datamodule, verbose=False)
            passes = dict(trainer.callback_metrics)
            trainer.test(module, datamodule=datamodule, verbose=False)  # the split the paper reports
            passes.update(trainer.callback_metrics)
            final = {**{k: float(v) for k, v in passes.items() if k.startswith("final/")}, **summary}
            run_logger.finish(logger, summary, steps)
        except Interrupted as exc:
            hint = (f"continue with: lrexp train --resume {run_id}" if ckpt_mod.saved(checkpoint_dir)
                    else "no checkpoint yet: train it again")
            stopped = Interrupted(exc.signum, f"{exc}; {hint}")
            run_logger.fail(logger, stopped)
            raise stopped from None
        except BaseException as exc:
            run_logger.fail(logger, exc)
            raise
    return {"run_id": run_id, "checkpoint": str(checkpoint_dir / ckpt_mod.LAST), **final}


def _say(line: str) -> None:
    print(f"lrexp train: {line}", file=sys.stderr, flush=True)


def resume_config(resume: str, files: Sequence[str], overrides: Sequence[str]) -> Tuple[RunConfig, Path]:
    """The config of a resumed run: the checkpoint's config, then the given files and overrides on top
    (say `train.max_steps=...`). The checkpoint folder is found with the checkpoint_dir they give."""
    path = ckpt_mod.locate(resume, load(files, overrides).train.checkpoint_dir)
    info = ckpt_mod.read(path)
    return load([(f"checkpoint {path}", ckpt_mod.resume_config_dict(info)), *files], overrides), path

