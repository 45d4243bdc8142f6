"""`lrexp eval`: a trained row evaluated from its checkpoint as a bounded multi-state RNN (cache_policies.md
A.6): every KV-cache policy x budget over the same scored targets as the training's final pass.

The stream is the data module's own evaluation pass (`StreamDataModule.eval_loader`: the split's documents
in their fixed order, every one from its start, the same (document, position) targets whatever the row),
read through `lrexp.cache.decode` instead of the model's forward. Per setting (policy, budget):

- bits/token, bits/byte and perplexity over every target; over the targets "beyond the budget" only (query
  position t > C since the state was fresh, where eviction can have acted); by position bucket, and the gap
  to `full` (the topline, always evaluated first) overall, beyond the budget and per bucket;
- tokens/s of the evaluation and the cache's bytes per lane (K and V of every layer, plus H2O/TOVA's scores);
- per-document NLL (an artifact).

MLflow: one parent run per evaluation (tag `lrexp.role=eval`, `lrexp.checkpoint_run` = the training run),
a child per setting with the policy's knobs as params. The table (markdown + CSV) and a plot of bits/token
against the budget, one line per policy, go to `reports/eval/<parent run id>/` (or `--out`) and onto the
parent run.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from lrexp.config.checks import resolve
from lrexp.config.errors import ConfigError
from lrexp.config.load import load as load_config
from lrexp.config.paths import PROJECT_ROOT
from lrexp.config.schema import RunConfig
from lrexp.cache import Policy, build_policy
from lrexp.cache.decode import BoundedDecoder, check_model
from lrexp.errors import Interrupted, UserError
from lrexp.tracking.names import TAG_ERROR, TAG_PARENT, TAG_ROLE
from lrexp.runtime.signals import StopSignals
from lrexp.runtime.signals import name as signal_name

REPORTS_DIR = PROJECT_ROOT / "reports" / "eval"
TAG_CHECKPOINT_RUN = "lrexp.checkpoint_run"  # the training run whose checkpoint an evaluation read
TAG_GRID_PARENT = "lrexp.grid_parent"  # an evaluation run by a grid: the invocation's parent run
POS_KEY = "bits_per_token_by_pos/"
SPLITS = {"test": "test", "validation": "validation", "val": "validation", "train": "train"}
# What `lrexp eval` lets a user change: the policies and their knobs, logging, and how data is loaded.
# Everything else is the checkpoint's (the weights, the tokenizer, the stream).
EVAL_KEYS = ("policy.", "log.", "data.num_workers", "train.threads")


class EvalError(UserError, ValueError):
    """A checkpoint or option `lrexp eval` cannot use; one line."""


@dataclass
class Result:
    policy: Policy
    stats: Dict[str, float]  # over every target: loss, bits_per_token, ..., bits_per_token_by_pos/<bucket>
    beyond: Dict[int, Dict[str, float]]  # C -> over the targets beyond C (`full`: at every budget evaluated)
    seconds: float
    tokens: int  # tokens decoded (padding included), for tokens/s
    cache_bytes_per_lane: int
    per_document: Dict[int, Tuple[float, int]]  # document id -> (NLL in nats, targets)
    gaps: Dict[str, float] = field(default_factory=dict)  # minus `full`'s: "all", "beyond", "by_pos/<bucket>"
    run_id: Optional[str] = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


# ---- loading ----------------------------------------------------------------------------------------


def load(checkpoint: str, overrides: Sequence[str] = ()):
    """(config, model, checkpoint info): the checkpoint's config with `overrides` (EVAL_KEYS only) on top,
    and its model in fp32 eval mode with the trained weights (read weights_only)."""
    from lrexp.lit import checkpoint as ckpt_mod
    from lrexp.model.lm import build_model

    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith(EVAL_KEYS):
            raise EvalError(f"'{key}' cannot be changed at evaluation (it is the checkpoint's); lrexp eval takes "
                            f"{', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in EVAL_KEYS)}")
    from lrexp.train.run import resume_config

    try:
        path = ckpt_mod.locate(checkpoint, load_config().train.checkpoint_dir)
    except ckpt_mod.CheckpointError:
        raise EvalError(f"no checkpoint '{checkpoint}': neither a checkpoint file, a run folder holding "
                        f"{ckpt_mod.LAST}, nor an MLflow run id with one under train.checkpoint_dir") from None
    try:
        cfg, path = resume_config(str(path), [], overrides)  # the checkpoint's config, the overrides on top
    except ConfigError as exc:
        raise EvalError(str(exc)) from None
    info = ckpt_mod.read(path)
    model = build_model(cfg, info.vocab_size)
    if not holds_kv_caches(model) and (any(n != "full" for n in cfg.policy.names) or cfg.policy.context):
        check_model(model)  # before any weights or data are read: Rec, Feedback, Memorizing rows stop here
    weights = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")})
    return cfg, model.float().eval(), info


def holds_kv_caches(model) -> bool:
    """Whether the policies apply (every layer a plain KV cache); other rows get `full` alone, their forward."""
    return all(s.kind == "attention" for s in model.specs)


def settings(cfg: RunConfig) -> List[Policy]:
    """`full` first (the topline the gaps are measured from), then every policy x budget; each policy
    checks its budget and knobs here, before any work."""
    p = cfg.policy
    out = [build_policy("full", None, p)]
    for name in p.names:
        if name != "full":
            out.extend(build_policy(name, c, p) for c in p.budgets)
    return out


def context_of(cfg: RunConfig) -> int:
    """T_eval: `policy.context`, else the model's own context: W for a windowed row, N for Full."""
    if cfg.policy.context is not None:
        return cfg.policy.context
    return cfg.derived.segment_len if cfg.model.variant == "full" else cfg.model.window


