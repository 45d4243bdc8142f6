"""Sections 4, 5 and 8 of `make bench`: `lrexp train` against a bare torch loop, data preparation and the
loader's share of a step, and the Memorizing row's kNN memory per lane."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import lightning.pytorch as pl
import numpy as np
import torch

from harness import TrainStep, summary, sync
from lrexp.config.load import load
from lrexp.data_modules import StreamDataModule, prepare
from lrexp.data_modules.tokenizer import BPE_FILE
from lrexp.layers.memorizing import STATE_DTYPES, MemorizingLayer
from lrexp.model.variants import layer_specs, row_name
from lrexp.runtime.cpus import usable_cpus
from lrexp.train.run import run as train_run
from report import ms

# ---- 4 and 5: Lightning against a bare loop, the loader's share ---------------------------------------


class StepClock(pl.Callback):
    """Seconds from one training batch's start to the next's: everything a step of the loop costs
    (loading, forward, backward, optimiser, callbacks, logging)."""

    def __init__(self) -> None:
        self.starts: List[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(pl_module.device)
        self.starts.append(time.perf_counter())

    def intervals(self, warmup: int) -> List[float]:
        return list(np.diff(self.starts))[warmup:]


def bare_loop(cfg, device: torch.device, vocab: int, steps: int, warmup: int) -> Tuple[List[float], List[float]]:
    """(batch-to-batch seconds, loading seconds) of the same steps without Lightning: the data module's
    batches, the same model initialisation and optimiser, TBPTT by hand."""
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)  # as lrexp train seeds before the model
    step = TrainStep(cfg, device, vocab=vocab, seed=cfg.train.seed)
    dm = StreamDataModule(cfg, world_size=1, rank=0)
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    starts, loading = [], []
    for _ in range(steps + 1):
        sync(device)
        starts.append(time.perf_counter())
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(loader).items()}
        loading.append(time.perf_counter() - starts[-1])
        step(batch)
    return list(np.diff(starts))[warmup:], loading[warmup:steps]


def overhead_section(overrides: List[str], device: torch.device, steps: int, warmup: int,
                     workdir: Path) -> Tuple[List[str], Dict]:
    run_overrides = [  # a 3 MB subset unless given: the final passes over the whole splits stay short
        "row=slide13", "data.max_bytes=3000000", *overrides,
        f"train.max_steps={steps + 1}", f"train.val_every={steps + 1}",
        f"train.checkpoint_dir={workdir / 'checkpoints'}", f"log.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
        "log.progress_bar=false", "log.experiment=bench", f"train.accelerator={device.type}",
    ]
    cfg = load(overrides=run_overrides)
    vocab = prepare(cfg).vocab_size
    threads = torch.get_num_threads()
    bare, loading = bare_loop(cfg, device, vocab, steps, warmup)  # before and after: the drift shows as range
    clock = StepClock()
    train_run(load(overrides=[*run_overrides, f"train.threads={threads}"]), callbacks=[clock])
    torch.set_num_threads(threads)
    bare2, loading2 = bare_loop(cfg, device, vocab, steps, warmup)
    lit = clock.intervals(warmup)[:steps - warmup]
    bare_all, loading_all = bare + bare2, loading + loading2
    b, l_ = summary(bare_all), summary(lit)
    data = {"row": row_name(cfg), "tokens_per_step": cfg.data.tokens_per_step, "steps_timed": len(lit),
            "lrexp_train_step_s": l_, "bare_step_s": b,
            "overhead": l_["median"] / b["median"] - 1,
            "lrexp_train_tokens_per_s": cfg.data.tokens_per_step / l_["median"],
            "bare_tokens_per_s": cfg.data.tokens_per_step / b["median"],
            "loader_s": summary(loading_all), "loader_share": summary(loading_all)["median"] / b["median"]}
    lines = [
        f"{row_name(cfg)} at {cfg.derived.lanes_per_rank} lanes x N {cfg.derived.segment_len}, {steps} steps after "
        f"{warmup} left out; bare loop before and after `lrexp train` (pooled), batch start to batch start:", "",
        "| loop | step ms | tokens/s |", "|---|---|---|",
        f"| lrexp train (Lightning, TBPTT, metrics, MLflow) | {ms(l_)} | {data['lrexp_train_tokens_per_s']:,.0f} |",
        f"| bare torch loop | {ms(b)} | {data['bare_tokens_per_s']:,.0f} |", "",
        f"Overhead of lrexp train: {100 * data['overhead']:+.1f}% (median against median; goal at most +5%).", "",
    ]
    return lines, data


def data_section(overrides: List[str], repeats: int, loader: Optional[Dict]) -> Tuple[List[str], Dict]:
    """A cold `prepare` of the corpus into an empty cache with 1 worker and with every usable CPU, alternated;
    the tokenizer is the cached one's (data.tokenizer_file), so both time listing, reading, encoding and writing."""
    cfg = load(overrides=overrides)
    cached = prepare(cfg)
    tokenizer = cached.dir / BPE_FILE
    extra = [f"data.tokenizer_file={tokenizer}"] if tokenizer.is_file() else []
    counts = sorted({1, usable_cpus()})
    seconds: Dict[int, List[float]] = {n: [] for n in counts}
    megabytes = cached.meta["bytes"] / 1e6
    for _ in range(repeats):
        for n in counts:
            with tempfile.TemporaryDirectory() as tmp:
                cold = load(overrides=[*overrides, *extra, f"data.cache_dir={tmp}", f"data.prepare_workers={n}"])
                started = time.perf_counter()
                prepare(cold)
                seconds[n].append(time.perf_counter() - started)
    data = {"corpus": cfg.data.corpus, "megabytes": megabytes, "documents": cached.meta["documents"],
            "tokens": cached.meta["tokens"],
            "prepare": {str(n): {"seconds": summary(s), "mb_per_s": megabytes / summary(s)["median"]}
                        for n, s in seconds.items()},
            "loader_ms": loader and {k: v * 1e3 for k, v in loader["loader_s"].items()},
            "loader_share": loader and loader["loader_share"]}
    lines = [f"Cold `lrexp data prepare` of {cfg.data.corpus} ({megabytes:.1f} MB, {data['documents']} documents, "
             f"{data['tokens']:,} tokens{'; the cached tokenizer, so no BPE training' if extra else ''}), "
             f"{repeats} alternated runs:", "",
             "| workers | seconds | MB/s |", "|---|---|---|"]
    for n in counts:
        d = data["prepare"][str(n)]
        lines.append(f"| {n} | {d['seconds']['median']:.2f} ({d['seconds']['min']:.2f}-{d['seconds']['max']:.2f}) | "
                     f"{d['mb_per_s']:.2f} |")
    lines += ["", f"Loader: {ms(loader['loader_s'])} ms per batch (num_workers=0, in the bare loop of section 4), "
              f"{100 * loader['loader_share']:.2f}% of a step." if loader else "Loader: section 4 left out.", ""]
    return lines, data


