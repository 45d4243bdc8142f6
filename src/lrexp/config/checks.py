"""The config's validator: every rule across fields, checked before any work starts, each failure one line
naming the key. The only config module that imports the registries (variants, attention backends, cache
policies), since names in a config must name their entries; lrexp.config.load calls `resolve` on every
config it produces.
"""

from __future__ import annotations

from typing import Any, List, Optional

from lrexp.attention import BACKENDS
from lrexp.attention.backends import AUTO
from lrexp.cache import POLICIES
from lrexp.config.derive import absolute_layers, derive, segment_len, slot_layers
from lrexp.config.errors import ConfigError
from lrexp.config.schema import (
    SVD_TARGETS, KNNConfig, LauncherConfig, PolicyConfig, RunConfig, SlotsConfig, SVDStateConfig,
)
from lrexp.model.variants import VARIANTS, check_slot_places

_POSITIVE = (
    "scale.d_model", "scale.num_heads", "scale.d_ff", "scale.num_layers", "scale.window", "scale.num_states",
    "scale.lanes", "scale.memory_size", "scale.knn_k", "model.d_model", "model.num_heads",
    "model.d_ff", "model.num_layers", "model.window", "model.blocks_per_segment", "model.segment_len",
    "model.recurrent.num_states", "model.svd_state.rank", "model.knn.memory_size", "model.knn.k", "model.slots.n",
    "model.attn.num_buckets", "model.attn.max_distance", "data.vocab_size", "data.tokens_per_step",
    "data.prepare_workers",
    "optim.warmup_steps", "train.max_steps", "train.val_every", "train.val_tokens",
    "train.lane_groups", "train.devices", "train.num_nodes", "train.threads", "train.checkpoint_every",
    "train.checkpoint_minutes", "train.keep_checkpoints", "log.every_n_steps", "log.progress_every_s",
    "policy.block", "policy.context", "policy.limit", "policy.lanes",
)


def _get(cfg: RunConfig, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def resolve(cfg: RunConfig) -> RunConfig:
    """Validate every cross-field rule and fill `derived` from the inputs. Idempotent."""
    _check_ranges(cfg)
    _check_position_buckets(cfg.log.position_buckets)
    _check_policy(cfg.policy)

    m = cfg.model
    for path, value, names in (("model.variant", m.variant, VARIANTS),
                               ("model.attn.backend", m.attn.backend, {*BACKENDS, AUTO})):
        if value not in names:
            raise ConfigError(f"'{path}' is '{value}'; allowed: {', '.join(sorted(names))}")
    if m.d_model % m.num_heads:
        raise ConfigError(f"'model.num_heads' ({m.num_heads}) must divide 'model.d_model' ({m.d_model})")
    n = segment_len(m)
    if n % m.window:
        raise ConfigError(f"'model.segment_len' ({n}) must be a multiple of 'model.window' ({m.window})")

    _check_svd_state(m.svd_state)
    _check_layers("model.recurrent.layers", m.recurrent.layers, m.num_layers)
    _check_layers("model.knn.layers", m.knn.layers, m.num_layers)
    knn_layers = absolute_layers(m.knn.layers, m.num_layers)
    if knn_layers:
        _check_knn(m.knn, knn_layers, absolute_layers(m.recurrent.layers, m.num_layers), n)
    if m.slots.enabled:
        _check_slots(m.slots, m.num_layers, m.attn.backend)

    tps = cfg.data.tokens_per_step
    if tps % n:
        raise ConfigError(f"'data.tokens_per_step' ({tps}) must be a multiple of the segment length ({n})")
    lanes = tps // n
    world, groups = cfg.train.devices * cfg.train.num_nodes, cfg.train.lane_groups
    if lanes % (world * groups):
        raise ConfigError(f"{lanes} lanes (tokens_per_step / segment_len) do not divide over {world} rank(s) "
                          f"x {groups} lane group(s) ('train.devices' x 'train.num_nodes', 'train.lane_groups')")

    _check_curriculum(cfg, n, world * groups, knn_layers)

    cfg.derived = derive(cfg, segment_invariant=VARIANTS[m.variant].segment_invariant)
    if cfg.derived.slot_layers:
        check_slot_places(cfg)  # asks the row's layer specs, which need the derived values
    return cfg


def _check_ranges(cfg: RunConfig) -> None:
    """Sizes and counts that must be positive, rates in [0, 1), the rest non-negative."""
    for path in _POSITIVE:
        value = _get(cfg, path)
        if value is not None and value <= 0:
            raise ConfigError(f"'{path}' must be > 0, got {value}")
    for path in ("model.dropout",):
        value = _get(cfg, path)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"'{path}' must be in [0, 1), got {value}")
    for path in ("data.num_workers", "train.seed", "data.seed", "optim.weight_decay", "optim.grad_clip",
                 "log.perf_warmup_steps", "policy.sinks", "policy.protect_first_i", "policy.h2o_heavy"):
        value = _get(cfg, path)
        if value is not None and value < 0:
            raise ConfigError(f"'{path}' must be >= 0, got {value}")
    if cfg.optim.lr is not None and cfg.optim.lr <= 0:
        raise ConfigError(f"'optim.lr' must be > 0, got {cfg.optim.lr}")
    if cfg.optim.beta1 is not None and not 0.0 <= cfg.optim.beta1 < 1.0:
        raise ConfigError(f"'optim.beta1' must be in [0, 1) or null, got {cfg.optim.beta1}")


