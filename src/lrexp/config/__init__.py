"""The whole config schema (dataclasses + Literals) and its loader.

YAML in `experiments/` is data; this module is the schema. `load(files, overrides)` merges, in order:
the schema defaults, `experiments/base.yaml`, the scale preset (`scale=NAME`, default tiny), the row preset
(`row=NAME`), the given YAML files, then `key=value` overrides. Every key is checked against the schema
before anything is merged, so a typo fails naming the key and the closest real one.

Sizes of a model are written once, in the `scale` section; the `model` fields refer to them with
interpolations (`${scale.window}`), so a row can say "twice the scale's window" (`${mul:2,${scale.window}}`)
and keep the paper's ratios at every scale. Values computed from others (segment length, lanes, head
width, vocabulary) are never written by users: `resolve()` fills the `derived` section from the inputs, so
resolving an already resolved config gives the same config.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lrexp.errors import UserError
from lrexp.tracking.names import TAG_ROW_PRESET

PROJECT_ROOT = Path(__file__).resolve().parents[3]
EXPERIMENTS = PROJECT_ROOT / "experiments"


class ConfigError(UserError, ValueError):
    """A user error in a config: the message is one line naming the key and the problem."""




def _mul(a: int, b: int) -> int:
    return a * b


def _add(a: int, b: int) -> int:
    return a + b


# `${mul:2,${scale.window}}` lets a row keep the paper's ratios at every scale.
for _name, _fn in (("mul", _mul), ("add", _add)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_resolver(_name, _fn)


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------


@dataclass
class ScaleConfig:
    """Base sizes of one scale preset. Paper values by default (models.md section 3.1)."""

    name: str = "paper"
    d_model: int = 1024
    num_heads: int = 8
    d_ff: int = 4096
    num_layers: int = 12
    window: int = 512
    num_states: int = 512
    # Lanes per optimiser step of the rows with N = 8W (Slide, Rec, Feedback, Full) over all devices: the
    # paper's 32 (32 devices x 1 lane). Tokens per step are lanes x 8W in every row, so XL:W reads 8x more
    # lanes (256), XL:2W 4x (128), XL:4W 2x (64): lanes, not only tokens, decide how diverse a step is.
    lanes: int = 32
    memory_size: int = 65536  # kNN memory entries per (lane, head) of the Memorizing row (models.md 6)
    knn_k: int = 128  # neighbours retrieved per query and head


@dataclass
class AttnConfig:
    backend: str = "sdpa"  # a name in lrexp.attention's backend registry
    window_includes_self: bool = False  # paper choice 3: the code excludes the query's own token
    mask_empty_cache: bool = False  # paper choice 4: the code keeps zero cache slots visible
    scale_abs: bool = False  # paper choice 7: meliad 2025 uses |s_h|, 2022 (the default) s_h
    num_buckets: int = 32
    max_distance: int = 128


@dataclass
class RecurrentConfig:
    # Stack indices of the cells (used by the rec and feedback variants); negative counts from the top:
    # -3 is layer 10 of 12 at paper scale and L-3 at every smaller one (models.md 2 scaling rule).
    layers: List[int] = field(default_factory=lambda: [-3])
    num_states: int = "${scale.num_states}"  # type: ignore[assignment]
    gate: Literal["lstm", "fixed"] = "fixed"
    topology: Literal["dual", "single", "skip"] = "skip"
    state_ids: bool = True
    candidate_tanh: bool = False  # paper choice 1
    state_reads_prev_block: bool = True  # paper choice 2: R reads the previous and the current block
    always_clear_state: bool = False  # ablation: reset the state at every segment


@dataclass
class KNNConfig:
    """The Memorizing row's kNN memory layers (models.md 6)."""

    # Stack indices of the memory layers (the memorizing variant); negative counts from the top: -4 is layer 9
    # of 12 at paper scale and L-4 at every smaller one.
    layers: List[int] = field(default_factory=list)
    memory_size: int = "${scale.memory_size}"  # type: ignore[assignment]  # K_mem, a multiple of N
    k: int = "${scale.knn_k}"  # type: ignore[assignment]
    backend: Literal["bucket", "exact"] = "bucket"  # bucket: the code's per-bucket argmax; exact: top-k
    combine: Literal["weighted_mean", "add", "stop_forward"] = "weighted_mean"
    local_position_bias: bool = True  # the 2022 code keeps the T5 bias on the memory layer's local attention
    state_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # storage of the memory (B.4)


