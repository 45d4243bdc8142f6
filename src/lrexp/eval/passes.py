"""The decode passes of `lrexp eval` and their scores (docs/cache-policies.md#evaluation-protocol): every KV-cache policy x
budget over the same scored targets as the training's final pass.

The stream is the data module's own evaluation pass (`StreamDataModule.eval_loader`: the split's documents
in their fixed order, every one from its start, the same (document, position) targets whatever the row),
read through `lrexp.cache.decode` instead of the model's forward. Per setting (policy, budget):

- bits/token, bits/byte and perplexity over every target; over the targets "beyond the budget" only (query
  position t > C since the state was fresh, where eviction can have acted); by position bucket, and the gap
  to `full` (the topline, always evaluated first) overall, beyond the budget and per bucket;
- tokens/s of the evaluation and the cache's bytes per lane (K and V of every layer, plus H2O/TOVA's scores);
- per-document NLL (an artifact).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from lrexp.config.checks import resolve
from lrexp.config.errors import ConfigError
from lrexp.config.schema import RunConfig
from lrexp.cache import Policy, build_policy
from lrexp.cache.decode import BoundedDecoder, holds_kv_caches
from lrexp.data_modules.datamodule import StreamDataModule
from lrexp.eval.load import EvalError
from lrexp.lit.metrics import TokenStats, token_nll

POS_KEY = "bits_per_token_by_pos/"


@dataclass
class Result:
    """One setting's scores over the pass."""

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


def stream(cfg: RunConfig, split: str):
    """(the data module whose evaluation pass is read, what that pass scores: split, targets, docs hash,
    T_eval, block size)."""
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


def setting_params(cfg: RunConfig, policy: Policy, info: Dict[str, Any]) -> Dict[str, str]:
    """Logged with every number (docs/cache-policies.md#evaluation-protocol): the setting, the knobs, the context and the mask variant."""
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
    """The setting's numbers as MLflow metrics (and the evaluation table's CSV columns)."""
    out = {f"eval/{k.replace('/', '_')}": v for k, v in r.stats.items()}
    if r.policy.budget in r.beyond:
        beyond = r.beyond[r.policy.budget]
        out.update({"eval/beyond_bits_per_token": beyond["bits_per_token"], "eval/beyond_targets": beyond["targets"]})
    out.update({f"eval/gap_{k.replace('/', '_')}": v for k, v in r.gaps.items()})
    out.update({"perf/tokens_per_s": r.tokens_per_s, "perf/seconds": r.seconds,
                "perf/cache_bytes_per_lane": float(r.cache_bytes_per_lane)})
    return out
