"""The config schema: one dataclass per section, Literals for the closed choices, and every dotted key.

YAML in `experiments/` is data and this module is its schema; it imports nothing from lrexp, so any module
can name a config type without pulling the loader or the registries. Fields whose default is an
interpolation (`${scale.window}`) are resolved by the loader (lrexp.config.load); `derived` is filled by
lrexp.config.checks.resolve and never set by users.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Literal, Optional, get_type_hints


@dataclass
class ScaleConfig:
    """Base sizes of one scale preset. Paper values by default (docs/models.md#sizes)."""

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
    memory_size: int = 65536  # kNN memory entries per (lane, head) of the Memorizing row (docs/models.md#memorizing-transformer)
    knn_k: int = 128  # neighbours retrieved per query and head


@dataclass
class AttnConfig:
    backend: str = "auto"  # a name in lrexp.attention's backend registry; auto: triton on CUDA, else sdpa
    window_includes_self: bool = False  # docs/models.md#paper-and-code: the code excludes the query's own token
    mask_empty_cache: bool = False  # docs/models.md#paper-and-code: the code keeps zero cache slots visible
    scale_abs: bool = False  # docs/models.md#paper-and-code: meliad 2025 uses |s_h|, 2022 (the default) s_h
    num_buckets: int = 32
    max_distance: int = 128
    # triton backend: one fixed launch config per kernel, not the autotuner's timed pick (bitwise reproducible)
    deterministic: bool = False


@dataclass
class RecurrentConfig:
    # Stack indices of the cells (used by the rec and feedback variants); negative counts from the top:
    # -3 is layer 10 of 12 at paper scale and L-3 at every smaller one (docs/models.md#rows).
    layers: List[int] = field(default_factory=lambda: [-3])
    num_states: int = "${scale.num_states}"  # type: ignore[assignment]
    gate: Literal["lstm", "fixed"] = "fixed"
    topology: Literal["dual", "single", "skip"] = "skip"
    state_ids: bool = True
    candidate_tanh: bool = False  # docs/models.md#paper-and-code
    state_reads_prev_block: bool = True  # docs/models.md#paper-and-code: R reads the previous and the current block
    always_clear_state: bool = False  # ablation: reset the state at every segment


@dataclass
class KNNConfig:
    """The Memorizing row's kNN memory layers (docs/models.md#memorizing-transformer)."""

    # Stack indices of the memory layers (the memorizing variant); negative counts from the top: -4 is layer 9
    # of 12 at paper scale and L-4 at every smaller one.
    layers: List[int] = field(default_factory=list)
    memory_size: int = "${scale.memory_size}"  # type: ignore[assignment]  # K_mem, a multiple of N
    k: int = "${scale.knn_k}"  # type: ignore[assignment]
    backend: Literal["bucket", "exact"] = "bucket"  # bucket: the code's per-bucket argmax; exact: top-k
    combine: Literal["weighted_mean", "add", "stop_forward"] = "weighted_mean"
    local_position_bias: bool = True  # the 2022 code keeps the T5 bias on the memory layer's local attention
    state_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # storage of the memory (docs/knobs.md#state-storage-dtype)


@dataclass
class SlotsConfig:
    """Gated memory slots (docs/knobs.md#gated-memory-slots): on the layers named, the sliding-window layer becomes a
    gated state cell over n learned slots M [n, d] per lane, written from every block and read by the tokens."""

    enabled: bool = False
    # Stack indices (negative: from the top) of the layers that get slots, or "all"; each must be a
    # sliding-window attention layer of the row (an XL or Slide row, or a Rec row's non-recurrent layers).
    layers: Any = field(default_factory=lambda: [-3])
    n: int = 64  # slots per layer and lane
    read: Literal["cross_attn", "prefix_kv"] = "cross_attn"  # BRT's B path, or prefix keys in one softmax
    gate: Literal["fixed", "lstm"] = "fixed"  # docs/models.md#gates
    self_attn: bool = True  # the write reads the slots themselves too: U = [SelfAttn(M) ; CrossAttn]
    ffn: bool = False  # false: the skip topology; true: dual (an FFN and a second gate on the write path)
    token_keys: Literal["prev_and_current", "current"] = "prev_and_current"  # the block tokens the write reads


@dataclass
class SVDStateConfig:
    """Rank-k compression of the carried state at the segment boundary (docs/knobs.md#rank-k-state-compression); off while rank is null."""

    rank: Optional[int] = None  # k; null: off. The claim's value is 64 (docs/knobs.md#status-of-the-claims)
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
    # knn.state_dtype); computed in float32 (docs/knobs.md#state-storage-dtype)
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
class CastConfig:
    """The generated `cast` corpus (docs/data.md#the-cast-corpus): stories whose invented names recur."""

    num_docs: int = 400
    cast_size: int = 24  # invented names per document, mentioned with Zipf-like weights
    doc_bytes: int = 12000  # about this long (whole sentences); bytes tokenizer: tokens
    # "prose": sentences of common words around the names; "short": a few words a sentence, names about half
    # the bytes (docs/data.md#the-cast-corpus)
    sentences: str = "prose"
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
    # Training lanes enter their first document at a random segment, so document boundaries do not fall on
    # the same steps in every lane (docs/data.md#staggered-lanes); evaluation is unaffected.
    stagger_lanes: bool = True
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
    cast: CastConfig = field(default_factory=CastConfig)


@dataclass
class LossConfig:
    cross_segment_target: bool = False  # docs/models.md#paper-and-code: the code never predicts a segment-boundary token


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
    precision: str = "auto"  # Lightning's; auto: bf16-mixed on a CUDA device with bf16, else 32-true
    devices: int = 1  # per node; the lanes are sharded over devices x num_nodes ranks
    num_nodes: int = 1
    accelerator: str = "auto"
    strategy: str = "auto"  # ddp on more than one device (nccl on GPUs, gloo on CPUs); ddp_fork in notebooks/tests
    seed: int = 0
    deterministic: bool = True  # deterministic algorithms, warning (not failing) on ops that have none
    # CPU threads of torch's intra-op pool; null: $OMP_NUM_THREADS if set, else all the CPUs this process may
    # use but one, shared by the train.devices ranks (a thread more than the free cores costs several times).
    threads: Optional[int] = None
    # On a CPU run, the C heap keeps the large blocks a step frees for the next one (no page faults on the same
    # tensors every step; the process keeps freed memory): docs/configuration.md#threads
    keep_freed_memory: bool = True
    # torch.compile (inductor) of the model, every row; the input checks stay eager. Off by default: slower than
    # eager on the CPU measured (docs/configuration.md#compiling). On a CPU it needs a C++ compiler ($CXX, else g++).
    compile: bool = False
    checkpoint_dir: str = "checkpoints"  # <checkpoint_dir>/<MLflow run id>/last.ckpt; relative: project root
    checkpoint_every: Optional[int] = None  # optimiser steps between saves of last.ckpt; null: train.val_every
    checkpoint_minutes: Optional[float] = None  # also save when this many minutes passed since the last save
    # checkpoints kept per run: last.ckpt and the saves before it (last-1.ckpt, ...), a fallback for a resume
    keep_checkpoints: int = 2


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
    progress_bar: bool = True  # on a terminal only; elsewhere (a file, a pipe) lines every progress_every_s
    # Seconds between progress lines when there is no bar (stdout not a terminal, as under SLURM or nohup, or
    # progress_bar off); each evaluation also ends with a line. null: no lines (docs/configuration.md#logs)
    progress_every_s: Optional[float] = 60.0
    progress_file: Optional[str] = None  # JSON rewritten every few seconds with step, loss, tokens/s (lit/progress.py)


@dataclass
class CurriculumConfig:
    """A window / segment-length curriculum at constant tokens per step (docs/knobs.md#window-curriculum); off while empty."""

    # [start_step, W, R] per stage, N = R x W and lanes = data.tokens_per_step / N ([start_step, W]: R the
    # model's own, so one schedule fits rows of any R); the first starts at step 0, the last is the model's own
    # window and blocks (what evaluation and the control run at).
    stages: List[List[int]] = field(default_factory=list)


@dataclass
class PolicyConfig:
    """Bounded multi-state evaluation (`lrexp eval`, docs/cache-policies.md): KV-cache policies x budgets."""

    split: str = "test"  # the split `lrexp eval` scores (the same targets as the training's final pass)
    names: List[str] = field(default_factory=lambda: ["full"])  # policies (lrexp.cache registry)
    budgets: List[int] = field(default_factory=list)  # C, real rows kept per layer; `full` takes none
    # auto: block mode where it is exact (full, window, sinks), token mode for h2o and tova; token: the
    # reference; block: b tokens per step (docs/cache-policies.md#block-mode)
    mode: Literal["auto", "token", "block"] = "auto"
    block: Optional[int] = None  # b of block mode; null: the model's window
    context: Optional[int] = None  # T_eval, the visibility limit; null: W (XL, Slide), the segment N (Full)
    sinks: int = 4  # i of Window+i (policy `sinks`)
    granularity: Optional[Literal["layer", "head"]] = None  # null: the policy's default (H2O head, TOVA layer)
    positions: Literal["original", "cache_relative"] = "original"  # docs/cache-policies.md#positions
    protect_first_i: int = 0  # pins the first i rows of a document under any policy (ablation)
    protect_newest: bool = False  # include-self only: the newest row cannot be evicted (exclude-self: always)
    h2o_heavy: Optional[int] = None  # h of H2O's C = r + h; null: C / 2
    tova_score_query: Literal["last", "mean_block", "max_block"] = "last"  # TOVA's scores in block mode
    limit: Optional[int] = None  # score the first K targets of the fixed evaluation order; null: all
    lanes: Optional[int] = None  # a Full row's segments decoded side by side per step; null: by memory
    compile: bool = False  # the token step under torch.compile (docs/cache-policies.md#token-step); false: eager


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
    # Cadences scaled down to a short run because the user did not set them: key -> [preset value, value used]
    adapted: Dict[str, List[int]] = field(default_factory=dict)


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
    # Modules imported before the config is checked, for their registrations (docs/plugins.md)
    plugins: List[str] = field(default_factory=list)
    derived: DerivedConfig = field(default_factory=DerivedConfig)


@dataclass
class LauncherConfig:
    """`lrexp grid NAME --launcher slurm|local` (docs/grids.md#slurm): one job per cell through submitit. Set as
    `launcher.KEY=VALUE` on the grid's command line; not part of a cell's config, since where a cell runs does
    not change what it trains (its config hash)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = 1  # per cell: must equal train.num_nodes
    gpus_per_node: int = 0  # 0: CPU jobs; a cell's train.devices must fit in it
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None  # per node, as sbatch reads it: "64G"
    time: int = 60  # minutes per job; a longer cell checkpoints, ends KILLED and is requeued
    signal_s: int = 120  # the cell is told to checkpoint this long before the time limit
    array_parallelism: Optional[int] = None  # cells running at once; null: slurm every one, local one
    sbatch: Dict[str, str] = field(default_factory=dict)  # more #SBATCH options: launcher.sbatch.constraint=a100


OPEN_SECTIONS = ("log.tags",)  # free-form dicts: their entries are values, not schema keys
SVD_TARGETS = ("recurrent_state", "slots", "xl_cache")  # the states model.svd_state.targets may name


def _schema_paths(cls: type = RunConfig, prefix: str = "") -> Dict[str, Any]:
    """Every dotted key of the schema -> its annotation."""
    out: Dict[str, Any] = {}
    hints = get_type_hints(cls)
    for f in fields(cls):
        path = f"{prefix}{f.name}"
        out[path] = hints[f.name]
        if is_dataclass(out[path]):
            out.update(_schema_paths(out[path], path + "."))
    return out


SCHEMA_PATHS = _schema_paths()


def is_section(key: str) -> bool:
    """Whether a dotted key names a section of the schema (a dataclass), not a value or an open section."""
    return is_dataclass(SCHEMA_PATHS.get(key))