@dataclass
class SlotsConfig:
    """Gated memory slots (cache_policies.md B.1): on the layers named, the sliding-window layer becomes a
    gated state cell over n learned slots M [n, d] per lane, written from every block and read by the tokens."""

    enabled: bool = False
    # Stack indices (negative: from the top) of the layers that get slots, or "all"; each must be a
    # sliding-window attention layer of the row (an XL or Slide row, or a Rec row's non-recurrent layers).
    layers: Any = field(default_factory=lambda: [-3])
    n: int = 64  # slots per layer and lane
    read: Literal["cross_attn", "prefix_kv"] = "cross_attn"  # BRT's B path, or prefix keys in one softmax
    gate: Literal["fixed", "lstm"] = "fixed"  # models.md 4.5
    self_attn: bool = True  # the write reads the slots themselves too: U = [SelfAttn(M) ; CrossAttn]
    ffn: bool = False  # false: the skip topology; true: dual (an FFN and a second gate on the write path)
    token_keys: Literal["prev_and_current", "current"] = "prev_and_current"  # the block tokens the write reads


@dataclass
class SVDStateConfig:
    """Rank-k compression of the carried state at the segment boundary (spec B.2); off while rank is null."""

    rank: Optional[int] = None  # k; null: off. The spec's value is 64
    # recurrent_state: the cell's c [S, d] per lane; slots: the memory slots' M [n, d] per lane; xl_cache: every
    # cache's keys and values [W, D] per (lane, head)
    targets: List[str] = field(default_factory=lambda: ["recurrent_state", "slots", "xl_cache"])
    method: Literal["exact", "lowrank"] = "exact"  # torch.linalg.svd, or torch.svd_lowrank with niter=2
    renormalize_keys: bool = True  # give every reconstructed cache key its stored norm back (unit, or 0 if empty)