# ---- 8: kNN memory -----------------------------------------------------------------------------------


def memory_bytes_per_lane(overrides: List[str]) -> int:
    """Bytes of one lane's kNN memories (every memory layer), counted on the meta device."""
    cfg = load(overrides=["row=mem64k", *overrides])
    total = 0
    for spec in layer_specs(cfg):
        if spec.kind != "memorizing":
            continue
        with torch.device("meta"):  # sizes only: nothing allocated
            state = MemorizingLayer(spec, cfg, cfg.model.attn.backend).initial_state(1, "meta")
        total += sum(getattr(state, f).numel() * getattr(state, f).element_size()
                     for f in ("memory_k", "memory_v", "pointer", "count"))
    return total


def knn_section(overrides: List[str], scale: str) -> Tuple[List[str], Dict]:
    lines = ["| scale | state_dtype | MiB per lane | MiB for all lanes of a device |", "|---|---|---|---|"]
    data = {}
    for name in dict.fromkeys([scale, "paper"]):
        lanes = load(overrides=[f"scale={name}", "row=mem64k"]).derived.lanes_per_rank
        for dtype in STATE_DTYPES:
            per_lane = memory_bytes_per_lane([f"scale={name}", f"model.knn.state_dtype={dtype}"]
                                             + ([o for o in overrides if not o.startswith("scale=")]
                                                if name == scale else []))
            data[f"{name}/{dtype}"] = per_lane
            lines.append(f"| {name} | {dtype} | {per_lane / 2 ** 20:.2f} | {lanes * per_lane / 2 ** 20:.1f} |")
    return lines, data