def _check_position_buckets(edges: Optional[List[int]]) -> None:
    """Given edges (null: the scale's, lrexp.config.derive.position_buckets) increase and count tokens."""
    if edges is None:
        return
    if not edges or any(e <= 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(f"'log.position_buckets' must be increasing positive token counts, got {list(edges)}")


def _check_policy(p: PolicyConfig) -> None:
    """The policy names and budgets (lrexp.cache's registry); each policy checks its own
    knobs against each budget when it is built."""
    for name in p.names:
        if name not in POLICIES:
            raise ConfigError(f"'policy.names' has '{name}'; allowed: {', '.join(sorted(POLICIES))}")
    if not p.names:
        raise ConfigError("'policy.names' is empty: name at least one policy")
    for c in p.budgets:
        if c <= 0:
            raise ConfigError(f"'policy.budgets' must be positive row counts, got {list(p.budgets)}")
    if any(POLICIES[n].budgeted for n in p.names) and not p.budgets:
        raise ConfigError("'policy.budgets' is empty, but the policies "
                          f"{', '.join(n for n in p.names if POLICIES[n].budgeted)} need a budget C")
    if p.compile and p.mode == "block" and p.block != 1:
        raise ConfigError("'policy.compile' compiles the token step, which block mode never takes; "
                          "use policy.mode=auto or token")


def _check_layers(path: str, indices: List[int], num_layers: int) -> None:
    """Stack indices (negative: from the top), each inside the stack and naming a layer once."""
    absolute = absolute_layers(indices, num_layers)
    for idx, a in zip(indices, absolute):
        if not 0 <= a < num_layers:
            raise ConfigError(f"'{path}' index {idx} is outside a stack of {num_layers} layers")
    if len(set(absolute)) != len(absolute):
        raise ConfigError(f"'{path}' names a layer twice: {list(indices)}")


def _check_slots(slots: SlotsConfig, num_layers: int, backend: str) -> None:
    """`model.slots.layers` is "all" or stack indices as for the other layer lists; the prefix read needs a
    backend that takes per-block prefix keys. Whether each layer can hold slots is the row's to say
    (lrexp.model.variants.check_slot_places, once `derived` is filled)."""
    if slots.layers != "all":
        indices = slots.layers if isinstance(slots.layers, list) else [None]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise ConfigError(f"'model.slots.layers' must be a list of layer indices or 'all', got {slots.layers!r}")
        _check_layers("model.slots.layers", indices, num_layers)
    if slots.read == "prefix_kv" and slot_layers(slots, num_layers) and backend != AUTO and BACKENDS[backend].banded:
        raise ConfigError(f"'model.slots.read' prefix_kv needs per-block prefix keys, which the banded "
                          f"'{backend}' attention backend does not take; use model.attn.backend=sdpa")


def _check_curriculum(cfg: RunConfig, segment_len: int, shards: int, knn_layers: List[int]) -> None:
    """Stages that can run at data.tokens_per_step on every rank and lane group, in step order, ending at the
    model's own window and segment (docs/knobs.md#window-curriculum)."""
    stages = cfg.curriculum.stages
    if not stages:
        return
    where = "'curriculum.stages'"
    if knn_layers:
        raise ConfigError(f"{where}: a kNN memory row cannot change its segment length (its memory holds whole "
                          f"segments)")
    own_blocks = segment_len // cfg.model.window
    for i, stage in enumerate(stages):
        if len(stage) not in (2, 3) or stage[0] < 0 or min(stage[1:]) <= 0:
            raise ConfigError(f"{where}: stage {i} must be [start_step >= 0, window > 0, blocks > 0] or "
                              f"[start_step, window], got {list(stage)}")
        start, window, blocks = (*stage, own_blocks) if len(stage) == 2 else stage
        if cfg.data.tokens_per_step % (window * blocks) or cfg.data.tokens_per_step // (window * blocks) % shards:
            raise ConfigError(
                f"{where}: stage {i} has segments of {window} x {blocks} = {window * blocks} tokens, which do not "
                f"make whole lanes on every rank and lane group of data.tokens_per_step ({cfg.data.tokens_per_step}) "
                f"over {shards} rank(s) x lane group(s)")
        if i and start <= stages[i - 1][0]:
            raise ConfigError(f"{where}: start steps must increase, stage {i} starts at {start} after "
                              f"{stages[i - 1][0]}")
    if stages[0][0] != 0:
        raise ConfigError(f"{where}: the first stage must start at step 0, got {stages[0][0]}")
    last = [*stages[-1][1:], own_blocks][:2]
    if last != [cfg.model.window, own_blocks]:
        raise ConfigError(f"{where}: the last stage [W, R] = {last} must be the model's own "
                          f"[model.window, segment blocks] = {[cfg.model.window, own_blocks]}")



def _check_svd_state(svd: SVDStateConfig) -> None:
    bad = [t for t in svd.targets if t not in SVD_TARGETS]
    if bad or len(set(svd.targets)) != len(svd.targets):
        raise ConfigError(f"'model.svd_state.targets' must be distinct names of {', '.join(SVD_TARGETS)}, "
                          f"got {list(svd.targets)}")


def _check_knn(knn: KNNConfig, layers: List[int], recurrent_layers: List[int], segment_len: int) -> None:
    """The kNN memory's sizes (docs/models.md#memorizing-transformer), checked only where a memory layer exists."""
    both = sorted(set(layers) & set(recurrent_layers))
    if both:
        raise ConfigError(f"layer {both[0]} is both a kNN memory layer ('model.knn.layers') and a recurrent "
                          f"layer ('model.recurrent.layers')")
    if knn.memory_size % segment_len:
        raise ConfigError(f"'model.knn.memory_size' ({knn.memory_size}) must be a multiple of the segment "
                          f"length ({segment_len}): a segment is written whole")
    if knn.k > knn.memory_size:
        raise ConfigError(f"'model.knn.k' ({knn.k}) must be <= 'model.knn.memory_size' ({knn.memory_size})")
    if knn.backend == "bucket" and knn.memory_size % knn.k:
        raise ConfigError(f"'model.knn.memory_size' ({knn.memory_size}) must be a multiple of 'model.knn.k' "
                          f"({knn.k}) for the bucket backend (k strided buckets)")


def check_launcher(launcher: LauncherConfig, cfg: RunConfig, local: bool) -> None:
    """A cell against the jobs `--launcher` gives it (docs/grids.md#slurm): what it asks of one job must be
    granted, checked before anything is submitted."""
    for key in ("nodes", "time", "array_parallelism", "cpus_per_task"):
        value = getattr(launcher, key)
        if value is not None and value <= 0:
            raise ConfigError(f"'launcher.{key}' must be > 0, got {value}")
    for key in ("gpus_per_node", "signal_s"):
        if getattr(launcher, key) < 0:
            raise ConfigError(f"'launcher.{key}' must be >= 0, got {getattr(launcher, key)}")
    if launcher.signal_s >= 60 * launcher.time:
        raise ConfigError(f"'launcher.signal_s' ({launcher.signal_s}) must be shorter than 'launcher.time' "
                          f"({launcher.time} minutes)")
    t = cfg.train
    if t.num_nodes != launcher.nodes:
        raise ConfigError(f"'train.num_nodes' is {t.num_nodes} but 'launcher.nodes' is {launcher.nodes}: a cell "
                          f"trains on the nodes its job is given")
    if local and launcher.nodes > 1:
        raise ConfigError(f"'launcher.nodes' is {launcher.nodes}: --launcher local runs on this one machine")
    on_gpus = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and launcher.gpus_per_node > 0)
    if on_gpus and t.devices > launcher.gpus_per_node:
        raise ConfigError(f"'train.devices' is {t.devices} GPUs per node but 'launcher.gpus_per_node' grants "
                          f"{launcher.gpus_per_node}")
