"""What every section of the benchmark times: one training step of a row's model, timed round-robin.

A step is what `LMModule.training_step` does under Lightning, without Lightning: reset the lanes that start a
document, forward one segment of every lane, the masked token NLL summed over the step's targets, backward,
gradient clipping when configured, the configured optimiser and schedule. The carried state goes from one
step to the next (the model returns it detached: the truncation boundary).

Timings of different things are interleaved: every repeat runs each of them once, in an order rotated by one
per repeat, so a burst of load from the other users of a shared machine lands on all of them alike; ratios
are taken within a repeat, then their median and range reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from lrexp.lit.metrics import token_nll
from lrexp.lit.optim import build_optimizer, build_scheduler
from lrexp.model.lm import build_model

VOCAB = 2048  # the tiny scale's BPE


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(lanes: int, seg_len: int, vocab: int, device: torch.device,
                    seed: int = 0) -> Dict[str, torch.Tensor]:
    """A batch with the data module's fields: random tokens and labels, every target counted, no document start."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (lanes, seg_len + 1), generator=g)  # [B, N + 1]
    return {
        "tokens": tokens[:, :-1].to(device),  # [B, N]
        "labels": tokens[:, 1:].to(device),  # [B, N]
        "loss_mask": torch.ones(lanes, seg_len, dtype=torch.bool, device=device),  # [B, N]
        "doc_start": torch.zeros(lanes, dtype=torch.bool, device=device),  # [B]
        "step_targets": torch.tensor(lanes * seg_len, device=device),
    }


class TrainStep:
    """One optimiser step of `cfg`'s model per call, on `batch` (a fixed synthetic one) or the batch given;
    `compile`: a torch.compile backend for the model."""

    def __init__(self, cfg, device: torch.device, vocab: int = VOCAB, lanes: Optional[int] = None,
                 seg_len: Optional[int] = None, seed: int = 0, compile: Optional[str] = None) -> None:
        torch.manual_seed(seed)
        self.cfg = cfg
        self.device = device
        self.lanes = lanes or cfg.derived.lanes_per_rank
        self.seg_len = seg_len or cfg.derived.segment_len
        self.model = build_model(cfg, vocab).to(device).train()
        if compile is not None:  # a torch.compile backend, as `train.compile` does with inductor
            self.model.compile(backend=compile)
        self.optimizer = build_optimizer(cfg, self.model.named_parameters())
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.state = self.model.initial_state(self.lanes, device)
        self.batch = synthetic_batch(self.lanes, self.seg_len, vocab, device, seed)

    @property
    def tokens(self) -> int:
        return self.lanes * self.seg_len

    def __call__(self, batch: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        batch = self.batch if batch is None else batch
        state = self.state.reset_rows(batch["doc_start"])
        logits, self.state = self.model(batch["tokens"], state)  # [B, N, V]
        nll = token_nll(logits, batch["labels"], batch["loss_mask"])  # [B, N]
        loss = nll.sum() / batch["step_targets"].clamp(min=1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()


# What `timed` reads: wall time (the default), or with `bench.py --clock process` the CPU time of this process,
# all its threads together. On a CPU shared with other work the process clock leaves out the time the step
# waited for a core, which the wall clock counts: with one torch thread a step's CPU seconds are its wall
# seconds on an idle machine. The dense matmul that MFU is relative to is timed by the same clock.
CLOCKS: Dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}
clock = CLOCKS["wall"]


def use_clock(name: str) -> None:
    global clock
    clock = CLOCKS[name]


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    started = clock()
    fn()
    sync(device)
    return clock() - started


def round_robin(fns: Dict[str, Callable[[], object]], repeats: int, device: torch.device,
                warmup: int = 1) -> Dict[str, List[float]]:
    """Seconds of each call, `repeats` per name, every repeat running each name once in a rotated order."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):  # allocator growth, caches, compilation
            timed(fns[name], device)
    seconds: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds[name].append(timed(fns[name], device))
    return seconds


def summary(values: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratios(values: List[float], base: List[float]) -> Dict[str, float]:
    """Median and range of the per-repeat ratios values[r] / base[r] (timed in the same repeat)."""
    return summary([v / b for v, b in zip(values, base)])


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the tensors autograd saves for backward during one call: the activation memory of a step,
    counted per storage (views of one storage once). CPU allocators keep no peak statistics; on a GPU the
    caller reports torch.cuda.max_memory_allocated besides."""
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())