@dataclass
class ModelConfig:
    variant: str = "slide"  # a name in lrexp.variants' registry
    d_model: int = "${scale.d_model}"  # type: ignore[assignment]
    num_heads: int = "${scale.num_heads}"  # type: ignore[assignment]
    d_ff: int = "${scale.d_ff}"  # type: ignore[assignment]
    num_layers: int = "${scale.num_layers}"  # type: ignore[assignment]
    window: int = "${scale.window}"  # type: ignore[assignment]
    blocks_per_segment: int = 8  # N / W, used when segment_len is not given
    segment_len: Optional[int] = None  # N; must be a multiple of window
    dropout: float = 0.05
    attn: AttnConfig = field(default_factory=AttnConfig)
    recurrent: RecurrentConfig = field(default_factory=RecurrentConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    slots: SlotsConfig = field(default_factory=SlotsConfig)
    # Storage of the state carried between steps: XL caches and the recurrent state (the kNN memory has
    # knn.state_dtype); computed in float32 (spec B.4)
    state_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    svd_state: SVDStateConfig = field(default_factory=SVDStateConfig)


@dataclass
class ProbeConfig:
    """Synthetic long-range probes (corpus passkey / assoc_recall / copy); distances in segments."""

    distance: int = 2  # segments between the needed information and the answer (beyond W and the XL cache)
    num_docs: int = 256
    num_pairs: int = 8  # assoc_recall: key-value pairs per document
    seed: int = 0  # the generator's: the corpus itself, the same whatever the training seeds


@dataclass
class DataConfig:
    corpus: str = "stdlib"  # a corpus name (`lrexp data prepare --help`) or a path
    tokenizer: Literal["bpe", "bytes"] = "bpe"
    vocab_size: int = 32128  # BPE only; the bytes tokenizer has a fixed vocabulary
    # A `tokenizers` JSON file (T5's tokenizer.json, say) used instead of training the BPE; its vocabulary
    # sets the model's (data.vocab_size is not read). Relative paths are under the working directory.
    tokenizer_file: Optional[str] = None
    tokens_per_step: int = "${mul:${scale.lanes},${mul:8,${scale.window}}}"  # type: ignore[assignment]
    seed: Optional[int] = None  # the training stream's shuffle; None: train.seed, so a seed axis varies both
    append_eos: bool = True
    cache_dir: str = "data_cache"  # relative paths are under the project root
    num_workers: int = 0
    # Processes that tokenize while preparing (each one core; the tokens are the same bit for bit whatever
    # the number); null: every CPU this process may use.
    prepare_workers: Optional[int] = None
    max_bytes: Optional[int] = None  # cap on the corpus's UTF-8 bytes: a deterministic subset of documents
    val_fraction: float = 0.05  # of documents, by a stable hash of the document id
    test_fraction: float = 0.05
    exclude_tests: bool = True  # stdlib: leave out test packages and test_*.py
    # Directory corpora: "auto" reads the one format a folder holds (.txt, .jsonl[.gz] or .parquet files);
    # otherwise the files ending so ("" = all); .jsonl[.gz] / .parquet are read via `datasets`.
    file_suffix: str = "auto"
    text_field: str = "text"  # JSON-lines / parquet: the column holding each document
    probe: ProbeConfig = field(default_factory=ProbeConfig)


@dataclass
class LossConfig:
    cross_segment_target: bool = False  # paper choice 5: the code never predicts a segment-boundary token


@dataclass
class OptimConfig:
    name: Literal["adafactor", "adamw"] = "adafactor"
    schedule: Literal["rsqrt", "cosine"] = "rsqrt"
    lr: Optional[float] = None  # peak; None: 1/sqrt(warmup_steps) for adafactor (the paper's), 3e-4 for adamw
    warmup_steps: int = 1000
    beta1: Optional[float] = 0.9  # adafactor's first moment (the code's 0.9); None: none (1x less memory)
    weight_decay: float = 0.0  # adamw: decoupled, times lr; adafactor: (1 - wd) * param per step (Flax)
    grad_clip: float = 0.0  # 0 disables clipping


@dataclass
class TrainConfig:
    max_steps: int = 500_000
    val_every: int = 1000  # optimiser steps between validations
    val_tokens: int = 1_638_400  # targets per validation in fit, the same for every row; the final pass reads all
    # Micro-batches per optimiser step, each a group of the rank's lanes at the same stream position with
    # its own carried state: one step over G groups of B lanes is one step over G x B lanes (for devices
    # that cannot hold every lane at once)
    lane_groups: int = 1
    offload_state: bool = False  # keep the carried state of the groups not being processed on the CPU
    precision: str = "32-true"
    devices: int = 1  # per node; the lanes are sharded over devices x num_nodes ranks
    num_nodes: int = 1
    accelerator: str = "auto"
    strategy: str = "auto"  # ddp on more than one device (nccl on GPUs, gloo on CPUs); ddp_fork in notebooks/tests
    seed: int = 0
    deterministic: bool = True  # deterministic algorithms, warning (not failing) on ops that have none
    # CPU threads of torch's intra-op pool; null: $OMP_NUM_THREADS if set, else all the CPUs this process may
    # use but one, shared by the train.devices ranks (a thread more than the free cores costs several times).
    threads: Optional[int] = None
    # torch.compile (inductor) of the model, every row; the input checks stay eager. Off by default: slower than
    # eager on the CPU measured (README "Compiling"). On a CPU it needs a C++ compiler ($CXX, else g++).
    compile: bool = False
    checkpoint_dir: str = "checkpoints"  # <checkpoint_dir>/<MLflow run id>/last.ckpt; relative: project root
    checkpoint_every: Optional[int] = None  # optimiser steps between saves of last.ckpt; null: train.val_every
    checkpoint_minutes: Optional[float] = None  # also save when this many minutes passed since the last save


@dataclass
class LogConfig:
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db
    experiment: str = "lrexp"
    run_name: Optional[str] = None
    tags: Dict[str, str] = field(default_factory=dict)
    every_n_steps: int = 50  # optimiser steps between logged training metrics
    perf_warmup_steps: int = 50  # steps left out of perf/step_time_s (at most half of those run)
    # Edges of the loss-by-position buckets in tokens from the document start; None: 8W, 32W, 128W with W
    # the scale's window (the paper's 4k / 16k / 64k), the same for every row of a scale.
    position_buckets: Optional[List[int]] = None
    progress_bar: bool = True
    progress_file: Optional[str] = None  # JSON rewritten every few seconds with step, loss, tokens/s (lit/progress.py)


@dataclass
class CurriculumConfig:
    """A window / segment-length curriculum at constant tokens per step (spec B.3); off while empty."""

    # [start_step, W, R] per stage, N = R x W and lanes = data.tokens_per_step / N ([start_step, W]: R the
    # model's own, so one schedule fits rows of any R); the first starts at step 0, the last is the model's own
    # window and blocks (what evaluation and the control run at).
    stages: List[List[int]] = field(default_factory=list)


@dataclass
class PolicyConfig:
    """Bounded multi-state evaluation (`lrexp eval`, cache_policies.md A): KV-cache policies x budgets."""

    split: str = "test"  # the split `lrexp eval` scores (the same targets as the training's final pass)
    names: List[str] = field(default_factory=lambda: ["full"])  # policies (lrexp.cache registry)
    budgets: List[int] = field(default_factory=list)  # C, real rows kept per layer; `full` takes none
    mode: Literal["token", "block"] = "token"  # token: the reference; block: b tokens per step (A.5)
    block: Optional[int] = None  # b of block mode; null: the model's window
    context: Optional[int] = None  # T_eval, the visibility limit; null: W (XL, Slide), the segment N (Full)
    sinks: int = 4  # i of Window+i (policy `sinks`)
    granularity: Optional[Literal["layer", "head"]] = None  # null: the policy's default (H2O head, TOVA layer)
    positions: Literal["original", "cache_relative"] = "original"  # A.4
    protect_first_i: int = 0  # pins the first i rows of a document under any policy (ablation)
    protect_newest: bool = False  # include-self only: the newest row cannot be evicted (exclude-self: always)
    h2o_heavy: Optional[int] = None  # h of H2O's C = r + h; null: C / 2
    tova_score_query: Literal["last", "mean_block", "max_block"] = "last"  # TOVA's scores in block mode


@dataclass
class DerivedConfig:
    """Computed by resolve(); never set by users."""

    segment_len: int = 0
    head_dim: int = 0
    lanes: int = 0  # over all ranks
    lanes_per_rank: int = 0
    lanes_per_group: int = 0  # lanes of one micro-batch
    # Evaluation's segment length and lanes per rank: a segment-invariant row reads segments of 8 x the
    # scale's window (the paper's N) whatever its N, at the same tokens per step; the others their own N.
    eval_segment_len: int = 0
    eval_lanes_per_rank: int = 0
    recurrent_layers: List[int] = field(default_factory=list)  # absolute indices
    knn_layers: List[int] = field(default_factory=list)  # absolute indices of the kNN memory layers
    slot_layers: List[int] = field(default_factory=list)  # absolute indices of the layers with slots (if enabled)
    data_seed: int = 0  # data.seed, else train.seed
    position_buckets: List[int] = field(default_factory=list)  # log.position_buckets, else the scale's


@dataclass
class RunConfig:
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    derived: DerivedConfig = field(default_factory=DerivedConfig)


# --------------------------------------------------------------------------------------------------
# Key checking (before any merge, so the error names the user's key and the closest real one)
# --------------------------------------------------------------------------------------------------

_OPEN_SECTIONS = ("log.tags",)  # free-form dicts
_USER_FORBIDDEN = ("derived",)
SELECTORS = ("scale", "row")  # `scale=tiny`, `row=xl512` pick a preset file


def _schema_paths(cls: type = RunConfig, prefix: str = "") -> Dict[str, Any]:
    """Every dotted key of the schema -> its annotation."""
    out: Dict[str, Any] = {}
    hints = get_type_hints(cls)
    for f in fields(cls):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        if is_dataclass(tp):
            out[path] = tp
            out.update(_schema_paths(tp, path + "."))
        else:
            out[path] = tp
    return out


SCHEMA_PATHS = _schema_paths()


def suggest_key(key: str) -> Optional[str]:
    """The schema key closest to a misspelt one.

    A near-exact last component wins (`model.gatee` -> `model.recurrent.gate`), preferring the same
    top-level section; then the whole dotted path; then a looser match on the last component.
    """
    paths = list(SCHEMA_PATHS)
    leaf = key.rsplit(".", 1)[-1]
    section = key.split(".", 1)[0]
    by_leaf: Dict[str, List[str]] = {}
    for p in paths:
        by_leaf.setdefault(p.rsplit(".", 1)[-1], []).append(p)

    def by_leaf_match(cutoff: float) -> Optional[str]:
        leaves = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=cutoff)
        if not leaves:
            return None
        cands = by_leaf[leaves[0]]
        return next((c for c in cands if c.startswith(section + ".")), cands[0])

    close = difflib.get_close_matches(key, paths, n=1, cutoff=0.75)
    return by_leaf_match(0.8) or (close[0] if close else None) or by_leaf_match(0.6)


