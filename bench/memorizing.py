"""Memorizing row benchmark: step time against Slide:13L, and the kNN memory's footprint per lane.

    python bench/memorizing.py [--steps 5] [key=value ...]      (default: the tiny scale)

Times one training step (forward + backward of every lane's segment, state detached between steps, as
bench/model_step_time.py does) of XL:W (the row's backbone), Slide:13L and the Memorizing row with each
selection backend, and prints each one's ratio to Slide:13L. The memory's selection visits every slot
whether filled or not, so an empty memory costs what a full one does. Then the bytes of the carried kNN
memory per lane (keys, values, pointer, count; XL cache excluded) at this scale and at paper scale, in every
`knn.state_dtype`. Writes reports/bench/memorizing.md.
"""

from __future__ import annotations

import argparse
import platform

import torch

from lrexp import config
from lrexp.layers.memorizing import STATE_DTYPES, MemorizingLayer
from lrexp.variants import layer_specs, row_name
from model_step_time import step_time  # bench/ is the script's folder, so on sys.path
from report import write_report


def memory_bytes_per_lane(overrides: list[str]) -> int:
    """Bytes of one lane's kNN memories (every memory layer) under these overrides, counted on the meta device."""
    cfg = config.load(overrides=["row=mem64k", *overrides])
    total = 0
    for spec in layer_specs(cfg):
        if spec.kind != "memorizing":
            continue
        with torch.device("meta"):  # sizes only: no weights, no memory allocated
            layer = MemorizingLayer(spec, cfg, cfg.model.attn.backend)
            state = layer.initial_state(1, "meta")
        total += sum(getattr(state, f).numel() * getattr(state, f).element_size()
                     for f in ("memory_k", "memory_v", "pointer", "count"))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = [f"# Memorizing row ({platform.node()}, {device}, torch {torch.__version__})", ""]

    timed = {}
    for label, overrides in (
        ("slide13", ["row=slide13"]), ("xl512", ["row=xl512"]),
        ("mem64k bucket", ["row=mem64k", "model.knn.backend=bucket"]),
        ("mem64k exact", ["row=mem64k", "model.knn.backend=exact"]),
    ):
        cfg = config.load(overrides=[*overrides, *args.overrides])
        knn = cfg.model.knn
        memory = f"{knn.memory_size} x k={knn.k}" if cfg.derived.knn_layers else "-"
        seconds = step_time(cfg, device, args.steps, cfg.derived.lanes, cfg.derived.segment_len)
        timed[label] = (row_name(cfg), cfg.derived.lanes, cfg.derived.segment_len, memory, seconds)
    base = timed["slide13"][4]
    scale = config.load(overrides=args.overrides).scale.name
    lines += [f"Training step time at scale {scale} ({args.steps} steps after one warm-up)", "",
              "| run | row | lanes x N | memory x k | step s | vs Slide:13L |", "|---|---|---|---|---|---|"]
    for label, (name, lanes, n, memory, seconds) in timed.items():
        lines.append(f"| {label} | {name} | {lanes} x {n} | {memory} | {seconds:.4f} | {seconds / base:.2f} |")

    lines += ["", "Carried kNN memory per lane (keys + values + pointer + count, all memory layers)", "",
              "| scale | state_dtype | MiB per lane | MiB for all lanes of a device |", "|---|---|---|---|"]
    for name in dict.fromkeys([scale, "paper"]):
        lanes = config.load(overrides=[f"scale={name}", "row=mem64k"]).derived.lanes_per_rank
        for dtype in STATE_DTYPES:
            per_lane = memory_bytes_per_lane([f"scale={name}", f"model.knn.state_dtype={dtype}"]
                                             + (args.overrides if name == scale else []))
            lines.append(f"| {name} | {dtype} | {per_lane / 2 ** 20:.2f} | {lanes * per_lane / 2 ** 20:.1f} |")

    write_report("memorizing", lines)


if __name__ == "__main__":
    main()