def stream_config(cfg: RunConfig, context: int) -> RunConfig:
    """The config the evaluation stream is read with. A Full row attends within its segment alone, so its
    context is the segment: a longer `policy.context` reads longer segments (same lanes); the windowed
    rows carry their state through the document and read the stream as training's final pass does."""
    if cfg.model.variant != "full" or context == cfg.derived.segment_len:
        return cfg
    lanes = cfg.derived.eval_lanes_per_rank
    try:
        return resolve(replace(
            cfg, model=replace(cfg.model, segment_len=context),
            data=replace(cfg.data, tokens_per_step=lanes * context), train=replace(cfg.train, lane_groups=1)))
    except ConfigError as exc:
        raise EvalError(f"policy.context={context} for a Full row: {exc}") from None


def bucket_edges(cfg: RunConfig, context: int) -> List[int]:
    """Log-spaced edges of the position buckets: powers of two from 8 up to T_eval, where the budgets act,
    then the scale's document buckets (`derived.position_buckets`), which windowed rows reach."""
    doubling = [2**k for k in range(3, max(3, context.bit_length()) + 1) if 2**k <= context]
    return sorted(set(doubling + [context] + list(cfg.derived.position_buckets)))


# ---- the evaluation ---------------------------------------------------------------------------------


def stream(cfg: RunConfig, split: str):
    """(the data module whose evaluation pass is read, what that pass scores: split, targets, docs hash,
    T_eval, block size)."""
    from lrexp.data_modules.datamodule import StreamDataModule

    context = context_of(cfg)
    dm = StreamDataModule(stream_config(cfg, context), world_size=1, rank=0)
    dm.setup("test")
    scored = dm.eval_pass(split, None)
    block = 1 if cfg.policy.mode == "token" else (cfg.policy.block or cfg.model.window)
    return dm, {"split": split, "targets": scored.targets, "docs_hash": scored.docs_hash, "context": context,
                "block": block}


def evaluate(cfg: RunConfig, model, policies: Sequence[Policy], dm, info: Dict[str, Any],
             progress=None) -> List[Result]:
    """Every setting over the evaluation pass of `dm` (see `stream`), in order; `progress(result)` after
    each. The budgets of one policy run in one pass (lane groups, `BoundedDecoder`); a setting's seconds are
    its pass's divided among the pass's settings."""
    results: List[Result] = []
    one_pass = _one_pass if holds_kv_caches(model) else _native_pass
    for group in _passes(policies):
        for result in one_pass(cfg, model, group, dm, info):
            results.append(result)
            _gaps(result, results[0])
            if progress is not None:
                progress(result)
    return results


def _passes(policies: Sequence[Policy]) -> List[List[Policy]]:
    """The settings in order, consecutive ones of one policy together."""
    out: List[List[Policy]] = []
    for p in policies:
        if out and type(out[-1][0]) is type(p):
            out[-1].append(p)
        else:
            out.append([p])
    return out


