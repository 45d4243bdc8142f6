"""Section 10 of `make bench`: `lrexp eval`'s decode speed per policy and mode beside the model's own forward.

A Full row (the cache grid's) with random weights at the smoke and the tiny scale, the grid's budgets
decoded together as `lrexp eval` does. Each setting is timed twice over the same random segments: in the
layout `lrexp eval` packs (a Full row's segments side by side, lrexp.eval.passes) and in the data module's own
evaluation batch (the scale's eval lanes), the layout every step used to take. Tokens/s count the segment
tokens each setting scores: a pass's tokens times its settings over its time, as the evaluation table does.
Token mode is timed twice: the reference path (`BoundedDecoder`, mode `token`) and the token step
(`SlotDecoder`, mode `step`: what `lrexp eval` runs for every token-mode setting), whose rows say how many
times the reference's tokens/s they reach in the same run.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Dict, List, Tuple

import torch

from lrexp.cache import build_policy
from lrexp.cache.decode import BoundedDecoder
from lrexp.cache.step import SlotDecoder
from lrexp.config.load import load
from lrexp.eval.passes import PACK_LANES, PACK_LOGITS, block_of
from lrexp.model.lm import build_model
from lrexp.train.run import cpu_threads

BUDGETS = {"smoke": [8, 16, 32], "tiny": [8, 16, 32, 64]}  # experiments/grids/cache.yaml
BLOCK = {"smoke": 4, "tiny": 8}  # the grid's block mode b
VOCAB = {"smoke": 512, "tiny": 2048}
QUICK_LANES = 8  # --quick checks the section's shape in seconds, not the speed-up
# (policies, mode) timed: the FIFO policies in auto mode (blocks of W) and token by token, the
# scored ones by the reference token path, by the token step alone and all four in one token-step pass
# (what `lrexp eval` runs in token mode), and in blocks of b (approximate)
SETTINGS = [("window", "auto"), ("window", "token"), ("h2o", "token"), ("h2o", "step"), ("tova", "token"),
            ("tova", "step"), ("window+sinks+h2o+tova", "step"), ("sinks", "auto"), ("h2o", "block"),
            ("tova", "block")]


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _scale(scale: str, repeats: int, quick: bool) -> Tuple[List[List[str]], Dict]:
    cfg = load(overrides=[f"scale={scale}", "row=full", "model.attn.backend=reference"])
    torch.manual_seed(0)
    vocab, n = VOCAB[scale], cfg.derived.segment_len
    model = build_model(cfg, vocab).eval()
    base_lanes = cfg.derived.eval_lanes_per_rank
    budgets = BUDGETS[scale][:1] if quick else BUDGETS[scale]
    rows, data = [], {}

    def tokens(lanes):
        return torch.randint(0, vocab, (lanes, n), generator=torch.Generator().manual_seed(1))

    most = QUICK_LANES if quick else PACK_LANES
    packed = max(base_lanes, min(most, PACK_LOGITS // (n * vocab)))
    x = tokens(packed)
    with torch.no_grad():
        native = _time(lambda: model(x, model.initial_state(packed, "cpu")), repeats)
    rows.append([scale, "full", "native forward", "-", f"{packed * n / native:,.0f}", "-", "-", "-"])
    data["native"] = packed * n / native
    for name, mode in SETTINGS[2:4] if quick else SETTINGS:
        step = mode == "step"
        p = replace(cfg, policy=replace(cfg.policy, mode="token" if step else mode,
                                        block=BLOCK[scale] if mode == "block" else None))
        policies = [build_policy(one, c, p.policy) for one in name.split("+") for c in budgets]
        block = block_of(p, policies[0], n)
        if step:
            decoder = SlotDecoder(model, policies, context=n)
        else:
            decoder = BoundedDecoder(model, policies, context=n, block=block)
        speeds = []
        for lanes in (max(1, min(most, PACK_LOGITS // (len(policies) * block * vocab))), base_lanes):
            t = tokens(lanes)
            labels, mask, start = t.roll(-1, 1), torch.ones_like(t, dtype=torch.bool), torch.ones(lanes, dtype=torch.bool)
            seconds = _time(lambda: decoder.score(t, labels, mask, decoder.initial_state(lanes, "cpu"), start), repeats)
            speeds.append((lanes, lanes * n * len(policies) / seconds))
        (lanes, fast), (_, before) = speeds
        reference = data.get(f"{name}:token", {}).get("tokens_per_s") if step else None
        rows.append([scale, name, "token step" if step else f"{mode}, b = {block}", str(lanes), f"{fast:,.0f}",
                     f"{before:,.0f}", f"{fast / before:.1f}x", f"{fast / reference:.1f}x" if reference else "-"])
        data[f"{name}:{mode}"] = {"block": block, "lanes": lanes, "tokens_per_s": fast,
                                  "tokens_per_s_eval_lanes": before, "native_ratio": fast / data["native"]}
        if reference:
            data[f"{name}:{mode}"]["vs_token"] = fast / reference
    return rows, data


def eval_section(quick: bool, repeats: int = 2) -> Tuple[List[str], Dict]:
    """(markdown lines, data): the table of both scales (smoke only with --quick), timed with the threads
    `lrexp eval` takes (`cpu_threads`: one core left free; a thread more than the free cores makes every
    small operator of a token step wait on a preempted one)."""
    table, data = [], {}
    threads = torch.get_num_threads()
    for scale in ("smoke",) if quick else ("smoke", "tiny"):
        torch.set_num_threads(cpu_threads(load(overrides=[f"scale={scale}"])))
        try:
            rows, data[scale] = _scale(scale, repeats, quick)
        finally:
            torch.set_num_threads(threads)
        table += rows
    lines = ["| scale | policy | mode | lanes | tokens/s | at the eval lanes | speed-up | vs the token reference |",
             "|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in table]
    return lines, data
