"""The claims behind the optional recurrent knobs (docs/knobs.md#status-of-the-claims) measured on the runs of grid `knobs`, at the grid's scale.

    python scripts/knobs_claims.py [--tokens 262144] [--drift-tokens 65536] [--out docs/results/knobs-tiny]

Reads the latest invocation of `lrexp grid knobs` from MLflow (run it first), then:

- for each row (XL:W, Rec:fixed:skip), its baseline cell's trained weights (fp32 state, no compression, no
  curriculum) stream the first --tokens tokens of the validation split as one lane (batch 1, segments of the
  row's N, the state carried across them, never reset: documents follow each other with their <eos>), once
  per storage / compression setting, each in a fresh process: tokens/s, bits/token, carried-state bytes,
  the process's peak resident memory and the stream's share of it (the peak minus the resident memory
  before the stream), the retained energy E_k and error of the compression, and the mean |delta logits|
  against fp32 storage over the first --drift-tokens tokens;
- from the grid's runs: bits/token when trained with each knob, training peak memory, and the curriculum's
  convergence (tokens and wall-clock to reach its control's final validation bits/token, the control being
  the same row trained at the last stage from step 0, docs/knobs.md#window-curriculum).

Writes claims.md and claims.json to --out. Numbers are this machine's (CPU threads: 1 per stream).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from lrexp.train import run as train
from lrexp.config.paths import PROJECT_ROOT
from lrexp.data_modules import prepare
from lrexp.model.lm import build_model
from lrexp.report.collect import find_parent
from lrexp.tracking.names import TAG_CHECKPOINT_DIR

ROWS = (("xl512", "xl", "XL:W"), ("rec_fixed_skip", "rec", "Rec:fixed:skip"))  # preset, model.variant, name


# ---- one stream, in its own process (its peak memory is its own) ---------------------------------------


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def _load(checkpoint: str, overrides: List[str]):
    cfg, _ = train.resume_config(checkpoint, [], overrides)
    weights = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model = build_model(cfg, prepare(cfg).vocab_size)
    model.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()})
    return cfg, model.eval()


def measure(checkpoint: str, overrides: List[str], n_tokens: int, drift_tokens: int) -> Dict[str, Any]:
    torch.set_num_threads(1)
    cfg, model = _load(checkpoint, overrides)
    n = cfg.derived.segment_len
    stream = torch.from_numpy(prepare(cfg).split("validation").tokens[: n_tokens + 1].astype("int64"))[None]
    if stream.shape[1] < n_tokens + 1 or n_tokens % n:
        raise SystemExit(f"need {n_tokens + 1} validation tokens in whole segments of {n}")
    inputs, targets = stream[:, :-1], stream[:, 1:]  # [1, T]
    energies: Dict[str, List[float]] = {}
    nll, rss_before = 0.0, _rss_mb()
    start = time.perf_counter()
    with torch.no_grad():
        state = model.initial_state(1, "cpu")
        for i in range(0, n_tokens, n):
            logits, state = model(inputs[:, i:i + n], state)  # [1, N, V]
            nll += float(torch.nn.functional.cross_entropy(logits[0], targets[0, i:i + n], reduction="sum"))
            for name, value in state.stats.items():  # the compression's, "svd/<target>_energy", ...
                energies.setdefault(name.removeprefix("svd/"), []).append(float(value))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {
        "overrides": overrides, "segment_len": n, "tokens": n_tokens, "seconds": seconds,
        "tokens_per_s": n_tokens / seconds, "bits_per_token": nll / n_tokens / math.log(2),
        "state_bytes_per_lane": state.carried_bytes(), "peak_rss_mb": peak, "stream_rss_mb": peak - rss_before,
        **{name: sum(v) / len(v) for name, v in energies.items()},
    }
    if drift_tokens:
        _, reference = _load(checkpoint, [])  # fp32 storage, no compression: the same weights
        total, count = 0.0, 0
        with torch.no_grad():
            a, b = model.initial_state(1, "cpu"), reference.initial_state(1, "cpu")
            for i in range(0, drift_tokens, n):
                la, a = model(inputs[:, i:i + n], a)
                lb, b = reference(inputs[:, i:i + n], b)
                total, count = total + float((la - lb).abs().sum()), count + la.numel()
        out["logit_drift"] = total / count
    return out


def measure_in_process(checkpoint: str, overrides: List[str], args) -> Dict[str, Any]:
    """`measure` in a fresh process; the drift of the baseline against itself is 0 and is not measured."""
    cmd = [sys.executable, __file__, "--measure", checkpoint, "--tokens", str(args.tokens),
           "--drift-tokens", str(args.drift_tokens if overrides else 0), *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the grid's runs -----------------------------------------------------------------------------------


def grid_runs(client, grid: str) -> List[Dict[str, Any]]:
    parent = find_parent(client, grid)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  max_results=1000)
    runs = []
    for run in children:
        if run.info.status != "FINISHED":
            continue
        p, tags = run.data.params, run.data.tags
        runs.append({
            "run_id": run.info.run_id, "row": p["model.variant"], "window": p["model.window"],
            "dtype": p["model.state_dtype"], "rank": p["model.svd_state.rank"],
            "stages": p.get("curriculum.stages", "[]"),  # MLflow does not log an empty list
            "metrics": run.data.metrics, "start_ms": run.info.start_time,
            "checkpoint": str(Path(tags[TAG_CHECKPOINT_DIR]) / "last.ckpt"),
            # the carried matrices: an XL cache's W x D per head, the recurrent state's S x d
            "shapes": {"xl_cache": (int(p["model.window"]), int(p["derived.head_dim"])),
                       "recurrent_state": (int(p["model.recurrent.num_states"]), int(p["model.d_model"]))},
        })
    return runs


def pick(runs, variant: str, dtype="float32", rank="None", curriculum=False) -> Optional[Dict[str, Any]]:
    for r in runs:
        if (r["row"], r["dtype"], r["rank"], r["stages"] != "[]") == (variant, dtype, rank, curriculum):
            return r
    return None


def convergence(client, run: Dict[str, Any], control: Dict[str, Any]) -> Dict[str, Any]:
    """Tokens and seconds the run took to reach the control's final validation bits/token (the last point of
    its validation curve, the same targets each time), linearly interpolated between validations."""
    def curve(r):
        points = sorted(client.get_metric_history(r["run_id"], "val/bits_per_token"),
                        key=lambda m: (m.step, m.timestamp))
        return [(m.step, m.value, (m.timestamp - r["start_ms"]) / 1000) for m in points]

    ctrl, mine = curve(control), curve(run)
    target_step, target, target_s = ctrl[-1]
    out = {"target_bits": target, "control_steps": target_step, "control_s": target_s, "final_bits": mine[-1][1]}
    for (s0, v0, t0), (s1, v1, t1) in zip([(0, float("inf"), 0.0)] + mine, mine):
        if v1 <= target:
            f = 1.0 if v0 == float("inf") else (v0 - target) / (v0 - v1)
            out.update(steps=s0 + f * (s1 - s0), seconds=t0 + f * (t1 - t0))
            out["token_saving"] = 1 - out["steps"] / target_step  # equal tokens per step
            out["time_saving"] = 1 - out["seconds"] / target_s
            return out
    out.update(steps=None, seconds=None, token_saving=None, time_saving=None)
    return out


# ---- the claims table ----------------------------------------------------------------------------------


def pct(a: float, b: float) -> str:
    """a against b: "x% less" or "x% more"."""
    return f"{100 * abs(1 - a / b):.1f}% {'less' if a <= b else 'more'}"


def factor_share(shape, k: int) -> float:
    """The bytes of rank-k factors (U_k S_k, V_k) of an n x m matrix over the matrix's: k(n + m + 1) / nm."""
    n, m = shape
    return k * (n + m + 1) / (n * m)