class _Scores:
    """One setting's sums over the pass: every target, the targets beyond each budget, each document."""

    def __init__(self, edges: List[int], budgets: Sequence[int]) -> None:
        from lrexp.lit.metrics import TokenStats

        self.every = TokenStats(edges)
        self.beyond = {c: TokenStats(edges) for c in budgets}
        self.per_doc: Dict[int, List[float]] = {}

    def update(self, nll: torch.Tensor, qpos: torch.Tensor, batch: Dict[str, torch.Tensor]) -> None:
        """nll [B, N] (0 where masked) at query positions qpos [B, N] since the state was fresh."""
        mask, target_bytes = batch["loss_mask"], batch["target_bytes"]
        position = qpos + 1  # the target's position since the state was fresh (the document's, for XL)
        self.every.update(nll, mask, target_bytes, position)
        for c, stats in self.beyond.items():
            far = mask & (qpos > c)  # eviction can have acted on these queries
            stats.update(nll * far, far, target_bytes, position)
        for doc, total, count in zip(batch["doc_id"].tolist(), nll.sum(1).tolist(), mask.sum(1).tolist()):
            if doc >= 0:
                entry = self.per_doc.setdefault(doc, [0.0, 0])
                entry[0] += total
                entry[1] += count

    def result(self, policy: Policy, seconds: float, tokens: int, cache_bytes_per_lane: int) -> Result:
        return Result(policy, _floats(self.every.compute()),
                      {c: _floats(b.compute()) for c, b in self.beyond.items() if b.tokens > 0}, seconds, tokens,
                      cache_bytes_per_lane, {d: (v[0], int(v[1])) for d, v in self.per_doc.items()})


def _one_pass(cfg: RunConfig, model, policies: List[Policy], dm, info: Dict[str, Any]) -> List[Result]:
    from lrexp.lit.metrics import token_nll

    decoder = BoundedDecoder(model, policies, context=info["context"], block=info["block"],
                             positions=cfg.policy.positions)
    edges = bucket_edges(cfg, info["context"])
    # the topline is scored beyond every budget too: the gap beyond C compares the same targets
    scores = [_Scores(edges, [p.budget] if p.budget else cfg.policy.budgets) for p in policies]
    state, tokens = None, 0
    start = time.perf_counter()
    for batch in dm.eval_loader(info["split"], None):
        lanes = batch["tokens"].shape[0]
        state = decoder.initial_state(lanes, "cpu") if state is None else state.narrow(lanes, len(policies))
        logits, qpos, state = decoder.run(batch["tokens"], state, batch["doc_start"])  # [G, B, N, V], [B, N]
        for g, sums in enumerate(scores):
            sums.update(token_nll(logits[g], batch["labels"], batch["loss_mask"]), qpos, batch)  # [B, N]
        tokens += batch["tokens"].numel()
    seconds = (time.perf_counter() - start) / len(policies)
    return [s.result(p, seconds, tokens, decoder.cache_bytes_per_lane(g))
            for g, (p, s) in enumerate(zip(policies, scores))]