def _check_key(key: str, where: str) -> None:
    if any(key == s or key.startswith(s + ".") for s in _USER_FORBIDDEN):
        raise ConfigError(f"{where}: '{key}' is computed by lrexp and cannot be set")
    if key in SCHEMA_PATHS or any(key.startswith(s + ".") for s in _OPEN_SECTIONS):
        return
    hint = suggest_key(key)
    raise ConfigError(
        f"{where}: unknown config key '{key}'" + (f"; did you mean '{hint}'?" if hint else "")
    )


def _flat_keys(node: Any, prefix: str = "") -> List[str]:
    """Dotted keys of the leaves of a plain dict (sections are walked, open sections are leaves)."""
    keys: List[str] = []
    for k, v in node.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and path not in _OPEN_SECTIONS and path in SCHEMA_PATHS and is_dataclass(
            SCHEMA_PATHS[path]
        ):
            keys.extend(_flat_keys(v, path + "."))
        else:
            keys.append(path)
    return keys


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: one line, the file named
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: a config file must be a mapping of sections")
    return OmegaConf.to_container(node, resolve=False)  # type: ignore[return-value]


def preset_path(kind: str, name: str) -> Path:
    folder = EXPERIMENTS / ("scales" if kind == "scale" else "rows")
    path = folder / f"{name}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"unknown {kind} '{name}'; available: {', '.join(have)}")
    return path


