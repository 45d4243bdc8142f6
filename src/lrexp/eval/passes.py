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
from lrexp.cache.step import SlotDecoder
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
    occupancy: Tuple[float, float] = (1.0, 0.0)  # mean lanes busy / most lanes, steps with under half (_Lanes)
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
    scored = dm.eval_pass(split, cfg.policy.limit)
    return dm, {"split": split, "targets": scored.targets, "docs_hash": scored.docs_hash, "context": context,
                "limit": cfg.policy.limit, "mode": cfg.policy.mode, "segment": dm.cfg.derived.eval_segment_len,
                "block": block_of(cfg, None, dm.cfg.derived.eval_segment_len)}


def describe(cfg: RunConfig, policies: Sequence[Policy], info: Dict[str, Any]) -> Dict[str, str]:
    """What the table says of how the settings were decoded and which targets they scored."""
    steps = []
    for group in _passes(cfg, policies, info["segment"]):
        p, b = group[0], block_of(cfg, group[0], info["segment"])
        how = ("the model's own forward" if pass_of(cfg, p, info) == "native" else
               "token by token" if b == 1 else f"in blocks of b = {b} ({'exact' if exact_in_blocks(p) else 'approximate'})")
        steps.append(f"{'+'.join(dict.fromkeys(q.name for q in group))} {how}")
    limit = cfg.policy.limit
    scope = ("the training's final pass" if limit is None else
             f"the first K = {limit:,} targets of the fixed evaluation order (--limit)")
    return {"mode_text": f"mode {cfg.policy.mode}: " + ", ".join(steps), "scope": scope}


def block_of(cfg: RunConfig, policy: Optional[Policy], segment: int) -> int:
    """Tokens per decode step of `policy` (None: what block mode's b would be): 1 in token mode; b
    (`policy.block`, else W) in block mode; in `auto` mode the policies whose block mode is exact (window,
    sinks and the topline: their kept set is a function of the positions alone) take blocks of b too and
    the scored ones (h2o, tova) one token (docs/cache-policies.md#block-mode). Not whole segments: a query's
    mask spans the C + b rows of its step, so a segment-long block costs N / W times more per token (and
    fewer lanes fit a step's logits); measured 4x slower at smoke and tiny."""
    mode, b = cfg.policy.mode, cfg.policy.block or min(cfg.model.window, segment)
    if mode == "token":
        return 1
    if mode == "block" or policy is None or exact_in_blocks(policy):
        return b
    return 1


def exact_in_blocks(policy: Policy) -> bool:
    """Block mode decodes `policy` exactly: the topline, or a FIFO policy (`Policy.exact_block`)."""
    return policy.budget is None or policy.exact_block


def evaluate(cfg: RunConfig, model, policies: Sequence[Policy], dm, info: Dict[str, Any],
             progress=None) -> List[Result]:
    """Every setting over the evaluation pass of `dm` (see `stream`), in the order of `policies`;
    `progress(result)` after each pass's. `full` at the native context is the model's own forward; the
    budgets of one policy run in one pass (lane groups, `BoundedDecoder`), and every budgeted setting
    decoded token by token in one pass (`SlotDecoder`); a setting's seconds are its pass's divided among
    the pass's settings."""
    results: List[Result] = []
    for group in _passes(cfg, policies, info["segment"]):
        native = not holds_kv_caches(model) or (group[0].budget is None and native_context(cfg, info))
        for result in (_native_pass if native else _one_pass)(cfg, model, group, dm, info):
            results.append(result)
            _gaps(result, results[0])
            if progress is not None:
                progress(result)
    order = {id(p): i for i, p in enumerate(policies)}
    return sorted(results, key=lambda r: order[id(r.policy)])


def native_context(cfg: RunConfig, info: Dict[str, Any]) -> bool:
    """T_eval is the model's own context (W, or a Full row's N): the topline is then its native forward."""
    own = cfg.derived.segment_len if cfg.model.variant == "full" else cfg.model.window
    return info["context"] == own


