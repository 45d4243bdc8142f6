"""Data benchmark: prepare wall time, tokenization MB/s and the loader's share of step time.

    python bench/data_throughput.py [key=value ...]      (default: the tiny scale, the stdlib corpus)

Prints the numbers and writes reports/bench/data.md. `prepare` runs into a fresh temporary cache, so the
time is a cold build (listing, BPE training, encoding, writing); the cache hit is timed after it. The loader
share is the time to draw a training batch over the time of a training step of the configured row's model
(target: under 2%).
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lrexp import config  # noqa: E402
from lrexp.data_modules import StreamDataModule, prepare  # noqa: E402
from lrexp.data_modules.corpora import list_corpus  # noqa: E402
from lrexp.data_modules.store import _texts, cache_root, select_budget  # noqa: E402
from lrexp.data_modules.tokenizer import ByteTokenizer, tokenizers_parallelism  # noqa: E402
from lrexp.model import build_model  # noqa: E402
from lrexp.variants import row_name  # noqa: E402
from report import write_report  # noqa: E402  (bench/ is the script's folder, so on sys.path)


def tokenization_mb_s(tokenizer, texts) -> float:
    total = sum(len(t.encode("utf-8")) for t in texts)
    started = time.perf_counter()
    with tokenizers_parallelism():
        for i in range(0, len(texts), 256):
            tokenizer.encode_batch(texts[i: i + 256])
    return total / 1e6 / (time.perf_counter() - started)


def step_model(cfg, vocab_size: int):
    """One training step of the configured row's model, with its state carried as in training."""
    model = build_model(cfg, vocab_size)
    state = model.initial_state(cfg.derived.lanes_per_rank, torch.device("cpu"))

    def step(tokens):
        nonlocal state
        logits, state = model(tokens, state)
        return logits

    return step, list(model.parameters()), f"lrexp.model ({row_name(cfg)})"


def main(argv) -> int:
    overrides = list(argv)
    cfg = config.load(overrides=overrides)
    lines = ["# Data benchmark", "", f"{platform.node()} | {os.cpu_count()} CPUs | torch {torch.__version__} | "
             f"scale {cfg.scale.name} | corpus {cfg.data.corpus} | tokenizer {cfg.data.tokenizer}", ""]

    with tempfile.TemporaryDirectory() as tmp:
        cold = config.load(overrides=overrides + [f"data.cache_dir={tmp}"])
        started = time.perf_counter()
        prepared = prepare(cold)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        prepare(cold)
        hit_s = time.perf_counter() - started
        meta = prepared.meta
        listing = list_corpus(cold, cache_root(cold))
        docs = select_budget(listing.documents, cold.data.max_bytes)
        texts = [t for t in _texts(docs) if t]
        bpe_mb_s = tokenization_mb_s(prepared.tokenizer, texts)
        bytes_mb_s = tokenization_mb_s(ByteTokenizer(), texts)

    lines += [
        "## prepare (cold build into an empty cache, then a cache hit)", "",
        "| corpus | documents | tokens | MB (UTF-8) | bytes/token | build s | cache hit s |",
        "|---|---|---|---|---|---|---|",
        f"| {meta['corpus']} | {meta['documents']} | {meta['tokens']:,} | {meta['bytes'] / 1e6:.1f} | "
        f"{meta['bytes'] / meta['tokens']:.2f} | {build_s:.1f} | {hit_s:.3f} |", "",
        "## tokenization throughput (encode only)", "",
        "| tokenizer | MB/s |", "|---|---|",
        f"| {prepared.tokenizer.kind} (vocab {prepared.vocab_size}) | {bpe_mb_s:.2f} |",
        f"| bytes (reference) | {bytes_mb_s:.1f} |", "",
    ]

    # Loader share at this scale: draw a batch vs run a step (forward + backward + SGD update).
    prepared = prepare(cfg)
    dm = StreamDataModule(cfg, world_size=1, rank=0)
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    step, params, step_name = step_model(cfg, prepared.vocab_size)
    optim = torch.optim.SGD(params, lr=1e-3)
    warmup, measured = 3, 20
    load_s = step_s = 0.0
    for i in range(warmup + measured):
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        logits = step(batch["tokens"])
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
        loss = (nll * batch["loss_mask"].flatten()).sum() / batch["loss_mask"].sum().clamp(min=1)
        optim.zero_grad()
        loss.backward()
        optim.step()
        t2 = time.perf_counter()
        if i >= warmup:
            load_s += t1 - t0
            step_s += t2 - t1
    share = load_s / (load_s + step_s)
    lines += [
        "## loader share of step time (num_workers=0, one process)", "",
        f"lanes {cfg.derived.lanes_per_rank} x N {cfg.derived.segment_len}; step: {step_name}", "",
        "| loader ms/batch | step ms | loader share | target |", "|---|---|---|---|",
        f"| {1e3 * load_s / measured:.3f} | {1e3 * step_s / measured:.1f} | {100 * share:.2f}% | < 2% |", "",
    ]
    write_report("data", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