def _native_pass(cfg: RunConfig, model, policies: List[Policy], dm, info: Dict[str, Any]) -> List[Result]:
    """`full` of a row the policies do not apply to (Rec, Feedback, Memorizing): the model's own forward over
    the same pass, its state carried and reset per document as in training's final pass."""
    from lrexp.lit.metrics import token_nll

    (policy,) = policies
    sums = _Scores(bucket_edges(cfg, info["context"]), [])
    state, tokens, state_bytes = None, 0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for batch in dm.eval_loader(info["split"], None):
            lanes = batch["tokens"].shape[0]
            state = model.initial_state(lanes, "cpu") if state is None else state.lanes(slice(0, lanes))
            logits, state = model(batch["tokens"], state.reset_rows(batch["doc_start"]))  # [B, N, V]
            qpos = (batch["doc_pos"] - 1).clamp(min=0)  # [B, N]: the query's position in its document
            sums.update(token_nll(logits, batch["labels"], batch["loss_mask"]), qpos, batch)
            tokens += batch["tokens"].numel()
            state_bytes = max(state_bytes, sum(t.nbytes for t in state.to_tensors().values()) // lanes)
    return [sums.result(policy, time.perf_counter() - start, tokens, state_bytes)]


def _floats(values: Dict[str, torch.Tensor]) -> Dict[str, float]:
    return {k: float(v) for k, v in values.items()}


def _gaps(r: Result, top: Result) -> None:
    """The setting's bits/token minus the topline's (`full`, evaluated first) over the same targets: all of
    them, those beyond the setting's budget, and each position bucket."""
    r.gaps["all"] = r.stats["bits_per_token"] - top.stats["bits_per_token"]
    c = r.policy.budget
    if c in r.beyond and c in top.beyond:
        r.gaps["beyond"] = r.beyond[c]["bits_per_token"] - top.beyond[c]["bits_per_token"]
    for key, value in r.stats.items():
        if key.startswith(POS_KEY) and key in top.stats:
            r.gaps["by_pos/" + key[len(POS_KEY):]] = value - top.stats[key]


# ---- MLflow, table and plot -------------------------------------------------------------------------


def setting_params(cfg: RunConfig, policy: Policy, info: Dict[str, Any]) -> Dict[str, str]:
    """Logged with every number (A.6): the setting, the knobs, the context and the mask variant."""
    p = cfg.policy
    return {
        "policy": policy.name, "budget": "full" if policy.budget is None else str(policy.budget),
        "mode": p.mode, "block": str(info["block"]), "context": str(info["context"]), "split": info["split"],
        "granularity": policy.granularity, "positions": p.positions, "tova_score_query": p.tova_score_query,
        "sinks": str(p.sinks), "protect_first_i": str(p.protect_first_i), "protect_newest": str(p.protect_newest),
        "h2o_heavy": "C/2" if p.h2o_heavy is None else str(p.h2o_heavy),
        "mask": "include_self" if cfg.model.attn.window_includes_self else "exclude_self",
        "mask_empty_cache": str(cfg.model.attn.mask_empty_cache),
    }


def setting_metrics(r: Result) -> Dict[str, float]:
    out = {f"eval/{k.replace('/', '_')}": v for k, v in r.stats.items()}
    if r.policy.budget in r.beyond:
        beyond = r.beyond[r.policy.budget]
        out.update({"eval/beyond_bits_per_token": beyond["bits_per_token"], "eval/beyond_targets": beyond["targets"]})
    out.update({f"eval/gap_{k.replace('/', '_')}": v for k, v in r.gaps.items()})
    out.update({"perf/tokens_per_s": r.tokens_per_s, "perf/seconds": r.seconds,
                "perf/cache_bytes_per_lane": float(r.cache_bytes_per_lane)})
    return out


class EvalTracker:
    """The evaluation's MLflow runs: the parent (RUNNING while it evaluates) and a child per setting."""

    def __init__(self, cfg: RunConfig, info: Dict[str, Any], checkpoint_run: Optional[str],
                 tags: Dict[str, str]) -> None:
        from mlflow.tracking import MlflowClient

        from lrexp.tracking import store as tracking
        from lrexp.model.variants import row_name

        self.cfg, self.info = cfg, info
        uri = tracking.tracking_uri(cfg)
        try:
            self.client = MlflowClient(uri)
            self.experiment = tracking.experiment_id(self.client, cfg.log.experiment, uri)
        except Exception as exc:
            raise tracking.TrackingError(f"cannot open the MLflow tracking store {uri}: {exc}") from None
        # not the checkpoint's log.tags: a grid cell's hold its grid parent, which this run is no child of
        self.tags = {"lrexp.row": row_name(cfg), "lrexp.scale": cfg.scale.name, "lrexp.git_sha": tracking.git_sha(),
                     TAG_CHECKPOINT_RUN: str(checkpoint_run), "lrexp.eval.targets": str(info["targets"]),
                     "lrexp.eval.docs_hash": info["docs_hash"], **tags}
        self.parent = self.client.create_run(self.experiment, run_name=f"eval:{row_name(cfg)}:{str(checkpoint_run)[:8]}",
                                             tags={**self.tags, TAG_ROLE: "eval"}).info.run_id
        p = cfg.policy
        for key, value in {"policies": ",".join(p.names), "budgets": ",".join(map(str, p.budgets)),
                           "mode": p.mode, "block": info["block"], "context": info["context"],
                           "split": info["split"]}.items():
            self.client.log_param(self.parent, key, str(value))

    def log_setting(self, r: Result) -> None:
        child = self.client.create_run(self.experiment, run_name=r.policy.label(),
                                       tags={**self.tags, TAG_PARENT: self.parent, TAG_ROLE: "eval-setting"})
        run_id = child.info.run_id
        for key, value in setting_params(self.cfg, r.policy, self.info).items():
            self.client.log_param(run_id, key, value)
        for key, value in setting_metrics(r).items():
            self.client.log_metric(run_id, key, value)
        self.client.log_dict(run_id, {str(d): {"nll": v[0], "targets": v[1]} for d, v in sorted(r.per_document.items())},
                             "per_document_nll.json")
        self.client.set_terminated(run_id, "FINISHED")
        r.run_id = run_id

    def finish(self, files: Sequence[Path]) -> None:
        for path in files:
            self.client.log_artifact(self.parent, str(path), "report")
        self.client.set_terminated(self.parent, "FINISHED")

    def fail(self, exc: BaseException) -> None:
        try:
            self.client.set_tag(self.parent, TAG_ERROR, str(exc)[:5000])
            killed = isinstance(exc, (KeyboardInterrupt, Interrupted))
            self.client.set_terminated(self.parent, "KILLED" if killed else "FAILED")
        except Exception:  # the store itself may be what failed; the caller re-raises the original error
            pass


def _bits(value: Optional[float], signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "–"
    if signed:  # a difference that rounds to zero reads +0.000, whatever the sign of its float noise
        return f"{value:+.3f}".replace("-0.000", "+0.000")
    return f"{value:.3f}"


def table_lines(results: List[Result], context: int) -> List[str]:
    buckets = sorted({k for r in results for k in r.gaps if k.startswith("by_pos/")},
                     key=lambda k: int(k.split("/")[1].split("-")[0]))
    names = [b.split("/")[1] if "-" in b else b.split("/")[1] + "+" for b in buckets]
    header = ["policy", "C", "C/T", "bits/token", "Δ full", "beyond C", "Δ beyond C",
              *[f"Δ @{n}" for n in names], "tokens/s", "cache KiB/lane"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        c = r.policy.budget
        beyond = r.beyond.get(c, {}).get("bits_per_token") if c is not None else None
        cells = [r.policy.name, "full" if c is None else str(c), "1" if c is None else f"{c / context:.3g}",
                 _bits(r.stats["bits_per_token"]), _bits(r.gaps.get("all"), True), _bits(beyond),
                 _bits(r.gaps.get("beyond"), True), *[_bits(r.gaps.get(b), True) for b in buckets],
                 f"{r.tokens_per_s:,.0f}", f"{r.cache_bytes_per_lane / 1024:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(cfg: RunConfig, results: List[Result], info: Dict[str, Any], source: str) -> str:
    from lrexp.model.variants import row_name

    p = cfg.policy
    mode = "token by token" if p.mode == "token" else f"block mode, b = {info['block']} (approximate for h2o, tova)"
    return "\n".join([
        f"# Bounded multi-state evaluation of {row_name(cfg)}",
        "",
        f"{source}. Split `{info['split']}`: {info['targets']:,} targets (docs hash `{info['docs_hash']}`), the "
        f"training's final pass. T_eval = {info['context']}, {mode}; positions {p.positions}; "
        f"{'include' if cfg.model.attn.window_includes_self else 'exclude'}-self mask; sinks i = {p.sinks}; H2O "
        f"h = {'C/2' if p.h2o_heavy is None else p.h2o_heavy}; TOVA score query {p.tova_score_query}; "
        f"protect_first_i {p.protect_first_i}. bits/token over every target; beyond C: over the targets whose "
        f"query sits past position C, where eviction can have acted; Δ: minus `full` over the same targets, "
        f"also per bucket of position since the state was fresh (@lo-hi). Cache: K, V (and scores) per lane.",
        "",
        *table_lines(results, info["context"]),
    ]) + "\n"


def write_csv(results: List[Result], path: Path) -> None:
    keys = sorted({k for r in results for k in setting_metrics(r)})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "budget", "granularity", "run_id", *keys])
        for r in results:
            m = setting_metrics(r)
            w.writerow([r.policy.name, r.policy.budget or "full", r.policy.granularity, r.run_id or "",
                        *[m.get(k, "") for k in keys]])


def plot(results: List[Result], context: int, path: Path) -> bool:
    """bits/token against the budget, one line per policy, the topline dashed: over every target (left) and
    beyond the budget, as the gap to the topline (right)."""
    from matplotlib.figure import Figure

    top = results[0]
    policies = [n for n in dict.fromkeys(r.policy.name for r in results) if n != "full"]
    if not policies:
        return False
    fig = Figure(figsize=(11, 4.5))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, name in enumerate(policies):
        mine = sorted((r for r in results if r.policy.name == name), key=lambda r: r.policy.budget)
        xs = [r.policy.budget for r in mine]
        left.plot(xs, [r.stats["bits_per_token"] for r in mine], marker="o", color=f"C{i}", label=name)
        right.plot(xs, [r.gaps.get("beyond", float("nan")) for r in mine], marker="o", color=f"C{i}", label=name)
    left.axhline(top.stats["bits_per_token"], color="k", ls="--", lw=1, label=f"full (T = {context})")
    right.axhline(0.0, color="k", ls="--", lw=1, label="full")
    for ax, ylabel in ((left, "bits/token, every target"), (right, "Δ bits/token beyond C (minus full)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget C (real rows per layer)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write_report(cfg: RunConfig, results: List[Result], info: Dict[str, Any], out: Path, source: str) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown(cfg, results, info, source))
    write_csv(results, out / "table.csv")
    files = [out / "table.md", out / "table.csv"]
    if plot(results, info["context"], out / "bits_vs_budget.png"):
        files.append(out / "bits_vs_budget.png")
    return files


def run(checkpoint: str, overrides: Sequence[str] = (), out: Optional[Path] = None,
        tags: Optional[Dict[str, str]] = None, say=print) -> Tuple[str, List[Result], Path]:
    """The whole `lrexp eval`: everything checked first (checkpoint, row, policies, budgets, split), then
    evaluated, logged and reported; returns (the MLflow parent run id, the results, the report folder)."""
    from lrexp.train.run import cpu_threads

    cfg, model, info = load(checkpoint, overrides)
    split = SPLITS.get(cfg.policy.split)
    if split is None:
        raise EvalError(f"unknown split '{cfg.policy.split}'; use one of {', '.join(sorted(SPLITS))}")
    policies = settings(cfg)
    dm, scored = stream(cfg, split)
    torch.set_num_threads(cpu_threads(cfg))
    tracker = EvalTracker(cfg, scored, info.run_id, tags or {})
    say(f"lrexp eval: {len(policies)} settings of {info.path} over split {split} ({scored['targets']:,} targets), "
        f"MLflow experiment {cfg.log.experiment}, parent run {tracker.parent}")

    def progress(r: Result) -> None:
        tracker.log_setting(r)
        say(f"  {r.policy.label():>12}: {r.stats['bits_per_token']:.4f} bits/token, "
            f"{r.tokens_per_s:,.0f} tokens/s, {r.seconds:.1f} s")

    def stop(signum: int) -> None:
        raise Interrupted(signum, f"stopped by {signal_name(signum)}; the evaluation's runs end KILLED")

    try:
        with StopSignals(stop):
            results = evaluate(cfg, model, policies, dm, scored, progress)
        folder = out if out is not None else REPORTS_DIR / tracker.parent
        files = write_report(cfg, results, scored, folder, f"Checkpoint `{info.path}` (training run "
                             f"`{info.run_id}`), MLflow parent run `{tracker.parent}`")
        tracker.finish(files)
    except BaseException as exc:
        tracker.fail(exc)
        raise
    return tracker.parent, results, folder


def evaluate_grid(grid, outcome, report_dir: Path, say=print) -> List[str]:
    """`lrexp eval` of every cell the grid trained (FINISHED, or SKIPPED as finished before), with the grid's
    `evaluate:` overrides; each evaluation's parent run is tagged with the grid and its invocation's parent,
    its report written under `report_dir/eval/<cell>/`. Returns the cells whose evaluation failed."""
    from lrexp.lit import checkpoint as ckpt_mod
    from lrexp.tracking.names import TAG_CELL, TAG_GRID

    failed = []
    for result in outcome.results:
        if result.status not in ("FINISHED", "SKIPPED") or not result.run_id:
            continue
        cell = result.cell
        try:
            checkpoint = ckpt_mod.locate(result.run_id, cell.config.train.checkpoint_dir)
            parent, _, folder = run(str(checkpoint), grid.evaluate, report_dir / "eval" / cell.dirname,
                                    {TAG_GRID: grid.name, TAG_GRID_PARENT: outcome.parent_id, TAG_CELL: cell.id}, say)
            say("\n" + (folder / "table.md").read_text().rstrip())
            say(f"\nevaluation report: {folder} (MLflow parent run {parent})")
        except UserError as exc:
            say(f"lrexp eval of cell {cell.id}: error: {exc}")
            failed.append(cell.id)
    return failed