def _passes(cfg: RunConfig, policies: Sequence[Policy], segment: int) -> List[List[Policy]]:
    """The settings grouped into passes, in order of their first setting: every budgeted setting decoded
    token by token in one (the token step batches policies and budgets), and consecutive settings of one
    policy otherwise."""
    out: List[List[Policy]] = []
    token: Optional[List[Policy]] = None
    for p in policies:
        if p.budget is not None and block_of(cfg, p, segment) == 1:
            if token is None:
                token = []
                out.append(token)
            token.append(p)
        elif out and out[-1] is not token and type(out[-1][0]) is type(p):
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

    def result(self, policy: Policy, seconds: float, lanes: "_Lanes", cache_bytes_per_lane: int) -> Result:
        return Result(policy, _floats(self.every.compute()),
                      {c: _floats(b.compute()) for c, b in self.beyond.items() if b.tokens > 0}, seconds,
                      lanes.tokens, cache_bytes_per_lane, {d: (v[0], int(v[1])) for d, v in self.per_doc.items()},
                      occupancy=lanes.occupancy())


def _one_pass(cfg: RunConfig, model, policies: List[Policy], dm, info: Dict[str, Any]) -> List[Result]:
    block = block_of(cfg, policies[0], info["segment"])
    if block == 1 and policies[0].budget is not None:  # the token step (`_passes` groups them)
        decoder = SlotDecoder(model, policies, context=info["context"], positions=cfg.policy.positions,
                              compile=cfg.policy.compile)
    else:
        decoder = BoundedDecoder(model, policies, context=info["context"], block=block, positions=cfg.policy.positions)
    edges = bucket_edges(cfg, info["context"])
    # the topline is scored beyond every budget too: the gap beyond C compares the same targets
    scores = [_Scores(edges, [p.budget] if p.budget else cfg.policy.budgets) for p in policies]
    state, lanes_read = None, _Lanes()
    start = time.perf_counter()
    for batch in _batches(cfg, dm, info, decoder.resets_every_segment, decoder.groups * block):
        lanes = batch["tokens"].shape[0]
        if decoder.resets_every_segment or state is None:  # a Full row carries nothing between segments
            state = decoder.initial_state(lanes, "cpu")
        else:
            state = state.narrow(lanes, len(policies))
        nll, qpos, state = decoder.score(batch["tokens"], batch["labels"], batch["loss_mask"], state,
                                         batch["doc_start"])  # [G, B, N], [B, N]
        for g, sums in enumerate(scores):
            sums.update(nll[g], qpos, batch)
        lanes_read.update(batch)
    seconds = (time.perf_counter() - start) / len(policies)
    return [s.result(p, seconds, lanes_read, decoder.cache_bytes_per_lane(g))
            for g, (p, s) in enumerate(zip(policies, scores))]