def _parse_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    return key, value


def compose(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Merge the layers in order and return the (unresolved, unvalidated) typed OmegaConf node."""
    selected = {"scale": "tiny", "row": None}
    dotlist: List[str] = []
    for item in overrides:
        key, value = _parse_override(item)
        if key in SELECTORS:
            selected[key] = value
        else:
            _check_key(key, "override")
            dotlist.append(f"{key}={value}")

    layers: List[tuple[str, Dict[str, Any]]] = [("experiments/base.yaml", _read_yaml(EXPERIMENTS / "base.yaml"))]
    layers.append((f"scale {selected['scale']}", _read_yaml(preset_path("scale", selected["scale"]))))
    if selected["row"]:
        layers.append((f"row {selected['row']}", _read_yaml(preset_path("row", selected["row"]))))
        # the run is tagged with its preset: the report's step-time reference is a preset (REFERENCE_ROW)
        layers.append((f"row {selected['row']}", {"log": {"tags": {TAG_ROW_PRESET: selected["row"]}}}))
    layers.extend((str(f), _read_yaml(Path(f))) for f in files)

    cfg = OmegaConf.structured(RunConfig)
    for where, data in layers:
        for key in _flat_keys(data):
            _check_key(key, where)
        cfg = _merge(cfg, OmegaConf.create(data), where)
    if dotlist:
        cfg = _merge(cfg, OmegaConf.from_dotlist(dotlist), "override")
    return cfg


def _merge(cfg: DictConfig, layer: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, layer)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{where}: {_omegaconf_message(exc)}") from None


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    return f"'{key}': {msg}" if key else msg


def load(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> RunConfig:
    """Compose, type-check, resolve derived values and validate. Raises ConfigError with one line."""
    cfg = compose(files, overrides)
    try:
        run: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc)) from None
    return resolve(run)


def from_dict(data: Dict[str, Any]) -> RunConfig:
    """A RunConfig from a resolved dict (a grid cell's config.yaml, a checkpoint's hparams)."""
    for key in _flat_keys({k: v for k, v in data.items() if k != "derived"}):
        _check_key(key, "config")
    base = OmegaConf.structured(RunConfig)
    node = _merge(base, OmegaConf.create({k: v for k, v in data.items() if k != "derived"}), "config")
    try:
        return resolve(OmegaConf.to_object(node))  # type: ignore[arg-type]
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc)) from None


def to_dict(cfg: RunConfig) -> Dict[str, Any]:
    """Plain, fully resolved dict (for YAML, MLflow params and checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)  # type: ignore


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def flatten(cfg: RunConfig, sep: str = ".") -> Dict[str, Any]:
    """Flattened resolved config: the MLflow params and the grid's cell identity."""
    out: Dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and (prefix.rstrip(sep) not in _OPEN_SECTIONS):
            for k, v in node.items():
                walk(v, f"{prefix}{k}{sep}")
        else:
            out[prefix.rstrip(sep)] = node

    walk(to_dict(cfg), "")
    return out


# --------------------------------------------------------------------------------------------------
# Derived values and validation
# --------------------------------------------------------------------------------------------------

_POSITIVE = (
    "scale.d_model", "scale.num_heads", "scale.d_ff", "scale.num_layers", "scale.window", "scale.num_states",
    "scale.lanes", "scale.memory_size", "scale.knn_k", "model.d_model", "model.num_heads",
    "model.d_ff", "model.num_layers", "model.window", "model.blocks_per_segment", "model.segment_len",
    "model.recurrent.num_states", "model.svd_state.rank", "model.knn.memory_size", "model.knn.k", "model.slots.n",
    "model.attn.num_buckets", "model.attn.max_distance", "data.vocab_size", "data.tokens_per_step",
    "data.prepare_workers",
    "optim.warmup_steps", "train.max_steps", "train.val_every", "train.val_tokens",
    "train.lane_groups", "train.devices", "train.num_nodes", "train.threads", "train.checkpoint_every",
    "train.checkpoint_minutes", "log.every_n_steps", "policy.block", "policy.context",
)


def _get(cfg: RunConfig, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _check_registered(m: ModelConfig) -> None:
    """model.variant and model.attn.backend name entries of the model's registries (imported here, lazily)."""
    from lrexp.attention import BACKENDS
    from lrexp.model.variants import VARIANTS

    for path, value, names in (("model.variant", m.variant, VARIANTS), ("model.attn.backend", m.attn.backend, BACKENDS)):
        if value not in names:
            raise ConfigError(f"'{path}' is '{value}'; allowed: {', '.join(sorted(names))}")


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill `derived` from the inputs and validate every cross-field rule. Idempotent."""
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
    buckets = _position_buckets(cfg)
    _check_policy(cfg.policy)

    m = cfg.model
    _check_registered(m)
    if m.d_model % m.num_heads:
        raise ConfigError(f"'model.num_heads' ({m.num_heads}) must divide 'model.d_model' ({m.d_model})")
    segment_len = m.segment_len if m.segment_len is not None else m.blocks_per_segment * m.window
    if segment_len % m.window:
        raise ConfigError(f"'model.segment_len' ({segment_len}) must be a multiple of 'model.window' ({m.window})")

    _check_svd_state(m.svd_state)
    recurrent_layers = _absolute_layers("model.recurrent.layers", m.recurrent.layers, m.num_layers)
    knn_layers = _absolute_layers("model.knn.layers", m.knn.layers, m.num_layers)
    if knn_layers:
        _check_knn(m.knn, knn_layers, recurrent_layers, segment_len)
    slot_layers = _slot_layers(m.slots, m.num_layers) if m.slots.enabled else []
    if slot_layers and m.slots.read == "prefix_kv":
        from lrexp.attention import BACKENDS

        if BACKENDS[m.attn.backend].banded:
            raise ConfigError(f"'model.slots.read' prefix_kv needs per-block prefix keys, which the banded "
                              f"'{m.attn.backend}' attention backend does not take; use model.attn.backend=sdpa")

    tps = cfg.data.tokens_per_step
    if tps % segment_len:
        raise ConfigError(
            f"'data.tokens_per_step' ({tps}) must be a multiple of the segment length ({segment_len})"
        )
    lanes = tps // segment_len
    world, groups = cfg.train.devices * cfg.train.num_nodes, cfg.train.lane_groups
    if lanes % (world * groups):
        raise ConfigError(f"{lanes} lanes (tokens_per_step / segment_len) do not divide over {world} rank(s) "
                          f"x {groups} lane group(s) ('train.devices' x 'train.num_nodes', 'train.lane_groups')")

    _check_curriculum(cfg, segment_len, world * groups, knn_layers)

    from lrexp.model.variants import VARIANTS

    eval_len = segment_len
    if VARIANTS[m.variant].segment_invariant:
        eval_len = segment_len * max(1, 8 * cfg.scale.window // segment_len)
    cfg.derived = DerivedConfig(
        segment_len=segment_len,
        head_dim=m.d_model // m.num_heads,
        lanes=lanes,
        lanes_per_rank=lanes // world,
        lanes_per_group=lanes // (world * groups),
        eval_segment_len=eval_len,
        eval_lanes_per_rank=max(1, tps // eval_len // world),
        recurrent_layers=sorted(recurrent_layers),
        knn_layers=sorted(knn_layers),
        slot_layers=sorted(slot_layers),
        data_seed=cfg.train.seed if cfg.data.seed is None else cfg.data.seed,
        position_buckets=buckets,
    )
    if slot_layers:
        from lrexp.model.variants import check_slot_places

        check_slot_places(cfg)
    return cfg


def _position_buckets(cfg: RunConfig) -> List[int]:
    """Bucket edges of the loss by position: a function of the scale alone, never of a row's N or W, so
    every row of a grid logs the same buckets (models.md 7.3)."""
    edges = cfg.log.position_buckets
    if edges is None:
        return [8 * cfg.scale.window * 4**i for i in range(3)]  # 4096, 16384, 65536 at the paper's W = 512
    if not edges or any(e <= 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(f"'log.position_buckets' must be increasing positive token counts, got {list(edges)}")
    return list(edges)


def _check_policy(p: PolicyConfig) -> None:
    """The policy names and budgets (lrexp.cache's registry, imported lazily); each policy checks its own
    knobs against each budget when it is built."""
    from lrexp.cache import POLICIES

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


def _absolute_layers(path: str, indices: List[int], num_layers: int) -> List[int]:
    """Stack indices (negative: from the top) as absolute ones, each inside the stack and named once."""
    absolute = [idx + num_layers if idx < 0 else idx for idx in indices]
    for idx, a in zip(indices, absolute):
        if not 0 <= a < num_layers:
            raise ConfigError(f"'{path}' index {idx} is outside a stack of {num_layers} layers")
    if len(set(absolute)) != len(absolute):
        raise ConfigError(f"'{path}' names a layer twice: {list(indices)}")
    return absolute


def _slot_layers(slots: SlotsConfig, num_layers: int) -> List[int]:
    """`model.slots.layers` as absolute indices: "all", or stack indices as for the other layer lists."""
    if slots.layers == "all":
        return list(range(num_layers))
    indices = slots.layers if isinstance(slots.layers, list) else [None]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ConfigError(f"'model.slots.layers' must be a list of layer indices or 'all', got {slots.layers!r}")
    return _absolute_layers("model.slots.layers", indices, num_layers)


def _check_curriculum(cfg: RunConfig, segment_len: int, shards: int, knn_layers: List[int]) -> None:
    """Stages that can run at data.tokens_per_step on every rank and lane group, in step order, ending at the
    model's own window and segment (spec B.3)."""
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


SVD_TARGETS = ("recurrent_state", "slots", "xl_cache")


def _check_svd_state(svd: SVDStateConfig) -> None:
    bad = [t for t in svd.targets if t not in SVD_TARGETS]
    if bad or len(set(svd.targets)) != len(svd.targets):
        raise ConfigError(f"'model.svd_state.targets' must be distinct names of {', '.join(SVD_TARGETS)}, "
                          f"got {list(svd.targets)}")


def _check_knn(knn: KNNConfig, layers: List[int], recurrent_layers: List[int], segment_len: int) -> None:
    """The kNN memory's sizes (models.md 6), checked only where a memory layer exists."""
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