def yes(held: bool) -> str:
    return "yes" if held else "no"


def claims(streams: Dict[str, Dict[str, Dict]], runs, conv: Dict[str, Dict], rank: str, drift_tokens: int
           ) -> List[str]:
    """The docs/knobs.md#status-of-the-claims table: one line per claim and row (and knob, for the claims against XL)."""
    lines = ["| claim | what we measured | our number | holds here? |", "|---|---|---|---|"]
    bits = lambda r: r["metrics"]["final/val_bits_per_token"]  # noqa: E731
    for row, variant, name in ROWS:
        s, r32, r16 = streams[row], pick(runs, variant), pick(runs, variant, dtype="float16")
        base, half = s["base"], s["fp16"]
        train32, train16 = r32["metrics"]["perf/peak_mem_mb"], r16["metrics"]["perf/peak_mem_mb"]
        share = base["state_bytes_per_lane"] / (base["peak_rss_mb"] * 2**20)
        lines.append(
            f"| 41% memory saved by fp16 state ({name}) | carried-state bytes per lane, fp32 -> fp16 storage; "
            f"training peak RSS (`perf/peak_mem_mb`); peak RSS of a {base['tokens'] // 1024}k-token stream; "
            f"Δ bits/token trained with fp16 (final validation) and at eval (same weights, the stream); mean "
            f"\\|Δ logits\\| over the first {drift_tokens // 1024}k tokens | state "
            f"{base['state_bytes_per_lane']:,} -> "
            f"{half['state_bytes_per_lane']:,} B ({pct(half['state_bytes_per_lane'], base['state_bytes_per_lane'])}); "
            f"training peak {train32:.0f} -> {train16:.0f} MB ({pct(train16, train32)}); stream peak "
            f"{base['peak_rss_mb']:.0f} -> {half['peak_rss_mb']:.0f} MB "
            f"({pct(half['peak_rss_mb'], base['peak_rss_mb'])}); "
            f"the state is {100 * share:.4f}% of the peak; Δ bits {bits(r16) - bits(r32):+.4f} trained, "
            f"{half['bits_per_token'] - base['bits_per_token']:+.5f} eval; drift {half['logit_drift']:.1e} | "
            f"{yes(half['peak_rss_mb'] <= 0.59 * base['peak_rss_mb'])} (41% of the total needs the state to be >= 82% "
            f"of the peak) |")
    for row, variant, name in ROWS:
        s, trained = streams[row], pick(runs, variant, rank=rank)
        svd, base = s["svd"], s["base"]
        with_rank = "not run" if trained is None else f"{bits(trained) - bits(pick(runs, variant)):+.4f}"
        shapes = pick(runs, variant)["shapes"]
        targets = [k.removesuffix("_energy") for k in svd if k.endswith("_energy")]
        kept = ", ".join(f"{t} E_{rank} = {svd[t + '_energy']:.4f} (error {svd[t + '_rel_error']:.3f})"
                         for t in targets)
        shares = ", ".join(f"{t} {100 * factor_share(shapes[t], int(rank)):.0f}%" for t in targets)
        lines.append(
            f"| 98.7% information kept at k = 64 ({name}) | E_k at k = {rank} (half the head width, as 64 of 128) "
            f"at every segment boundary of the stream; Δ bits/token at eval (same weights, the stream) and trained "
            f"with rank {rank} (final validation) | {kept}; Δ bits "
            f"{svd['bits_per_token'] - base['bits_per_token']:+.4f} eval, {with_rank} trained; factors would take "
            f"{shares} of the "
            f"bytes (X_k is kept whole here) | {yes(all(svd[t + '_energy'] >= 0.987 for t in targets))} |")
    for name, c in conv.items():
        reached = c["steps"] is not None
        got = (f"{100 * c['token_saving']:.1f}% fewer tokens, wall-clock {pct(1 - c['time_saving'], 1)}"
               if reached else "never reached")
        lines.append(
            f"| 37% faster convergence with the curriculum ({name}) | tokens and seconds to reach the control's "
            f"final validation bits/token (the control: the last stage from step 0, {c['control_steps']} steps, "
            f"{c['control_s']:.0f} s) | {got}; final {c['final_bits']:.3f} against {c['target_bits']:.3f} | "
            f"{yes(reached and c['token_saving'] >= 0.37)} |")
    xl, rec = streams["xl512"]["base"], streams["rec_fixed_skip"]
    for knob, r in rec.items():
        lines.append(
            f"| 73% less memory than Transformer-XL at 256k tokens (Rec:fixed:skip, {knob}) | carried-state bytes "
            f"per lane and peak RSS over the {r['tokens'] // 1024}k-token stream against XL:{xl['window']} (an XL "
            f"cache of W = {xl['window']} tokens per layer, fp32) | state {r['state_bytes_per_lane']:,} against "
            f"{xl['state_bytes_per_lane']:,} B ({pct(r['state_bytes_per_lane'], xl['state_bytes_per_lane'])}); "
            f"peak {r['peak_rss_mb']:.0f} against {xl['peak_rss_mb']:.0f} MB "
            f"({pct(r['peak_rss_mb'], xl['peak_rss_mb'])}) | "
            f"{yes(r['peak_rss_mb'] <= 0.27 * xl['peak_rss_mb'])} |")
        lines.append(
            f"| 2.1x inference speed (Rec:fixed:skip, {knob}) | tokens/s over the same stream against "
            f"XL:{xl['window']} | {r['tokens_per_s']:,.0f} against {xl['tokens_per_s']:,.0f} tokens/s "
            f"({r['tokens_per_s'] / xl['tokens_per_s']:.2f}x) | {yes(r['tokens_per_s'] >= 2.1 * xl['tokens_per_s'])} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", default="knobs")
    p.add_argument("--tokens", type=int, default=262144)
    p.add_argument("--drift-tokens", type=int, default=65536)
    p.add_argument("--out", default=str(PROJECT_ROOT / "docs" / "results" / "knobs-tiny"))
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args()
    if args.measure:
        print(json.dumps(measure(args.measure, overrides, args.tokens, args.drift_tokens)))
        return

    from mlflow.tracking import MlflowClient

    from lrexp.config.load import load
    from lrexp.grid.expand import expand
    from lrexp.tracking.store import tracking_uri

    client = MlflowClient(tracking_uri(load()))
    runs = grid_runs(client, args.grid)
    rank = str(min({c.config.model.svd_state.rank for c in expand(args.grid).cells} - {None}))
    knobs = {"base": [], "fp16": ["model.state_dtype=float16"], "svd": [f"model.svd_state.rank={rank}"],
             "fp16+svd": ["model.state_dtype=float16", f"model.svd_state.rank={rank}"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Streams already measured (same grid run, same sizes) are kept: the script may run while cells still train.
    cache = out / "streams.json"
    key = f"{find_parent(client, args.grid).info.run_id}:{args.tokens}:{args.drift_tokens}"
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    streams: Dict[str, Dict[str, Dict]] = saved.get("streams", {}) if saved.get("key") == key else {}
    conv = {}
    for row, variant, name in ROWS:
        base = pick(runs, variant)
        if base is None:
            print(f"grid {args.grid}: the baseline cell of {row} has not finished", file=sys.stderr)
            continue
        for knob, over in knobs.items():
            if knob not in streams.setdefault(row, {}):
                print(f"{row} {knob}: streaming {args.tokens} tokens", file=sys.stderr, flush=True)
                streams[row][knob] = {**measure_in_process(base["checkpoint"], over, args), "window": base["window"]}
                cache.write_text(json.dumps({"key": key, "streams": streams}, indent=1))
        curriculum = pick(runs, variant, curriculum=True)
        if curriculum is not None:
            conv[name] = convergence(client, curriculum, base)
    needed = [(v, d, r, c) for _, v, _ in ROWS for d, r, c in
              (("float32", "None", False), ("float16", "None", False), ("float32", "None", True))]
    missing = [n for n in needed if pick(runs, n[0], n[1], n[2], n[3]) is None]
    if missing:
        raise SystemExit(f"grid {args.grid}: cells not finished yet (variant, dtype, rank, curriculum): {missing}")
    (out / "claims.json").write_text(json.dumps({"streams": streams, "convergence": conv, "rank": rank}, indent=1))
    lines = [f"# The optional knobs' claims at the {args.grid} grid's scale", "",
             f"From `python scripts/knobs_claims.py` on the latest `lrexp grid {args.grid}` (parent run "
             f"`{find_parent(client, args.grid).info.run_id}`); streams of {args.tokens:,} validation tokens, "
             f"batch 1, 1 CPU thread each.", "", *claims(streams, runs, conv, rank, args.drift_tokens), "",
             "## Streams", "", "| row | knob | N | tokens/s | bits/token | state B/lane | peak RSS MB | stream RSS "
             "MB | logit drift | E_k (targets) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row, by_knob in streams.items():
        for knob, s in by_knob.items():
            energy = ", ".join(f"{k.removesuffix('_energy')} {v:.4f}" for k, v in s.items() if k.endswith("_energy"))
            lines.append(f"| {row} | {knob} | {s['segment_len']} | {s['tokens_per_s']:,.0f} | "
                         f"{s['bits_per_token']:.4f} | {s['state_bytes_per_lane']:,} | {s['peak_rss_mb']:.0f} | "
                         f"{s['stream_rss_mb']:.1f} | {s.get('logit_drift', 0):.2e} | {energy or '–'} |")
    (out / "claims.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