def _native_pass(cfg: RunConfig, model, policies: List[Policy], dm, info: Dict[str, Any]) -> List[Result]:
    """`full` by the model's own forward over the same pass, its state carried and reset per document as in
    training's final pass: the topline at the native context (equal to the decode of `full` within 1e-6),
    and the one evaluation of a row the policies do not apply to (Rec, Feedback, Memorizing)."""
    (policy,) = policies
    sums = _Scores(bucket_edges(cfg, info["context"]), cfg.policy.budgets if holds_kv_caches(model) else [])
    resets = holds_kv_caches(model) and all(layer.window is None for layer in model.layers)
    state, lanes_read, state_bytes = None, _Lanes(), 0
    start = time.perf_counter()
    with torch.no_grad():
        for batch in _batches(cfg, dm, info, resets, info["segment"]):
            lanes, n = batch["tokens"].shape
            if resets or state is None:
                state = model.initial_state(lanes, "cpu")
            else:
                state = state.lanes(slice(0, lanes))
            logits, state = model(batch["tokens"], state.reset_rows(batch["doc_start"]))  # [B, N, V]
            if resets:  # positions since the state was fresh: the segment's, as the decode counts them
                qpos = torch.arange(n).expand(lanes, n)  # [B, N]
            else:
                qpos = (batch["doc_pos"] - 1).clamp(min=0)  # [B, N]: the query's position in its document
            sums.update(token_nll(logits, batch["labels"], batch["loss_mask"]), qpos, batch)
            lanes_read.update(batch)
            state_bytes = max(state_bytes, sum(t.nbytes for t in state.to_tensors().values()) // lanes)
    if holds_kv_caches(model):  # what the topline's multi-state holds: K and V of T_eval rows
        state_bytes = BoundedDecoder(model, policy, context=info["context"]).cache_bytes_per_lane(0)
    return [sums.result(policy, time.perf_counter() - start, lanes_read, state_bytes)]


# Logits of one decode step held at once when segments are packed side by side (fp32: 64 MiB), and the
# most lanes a packed step takes: past a few hundred lanes a CPU step is compute-bound, more only costs memory.
PACK_LOGITS = 2**24
PACK_LANES = 512


def _batches(cfg: RunConfig, dm, info: Dict[str, Any], resets: bool, tokens_per_lane: int):
    """The evaluation pass's batches. A row whose state resets at every segment (Full) reads each segment
    alone, so consecutive batches go side by side, up to `policy.lanes` lanes (null: as many as keep a
    step's logits, lanes x `tokens_per_lane` x V, under PACK_LOGITS): the same segments and targets in
    fewer, fuller steps. Rows that carry state through a document read the data module's batches."""
    batches = dm.eval_loader(info["split"], info["limit"])
    if not resets:
        return batches
    lanes = cfg.policy.lanes or max(1, min(PACK_LANES, PACK_LOGITS // (tokens_per_lane * dm.prepared.vocab_size)))
    return packed(batches, lanes)


def packed(batches, lanes: int):
    """Consecutive batches concatenated along the lanes, at most `lanes` each (a batch is never split);
    counts (0-d tensors) add up."""
    group: List[Dict[str, torch.Tensor]] = []
    for batch in batches:
        if group and sum(b["tokens"].shape[0] for b in group) + batch["tokens"].shape[0] > lanes:
            yield _concat(group)
            group = []
        group.append(batch)
    if group:
        yield _concat(group)


def _concat(group: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {k: torch.stack([b[k] for b in group]).sum(0) if v.dim() == 0 else torch.cat([b[k] for b in group])
            for k, v in group[0].items()}


class _Lanes:
    """Lane occupancy of a pass: the lanes each step decodes against the most any step did. The longest
    lane bounds a pass; the steps with fewer than half the lanes left are where it runs below capacity."""

    def __init__(self) -> None:
        self.per_batch: List[int] = []
        self.tokens = 0  # tokens decoded (padding included), for tokens/s

    def update(self, batch: Dict[str, torch.Tensor]) -> None:
        self.per_batch.append(batch["tokens"].shape[0])
        self.tokens += batch["tokens"].numel()

    def occupancy(self) -> Tuple[float, float]:
        """(mean lanes busy / the most lanes, the fraction of steps with fewer than half the most lanes)."""
        if not self.per_batch:
            return 1.0, 0.0
        most = max(self.per_batch)
        return (sum(self.per_batch) / (most * len(self.per_batch)),
                sum(n < most / 2 for n in self.per_batch) / len(self.per_batch))


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


def pass_of(cfg: RunConfig, policy: Policy, info: Dict[str, Any]) -> str:
    """How a setting was scored: `native` (the model's own forward) or `decode` (lrexp.cache.decode)."""
    return "native" if policy.budget is None and native_context(cfg, info) else "decode"


def setting_params(cfg: RunConfig, policy: Policy, info: Dict[str, Any]) -> Dict[str, str]:
    """Logged with every number (docs/cache-policies.md#evaluation-protocol): the setting, the knobs, the context and the mask variant."""
    p = cfg.policy
    return {
        "policy": policy.name, "budget": "full" if policy.budget is None else str(policy.budget),
        "mode": p.mode, "block": str(block_of(cfg, policy, info["segment"])), "context": str(info["context"]),
        "split": info["split"], "limit": "all" if p.limit is None else str(p.limit), "pass": pass_of(cfg, policy, info),
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
                "perf/cache_bytes_per_lane": float(r.cache_bytes_per_lane), "perf/lane_occupancy": r.occupancy[0],
                "perf/steps_under_half_lanes": r.occupancy[1]})
    return out
