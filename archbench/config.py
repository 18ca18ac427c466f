"""Typed schema of the Hydra tree, and the value checks that run before any work starts.

Hydra merges every YAML file of conf/ into these dataclasses, so an unknown key or a value of the
wrong type fails at compose time with the full key in the message. Rules that types cannot express
(allowed names, positivity, divisibility) live in `validate`, which every entry point calls first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

MIXER_KINDS = ("attention", "mamba", "mamba2", "rwkv7")
MLP_SLOTS = ("none", "dense", "moe")
DENSE_MLP_KINDS = ("swiglu", "gelu", "rwkv_cmix")
NORM_KINDS = ("rmsnorm", "layernorm")
POSITION_KINDS = ("rope", "learned", "none")
KERNEL_CHOICES = ("auto", "torch", "cuda", "triton")
SIZE_METRICS = ("non_embedding", "active", "total", "flops")
SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("auto", "fp32", "bf16", "fp16")
TOKENIZER_KINDS = ("byte", "bpe", "file")
DATA_SOURCES = ("stdlib", "path", "hf", "task")


class ConfigError(ValueError):
    """A bad configuration value, reported with its key, its value and what is allowed."""


@dataclass
class AttentionConfig:
    head_dim: int = 64
    n_heads: int | None = None  # None: d_model // head_dim
    n_kv_heads: int | None = None  # None: same as n_heads (MHA); fewer gives GQA
    position: str = "rope"
    rope_theta: float = 10000.0
    max_position: int = 2048  # only for learned positions
    kernels: str = "auto"  # auto | torch (math SDPA) | cuda (flash SDPA, error if unavailable)


@dataclass
class MambaConfig:
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    chunk_size: int = 64
    kernels: str = "auto"
    dt_scale: float = 1.0  # dt_proj.weight ~ U(+-dt_scale / sqrt(dt_rank)), as mamba_ssm


@dataclass
class Mamba2Config:
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64
    ngroups: int = 1
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    chunk_size: int = 64
    kernels: str = "auto"
    a_init_range: list[float] = field(default_factory=lambda: [1.0, 16.0])  # A ~ U[lo, hi]


@dataclass
class RWKV7Config:
    head_size: int = 64
    decay_lora: int | None = None  # None: sized from d_model as in RWKV-LM
    iclr_lora: int | None = None
    value_lora: int | None = None
    gate_lora: int | None = None
    chunk_size: int = 16
    kernels: str = "auto"


@dataclass
class MLPConfig:
    kind: str = "swiglu"
    hidden_mult: float = 8.0 / 3.0
    multiple_of: int = 32


@dataclass
class MoEConfig:
    n_experts: int = 16
    top_k: int = 2
    renormalize: bool = True
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    expert_kind: str = "swiglu"
    hidden_mult: float = 8.0 / 3.0
    kernels: str = "auto"  # auto | torch (expert loop, the reference) | grouped_mm


@dataclass
class LayerPattern:
    """Periodic layer layout: `mixers` and `mlps` are each one period, repeated to the depth.

    Items may be written "mamba*3" for three in a row; a string "mamba*3,attention" also works.
    """

    mixers: list[str] = field(default_factory=lambda: ["attention"])
    mlps: list[str] = field(default_factory=lambda: ["dense"])


@dataclass
class ArchConfig:
    name: str = "transformer"
    pattern: LayerPattern = field(default_factory=LayerPattern)
    d_model: int = 0  # 0: solved from the size preset
    n_layers: int = 0  # 0: solved from the size preset
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    embed_norm: bool = False  # a norm right after the embedding (RWKV's ln0)
    tie_embeddings: bool = True
    init_std: float = 0.02
    embed_init: str = "normal"  # normal (std init_std) | rwkv (uniform +-1e-4, orthogonal head)
    scaled_residual_init: bool = True  # output projections scaled by 1/sqrt(2 * n_layers)
    aspect: float = 64.0  # preferred d_model per layer when solving sizes
    width_multiple: int = 64
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    mamba2: Mamba2Config = field(default_factory=Mamba2Config)
    rwkv7: RWKV7Config = field(default_factory=RWKV7Config)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)


@dataclass
class SizeConfig:
    name: str = "tiny"
    target: float = 2.0e6
    metric: str = "active"
    tolerance: float = 0.05
    flops_seq_len: int = 2048  # context at which a FLOPs-per-token target is measured


@dataclass
class TokenizerConfig:
    kind: str = "byte"
    vocab_size: int = 4096  # BPE only
    path: str | None = None  # kind=file: a tokenizer.json
    train_bytes: int = 20_000_000  # BPE: how much of the corpus the tokenizer is trained on
    cache_dir: str = "${oc.env:ARCHBENCH_CACHE,${oc.env:HOME}/.cache/archbench}/tokenizers"


@dataclass
class TaskDataConfig:
    name: str = "mqar"
    params: dict[str, Any] = field(default_factory=dict)
    n_train: int = 20000
    n_val: int = 1000
    seed: int = 0  # examples are drawn per index from (seed, split, index): val never meets train


@dataclass
class DataConfig:
    source: str = "stdlib"
    path: str | None = None
    text_field: str = "text"
    hf_path: str | None = None
    hf_name: str | None = None
    hf_split: str = "train"
    val_fraction: float = 0.01
    holdout_tail: float = 0.0  # also hold out the last fraction of every document (one-file sets)
    max_bytes: int | None = None  # cap on the corpus size, taken in document order
    cache_dir: str = "${oc.env:ARCHBENCH_CACHE,${oc.env:HOME}/.cache/archbench}/data"
    task: TaskDataConfig = field(default_factory=TaskDataConfig)


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 16
    seq_len: int = 256
    tokens: Any = 2_000_000  # a number, or "chinchilla" (20 tokens per parameter)
    max_steps: int | None = None  # stop early (the schedule still spans `tokens`)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"
    wsd_decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    dtype: str = "auto"
    device: str = "auto"
    compile: bool = False
    eval_every: int = 100
    eval_batches: int = 16
    log_every: int = 10
    ckpt_every: int = 200
    resume: bool = False
    progress: bool = True
    activation_checkpointing: bool = False
    distributed: str = "none"  # none | ddp | fsdp


@dataclass
class EvalConfig:
    batch_size: int = 8
    max_batches: int | None = 32
    position_buckets: int = 8
    extrapolation: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    # evaluate/runner.py: where the text comes from, where records go, synthetic-task settings.
    device: str = "auto"
    use_ckpt_data: bool = True  # bpb on the checkpoint's own corpus (else on `data` of this cfg)
    file: str | None = None  # score this text file (all of it) instead of a validation split
    records: str | None = None  # records file; None: <run dir of the checkpoint>/records.jsonl
    n_examples: int = 500  # synthetic-task examples per setting
    seed: int = 1234  # synthetic test examples: a split of their own, never the training one
    task_params: dict[str, Any] = field(default_factory=dict)  # overrides of the task's params
    grid: dict[str, Any] = field(default_factory=dict)  # param -> list of values (cartesian)
    num_fewshot: int | None = None  # lm-eval
    max_length: int | None = None  # lm-eval: truncate contexts to this many tokens (left side)


@dataclass
class BenchConfig:
    name: str = "cpu_smoke"
    modes: list[str] = field(default_factory=lambda: ["train", "prefill", "decode", "memory"])
    contexts: list[int] = field(default_factory=lambda: [128, 512, 2048])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    dtype: str = "auto"
    warmup: int = 3
    repeats: int = 10
    min_seconds: float = 1.0
    decode_tokens: int = 32
    cuda_graphs: bool = True
    peers: bool = False
    max_context: bool = False
    max_context_limit: int = 131072
    isolate: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads in each measurement; 0 keeps torch's default
    max_repeats: int = 1000  # cap on timed repeats when min_seconds asks for more
    max_seconds: float = 30.0  # slow steps: stop after this long once 3 repeats are timed
    timeout_s: float = 1800.0  # per isolated measurement; a timeout is recorded, the sweep goes on
    rss_budget_gb: float | None = None  # CPU, isolated: data-memory cap per measurement
    max_context_step: int = 128  # resolution of the max-context bisection (tokens)
    peer_rounds: int = 1  # ours/peer measured alternately this many times; ratio = median
    peer_interleave: bool = False  # also time ours/peer call by call in one process (ratio)


@dataclass
class LoggerConfig:
    kind: str = "none"
    tracking_uri: str | None = None
    experiment: str = "archbench"


@dataclass
class GenerateConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    num_samples: int = 1  # best-of-N by mean token log-probability
    stop_on_eos: bool = True
    prompts: list[str] = field(default_factory=list)  # a batch of prompts (else the root `prompt`)
    device: str = "auto"


@dataclass
class CompareEvalConfig:
    """One `archbench eval` call per run of a study: tasks that share these overrides."""

    tasks: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)


@dataclass
class CompareStudyConfig:
    """One training sweep of every backbone (its overrides on top of the experiment's), then
    the evaluations of each run (evaluate/compare.py)."""

    train: list[str] = field(default_factory=list)
    evals: list[CompareEvalConfig] = field(default_factory=list)


@dataclass
class CompareConfig:
    """`archbench compare`: which backbones, which studies, where the runs and report go."""

    backbones: list[str] = field(default_factory=lambda: [
        "transformer", "gpt2", "mamba", "mamba2", "rwkv7", "jamba"])
    arch_overrides: dict[str, list[str]] = field(default_factory=dict)  # backbone -> overrides
    studies: dict[str, CompareStudyConfig] = field(default_factory=dict)
    bench: bool = True
    bench_overrides: list[str] = field(default_factory=list)
    sweep_dir: str = "multirun/compare"
    out: str = "reports/latest"
    title: str = "archbench compare"
    dry_run: bool = False  # print the stage commands, run nothing


@dataclass
class RootConfig:
    arch: ArchConfig = field(default_factory=ArchConfig)
    size: SizeConfig = field(default_factory=SizeConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    ckpt: str | None = None
    prompt: str = ""
    out_dir: str | None = None


def register_schema() -> None:
    """Make `config_schema` available to the defaults list of conf/config.yaml."""
    ConfigStore.instance().store(name="config_schema", node=RootConfig)


def _allowed(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")


def _positive(key: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r} is not allowed; it must be {bound}")


def expand_period(items: list[str] | str, key: str, allowed: tuple[str, ...]) -> list[str]:
    """Turn ["mamba*3", "attention"] or "mamba*3,attention" into a flat, checked list."""
    if isinstance(items, str):
        items = [s for s in items.replace(" ", "").split(",") if s]
    out: list[str] = []
    for item in items:
        name, _, count = str(item).partition("*")
        if count and (not count.isdigit() or int(count) < 1):
            raise ConfigError(f"{key}: bad repeat count in {item!r}; write NAME*N with N >= 1")
        _allowed(key, name, allowed)
        out.extend([name] * (int(count) if count else 1))
    if not out:
        raise ConfigError(f"{key} is empty; give at least one of {list(allowed)}")
    return out


def validate_arch(arch: Any) -> None:
    _allowed("arch.norm", arch.norm, NORM_KINDS)
    _allowed("arch.embed_init", arch.embed_init, ("normal", "rwkv"))
    _allowed("arch.attention.position", arch.attention.position, POSITION_KINDS)
    _allowed("arch.mlp.kind", arch.mlp.kind, DENSE_MLP_KINDS)
    _allowed("arch.moe.expert_kind", arch.moe.expert_kind, ("swiglu", "gelu"))
    for sub in ("attention", "mamba", "mamba2", "rwkv7"):
        _allowed(f"arch.{sub}.kernels", arch[sub].kernels, KERNEL_CHOICES)
    mixers = expand_period(list(arch.pattern.mixers), "arch.pattern.mixers", MIXER_KINDS)
    mlps = expand_period(list(arch.pattern.mlps), "arch.pattern.mlps", MLP_SLOTS)
    for key in ("d_model", "n_layers"):
        _positive(f"arch.{key}", arch[key], allow_zero=True)
    for period, key in ((len(mixers), "arch.pattern.mixers"), (len(mlps), "arch.pattern.mlps")):
        if arch.n_layers and arch.n_layers % period:
            raise ConfigError(
                f"{key} has period {period}, which does not divide arch.n_layers={arch.n_layers}"
            )
    att = arch.attention
    _positive("arch.attention.head_dim", att.head_dim)
    if arch.d_model and "attention" in mixers:
        n_heads = att.n_heads or arch.d_model // att.head_dim
        if att.n_heads is None and arch.d_model % att.head_dim:
            raise ConfigError(
                f"arch.d_model={arch.d_model} is not divisible by "
                f"arch.attention.head_dim={att.head_dim}"
            )
        if att.n_kv_heads is not None and (att.n_kv_heads < 1 or n_heads % att.n_kv_heads):
            raise ConfigError(
                f"arch.attention.n_kv_heads={att.n_kv_heads} must divide n_heads={n_heads}"
            )
    if "moe" in mlps:
        _positive("arch.moe.n_experts", arch.moe.n_experts)
        _positive("arch.moe.top_k", arch.moe.top_k)
        _positive("arch.moe.hidden_mult", arch.moe.hidden_mult)
        _positive("arch.moe.aux_loss_coef", arch.moe.aux_loss_coef, allow_zero=True)
        _positive("arch.moe.z_loss_coef", arch.moe.z_loss_coef, allow_zero=True)
        _allowed("arch.moe.kernels", arch.moe.kernels, ("auto", "torch", "grouped_mm"))
        if arch.moe.top_k > arch.moe.n_experts:
            raise ConfigError(
                f"arch.moe.top_k={arch.moe.top_k} is greater than "
                f"arch.moe.n_experts={arch.moe.n_experts}; top_k must be <= n_experts"
            )
    if arch.d_model and "rwkv7" in mixers and arch.d_model % arch.rwkv7.head_size:
        raise ConfigError(
            f"arch.d_model={arch.d_model} is not divisible by "
            f"arch.rwkv7.head_size={arch.rwkv7.head_size}"
        )
    _positive("arch.mamba.chunk_size", arch.mamba.chunk_size)
    _positive("arch.mamba2.chunk_size", arch.mamba2.chunk_size)
    _positive("arch.rwkv7.chunk_size", arch.rwkv7.chunk_size)


def validate(cfg: Any) -> None:
    """Check every value that a type cannot; raise ConfigError naming the key, before any work."""
    validate_arch(cfg.arch)
    _allowed("size.metric", cfg.size.metric, SIZE_METRICS)
    _positive("size.target", cfg.size.target)
    _allowed("tokenizer.kind", cfg.tokenizer.kind, TOKENIZER_KINDS)
    if cfg.tokenizer.kind == "file" and not cfg.tokenizer.path:
        raise ConfigError("tokenizer.path is required when tokenizer.kind='file'")
    if cfg.tokenizer.kind == "bpe" and cfg.tokenizer.vocab_size < 260:
        raise ConfigError(f"tokenizer.vocab_size={cfg.tokenizer.vocab_size} must be >= 260")
    _allowed("data.source", cfg.data.source, DATA_SOURCES)
    if cfg.data.source == "path" and not cfg.data.path:
        raise ConfigError("data.path is required when data.source='path'")
    if not 0.0 <= cfg.data.holdout_tail < 1.0:
        raise ConfigError(f"data.holdout_tail={cfg.data.holdout_tail} must be in [0, 1)")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1)")
    t = cfg.train
    for key in ("batch_size", "seq_len", "grad_accum", "eval_every", "log_every", "ckpt_every"):
        _positive(f"train.{key}", t[key])
    for key in ("lr", "weight_decay", "grad_clip", "warmup_steps", "min_lr_ratio"):
        _positive(f"train.{key}", t[key], allow_zero=key != "lr")
    if not (isinstance(t.tokens, (int, float)) or t.tokens == "chinchilla"):
        raise ConfigError(f"train.tokens={t.tokens!r} must be a number or 'chinchilla'")
    if isinstance(t.tokens, (int, float)):
        _positive("train.tokens", t.tokens)
    _allowed("train.schedule", t.schedule, SCHEDULES)
    _allowed("train.dtype", t.dtype, DTYPES)
    _allowed("train.distributed", t.distributed, ("none", "ddp", "fsdp"))
    _allowed("bench.dtype", cfg.bench.dtype, DTYPES)
    _allowed("logger.kind", cfg.logger.kind, ("none", "mlflow", "tensorboard"))
    g = cfg.generate
    if g.temperature < 0:
        raise ConfigError(f"generate.temperature={g.temperature} must be >= 0 (0 means greedy)")
    if g.top_p is not None and not 0 < g.top_p <= 1:
        raise ConfigError(f"generate.top_p={g.top_p} must be in (0, 1]")
    if g.min_p is not None and not 0 <= g.min_p <= 1:
        raise ConfigError(f"generate.min_p={g.min_p} must be in [0, 1]")
    if g.top_k is not None and g.top_k < 1:
        raise ConfigError(f"generate.top_k={g.top_k} must be >= 1")


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Resolved plain dict, for records and checkpoints."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


__all__ = ["MISSING", "ConfigError", "RootConfig", "validate", "register_schema"]
