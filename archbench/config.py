"""Typed schema of the Hydra tree, and the value checks that run before any work starts.

Hydra merges every YAML file of conf/ into these dataclasses, so an unknown key or a value of the
wrong type fails at compose time with the full key in the message. Rules that types cannot express
(allowed names, positivity, divisibility) live in `validate`, which every entry point calls first.

The dataclasses hold every default; conf/ files hold only what differs. The `arch` node is
composed: the shell's own settings (`ShellConfig`) plus one section per registered mixer or MLP
kind, whose dataclass and checks live in that component's module (archs/registry.py). `ArchConfig`
and `RootConfig` are therefore built on first use, once every component has declared itself.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import MISSING as FIELD_MISSING
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

NORM_KINDS = ("rmsnorm", "layernorm")
SIZE_METRICS = ("non_embedding", "active", "total", "flops")
SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("auto", "fp32", "bf16", "fp16")
TOKENIZER_KINDS = ("byte", "bpe", "file")
DATA_SOURCES = ("stdlib", "path", "shakespeare", "hf", "task")


class ConfigError(ValueError):
    """A bad configuration value, reported with its key, its value and what is allowed."""


@dataclass
class LayerPattern:
    """Periodic layer layout: `mixers` and `mlps` are each one period, repeated to the depth.

    Items may be written "mamba*3" for three in a row; a string "mamba*3,attention" also works.
    """

    mixers: list[str] = field(default_factory=lambda: ["attention"])
    mlps: list[str] = field(default_factory=lambda: ["dense"])
    # Mixers pinned to layers whatever the depth, over the periodic pattern: {mixer: [index,
    # ...]}, 0-based; an index is an integer (negative counts from the end) or an expression
    # in L, the depth, with + - * and / (integer division), e.g. the H3 hybrid's [1, "L/2"].
    at: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class ShellConfig:
    """The shell's own settings (archs/model.py). `ArchConfig` adds one section per registered
    component: arch.attention, arch.mamba, arch.mlp, arch.moe, ... (archs/registry.py)."""

    name: str = "transformer"
    pattern: LayerPattern = field(default_factory=LayerPattern)
    d_model: int = 0  # 0: solved from the size preset
    n_layers: int = 0  # 0: solved from the size preset
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    embed_norm: bool = False  # a norm right after the embedding (RWKV's ln0)
    tie_embeddings: bool = True
    init_std: float = 0.02
    embed_init: str = "normal"  # a scheme registered with register_embed_init (normal, rwkv)
    scaled_residual_init: bool = True  # output projections scaled by 1/sqrt(2 * n_layers)
    aspect: float = 64.0  # preferred d_model per layer when solving sizes
    width_multiple: int = 64
    # The family's own cap on the size error: the solver meets min(size.tolerance, this). For
    # families without heads to keep whole (S4D, H3, Hyena), which fit any preset tightly.
    size_tolerance: float | None = None
    # Dropout on the embedding output and on every sublayer's output before the residual add
    # (nanoGPT's embedding / residual dropout); 0 = off, the default of every backbone.
    dropout: float = 0.0
    # The GEMM of every linear projection and the LM head: auto | onednn | aten (archs/kernels/
    # linear.py). auto: oneDNN's on a CPU that has it, aten's (MKL / cuBLAS) elsewhere.
    matmul: str = "auto"


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
class StopWhenConfig:
    """Stop a run at the first evaluation whose held-out metric reaches a threshold (off while
    `metric` is null). Meant for synthetic tasks: once a model has solved the task on held-out
    data, more tokens cannot change "solved within the budget", and an unsolved run still trains
    the whole budget. The run's summary and train record say where it stopped."""

    metric: str | None = None  # val_accuracy | val_loss | val_bpb; None: never stop early
    at_least: float | None = None  # stop once metric >= this (higher is better)
    at_most: float | None = None  # stop once metric <= this (lower is better)


STOP_METRICS = ("val_accuracy", "val_loss", "val_bpb")


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 16
    seq_len: int = 256
    tokens: Any = 2_000_000  # a number, or "chinchilla" (20 tokens per parameter)
    max_steps: int | None = None  # stop early (the schedule still spans `tokens`)
    stop_when: StopWhenConfig = field(default_factory=StopWhenConfig)  # solved: stop
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
    max_batches: int | None = 32  # text: windows scored = max_batches * batch_size, per backbone
    position_buckets: int = 8  # loss by position: this many equal ranges of the window
    extrapolation: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # x training context
    # bpb | extrapolation | a synthetic task (train/tasks) | any lm-eval task name
    tasks: list[str] = field(default_factory=lambda: ["bpb"])
    limit: int | None = None  # lm-eval: examples per task (None: all)
    # evaluate/quality/runner.py: where the text comes from, where records go, task settings.
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
class BenchGrid:
    contexts: list[int] | None = None
    batch_sizes: list[int] | None = None


@dataclass
class BenchByMode:
    train: BenchGrid = field(default_factory=BenchGrid)
    prefill: BenchGrid = field(default_factory=BenchGrid)
    decode: BenchGrid = field(default_factory=BenchGrid)
    memory: BenchGrid = field(default_factory=BenchGrid)


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
    # torch.compile axis: each train / prefill / decode measurement runs once per value.
    compile: list[bool] = field(default_factory=lambda: [False])
    profile: bool = False  # torch.profiler trace + top-operators table per measurement
    # Per-mode grids, e.g. bench.by_mode.train.batch_sizes=[8]: contexts / batch_sizes of that
    # mode only (null: bench.contexts / bench.batch_sizes).
    by_mode: BenchByMode = field(default_factory=lambda: BenchByMode())
    peer_max_context: int | None = None  # no peer measurement above this context (slow peers)
    # Decoding at a longer context is also timed in alternation with decoding at this one, in one
    # process (record field `growth`): a step's cost against the context, free of the drift
    # that separate measurements carry. None: not measured.
    growth_reference: int | None = None
    # Other backbones (names of conf/arch/*.yaml, at their defaults) timed against this one at
    # the same size, call by call in one process (record field `rivals`): e.g. RWKV-7 against
    # Mamba-1 per token, free of the drift between separate records.
    rivals: list[str] = field(default_factory=list)


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
    compile: bool = False  # torch.compile the decode step (one graph, reused for every token)


@dataclass
class CompareEvalConfig:
    """One `archbench eval` call per run of a study: tasks that share these overrides."""

    tasks: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)


@dataclass
class CompareStudyConfig:
    """One training sweep of every backbone (its overrides on top of the experiment's), then
    the evaluations of each run (archbench/compare.py)."""

    train: list[str] = field(default_factory=list)
    evals: list[CompareEvalConfig] = field(default_factory=list)
    backbones: list[str] = field(default_factory=list)  # a subset of compare.backbones; [] = all
    seeds: list[int] | None = None  # seeds of this study's main runs; None: compare.seeds


@dataclass
class CompareTuneConfig:
    """Per-backbone learning rates (archbench/tuning.py): before a study's main runs, every
    backbone trains `tokens` tokens at each rate of `lrs`; the lowest final validation loss picks
    the rate of its main runs. A best rate at the grid's edge adds `extend_by` points beyond it
    once (`extend: true`); still at the edge, it is flagged in the report."""

    studies: list[str] = field(default_factory=list)  # studies tuned this way (e.g. [lm])
    lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    tokens: float = 50000.0
    extend: bool = True
    extend_by: int = 1
    overrides: list[str] = field(default_factory=list)  # extra overrides of the tuning runs


@dataclass
class CompareConfig:
    """`archbench compare`: which backbones, which studies, where the runs and report go."""

    backbones: list[str] = field(default_factory=lambda: [
        "transformer", "gpt2", "mamba", "mamba2", "rwkv7", "jamba"])
    arch_overrides: dict[str, list[str]] = field(default_factory=dict)  # backbone -> overrides
    studies: dict[str, CompareStudyConfig] = field(default_factory=dict)
    tune: CompareTuneConfig = field(default_factory=CompareTuneConfig)
    seeds: list[int] = field(default_factory=lambda: [0])  # main runs of every study
    reference: str | None = None  # the backbone every other is compared with (report)
    parallel: int = 1  # training / eval jobs at once (joblib launcher), cores split between them
    notes: list[str] = field(default_factory=list)  # said in the report (e.g. what is left out)
    bench: bool = True
    bench_overrides: list[str] = field(default_factory=list)
    sweep_dir: str = "multirun/compare"
    out: str = "reports/latest"
    title: str = "archbench compare"
    dry_run: bool = False  # print the stage commands, run nothing


@dataclass
class ValidateConfig:
    """`archbench validate` (archbench/validate.py). `only`, `skip`, `out` and `sweep_root` are
    the command's; every other field is set by one reproduction's conf/validate/<name>.yaml: the
    published claim, where it is published, how the run here is scaled, and the measurement with
    its verdict rule (`metric` names a function of archbench/validate_metrics.py, `params` holds
    its thresholds)."""

    only: list[str] = field(default_factory=list)  # reproductions to run; [] = all
    skip: list[str] = field(default_factory=list)
    out: str = "reports/validation"
    sweep_root: str = "multirun/validate"
    name: str = ""
    claim: str = ""
    source: str = ""
    scaling: str = ""  # how this version differs from the published setting
    metric: str = ""
    rule: str = ""  # the verdict rule in words (the report prints it)
    params: dict[str, Any] = field(default_factory=dict)
    not_run_here: str | None = None  # a reason this version cannot run on this machine


@dataclass
class RootSettings:
    """The root of the tree; `RootConfig` is this with `arch` typed by the composed ArchConfig."""

    arch: ShellConfig = field(default_factory=ShellConfig)
    size: SizeConfig = field(default_factory=SizeConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    ckpt: str | None = None
    prompt: str = ""
    out_dir: str | None = None


def arch_schema() -> type:
    """The composed `arch` node: ShellConfig plus one section per registered component."""
    from archbench.archs.registry import arch_schema as compose

    return compose(ShellConfig)


_ROOT: list[type] = []


def root_schema() -> type:
    """RootSettings with `arch` typed by the composed ArchConfig (built once)."""
    if not _ROOT:
        arch = arch_schema()
        specs: list[Any] = []
        for f in fields(RootSettings):
            if f.name == "arch":
                specs.append(("arch", arch, field(default_factory=arch)))
            elif f.default_factory is not FIELD_MISSING:
                specs.append((f.name, f.type, field(default_factory=f.default_factory)))
            else:
                specs.append((f.name, f.type, field(default=f.default)))
        _ROOT.append(make_dataclass("RootConfig", specs,
                                    namespace={"__module__": __name__}))
    return _ROOT[0]


def __getattr__(name: str) -> Any:
    """`ArchConfig` and `RootConfig` exist once the components have registered (PEP 562)."""
    if name == "ArchConfig":
        return arch_schema()
    if name == "RootConfig":
        return root_schema()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_schema() -> None:
    """Make `config_schema` available to the defaults list of conf/config.yaml."""
    ConfigStore.instance().store(name="config_schema", node=root_schema())


def require_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    """A ConfigError naming key, value and the allowed values unless `value` is one of them."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")


def require_positive(key: str, value: float | int | None, allow_zero: bool = False) -> None:
    """A ConfigError unless `value` is > 0 (>= 0 with allow_zero); None means unset."""
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
        require_choice(key, name, allowed)
        out.extend([name] * (int(count) if count else 1))
    if not out:
        raise ConfigError(f"{key} is empty; give at least one of {list(allowed)}")
    return out


def pattern_periods(arch: Any) -> tuple[list[str], list[str]]:
    """One period of mixers and one of MLP kinds, expanded and checked against the registry."""
    from archbench.archs import registry

    mixers = expand_period(list(arch.pattern.mixers), "arch.pattern.mixers",
                           registry.mixer_names())
    mlps = expand_period(list(arch.pattern.mlps), "arch.pattern.mlps", registry.mlp_names())
    return mixers, mlps


_LAYER_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.floordiv, ast.FloorDiv: operator.floordiv}


def _layer_index(text: Any, depth: int, key: str) -> int:
    """An `arch.pattern.at` entry at depth L = `depth`: an int, or an expression in L."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name) and node.id == "L":
            return depth
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _LAYER_OPS:
            return _LAYER_OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError

    try:
        return value(ast.parse(str(text), mode="eval"))
    except (ValueError, SyntaxError, ZeroDivisionError):
        raise ConfigError(f"{key}: {text!r} is not a layer index; write an integer or an "
                          "expression in L (the depth) with + - * / and integers, e.g. "
                          "'L/2' or 'L-1'") from None


def pinned_layers(arch: Any, depth: int | None = None) -> dict[int, str]:
    """{layer index: mixer} of `arch.pattern.at` at `depth` (default arch.n_layers), checked:
    known mixers, valid expressions, indices inside the depth, one mixer per layer. With no
    depth yet (0: solved later), only names and expressions are checked (at L = 1000)."""
    from archbench.archs import registry

    at = getattr(arch.pattern, "at", None) or {}
    depth = int(arch.n_layers if depth is None else depth)
    check_range = depth > 0
    out: dict[int, str] = {}
    for mixer, indices in at.items():
        key = f"arch.pattern.at.{mixer}"
        require_choice("arch.pattern.at", mixer, registry.mixer_names())
        if isinstance(indices, (str, int)) or indices is None:
            raise ConfigError(f"{key}={indices!r} is not allowed; give a list of layer indices")
        for text in indices:
            index = _layer_index(text, depth if check_range else 1000, key)
            if not check_range:
                continue
            if not -depth <= index < depth:
                raise ConfigError(f"{key}: {text!r} is layer {index}, outside arch.n_layers="
                                  f"{depth} (0 .. {depth - 1}, or negative from the end)")
            index %= depth
            if out.get(index, mixer) != mixer:
                raise ConfigError(f"arch.pattern.at puts both {out[index]!r} and {mixer!r} at "
                                  f"layer {index} (arch.n_layers={depth})")
            out[index] = mixer
    return out


def pattern_mixers(arch: Any) -> set[str]:
    """Every mixer a model of this arch may hold: the period's and the pinned ones."""
    mixers, _ = pattern_periods(arch)
    return set(mixers) | {str(m) for m in (getattr(arch.pattern, "at", None) or {})}


def validate_arch(arch: Any) -> None:
    """Shell settings, the pattern, every component's `kernels` choice (always: a typo there is
    caught even for an unused mixer), then the checks of each component the pattern uses."""
    from archbench.archs import registry
    from archbench.archs.kernels.linear import MATMUL_PATHS

    require_choice("arch.norm", arch.norm, NORM_KINDS)
    if not 0.0 <= float(arch.dropout) < 1.0:
        raise ConfigError(f"arch.dropout={arch.dropout} is not allowed; it must be in [0, 1)")
    require_choice("arch.embed_init", arch.embed_init, tuple(registry.embed_inits()))
    require_choice("arch.matmul", arch.matmul, ("auto", *MATMUL_PATHS))
    mixers, mlps = pattern_periods(arch)
    for key in ("d_model", "n_layers"):
        require_positive(f"arch.{key}", arch[key], allow_zero=True)
    require_positive("arch.size_tolerance", arch.get("size_tolerance"))
    for period, key in ((len(mixers), "arch.pattern.mixers"), (len(mlps), "arch.pattern.mlps")):
        if arch.n_layers and arch.n_layers % period:
            raise ConfigError(
                f"{key} has period {period}, which does not divide arch.n_layers={arch.n_layers}"
            )
    pinned_layers(arch)
    used = ({("mixer", m) for m in pattern_mixers(arch)}
            | {("mlp", m) for m in mlps if m != registry.NO_MLP})
    for comp in registry.all_components():
        if comp.kernels:
            key = comp.config_key
            require_choice(f"arch.{key}.kernels", arch[key].kernels, comp.kernels)
        if comp.validate is not None and (comp.role, comp.name) in used:
            comp.validate(arch)


def validate(cfg: Any) -> None:
    """Check every value that a type cannot; raise ConfigError naming the key, before any work."""
    validate_arch(cfg.arch)
    require_choice("size.metric", cfg.size.metric, SIZE_METRICS)
    require_positive("size.target", cfg.size.target)
    require_choice("tokenizer.kind", cfg.tokenizer.kind, TOKENIZER_KINDS)
    if cfg.tokenizer.kind == "file" and not cfg.tokenizer.path:
        raise ConfigError("tokenizer.path is required when tokenizer.kind='file'")
    if cfg.tokenizer.kind == "bpe" and cfg.tokenizer.vocab_size < 260:
        raise ConfigError(f"tokenizer.vocab_size={cfg.tokenizer.vocab_size} must be >= 260")
    require_choice("data.source", cfg.data.source, DATA_SOURCES)
    if cfg.data.source == "path" and not cfg.data.path:
        raise ConfigError("data.path is required when data.source='path'")
    if not 0.0 <= cfg.data.holdout_tail < 1.0:
        raise ConfigError(f"data.holdout_tail={cfg.data.holdout_tail} must be in [0, 1)")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1)")
    t = cfg.train
    for key in ("batch_size", "seq_len", "grad_accum", "eval_every", "log_every", "ckpt_every"):
        require_positive(f"train.{key}", t[key])
    for key in ("lr", "weight_decay", "grad_clip", "warmup_steps", "min_lr_ratio"):
        require_positive(f"train.{key}", t[key], allow_zero=key != "lr")
    if not (isinstance(t.tokens, (int, float)) or t.tokens == "chinchilla"):
        raise ConfigError(f"train.tokens={t.tokens!r} must be a number or 'chinchilla'")
    if isinstance(t.tokens, (int, float)):
        require_positive("train.tokens", t.tokens)
    require_choice("train.schedule", t.schedule, SCHEDULES)
    validate_stop_when(t.stop_when, cfg.data.source)
    require_choice("train.dtype", t.dtype, DTYPES)
    require_choice("train.distributed", t.distributed, ("none", "ddp", "fsdp"))
    require_choice("bench.dtype", cfg.bench.dtype, DTYPES)
    require_choice("logger.kind", cfg.logger.kind, ("none", "mlflow", "tensorboard"))
    g = cfg.generate
    if g.temperature < 0:
        raise ConfigError(f"generate.temperature={g.temperature} must be >= 0 (0 means greedy)")
    if g.top_p is not None and not 0 < g.top_p <= 1:
        raise ConfigError(f"generate.top_p={g.top_p} must be in (0, 1]")
    if g.min_p is not None and not 0 <= g.min_p <= 1:
        raise ConfigError(f"generate.min_p={g.min_p} must be in [0, 1]")
    if g.top_k is not None and g.top_k < 1:
        raise ConfigError(f"generate.top_k={g.top_k} must be >= 1")


def validate_stop_when(stop: Any, data_source: str) -> None:
    """train.stop_when: a known metric with exactly one bound, or nothing at all; accuracy only
    exists on synthetic tasks (data.source=task) and lies in [0, 1]."""
    bounds = {k: stop[k] for k in ("at_least", "at_most") if stop[k] is not None}
    if stop.metric is None:
        if bounds:
            raise ConfigError(f"train.stop_when has {bounds} but no metric; set "
                              f"train.stop_when.metric to one of {list(STOP_METRICS)}")
        return
    require_choice("train.stop_when.metric", stop.metric, STOP_METRICS)
    if len(bounds) != 1:
        raise ConfigError(f"train.stop_when={dict(metric=stop.metric, **bounds)} is not allowed; "
                          "give exactly one of train.stop_when.at_least or "
                          "train.stop_when.at_most")
    if stop.metric == "val_accuracy":
        if data_source != "task":
            raise ConfigError(f"train.stop_when.metric=val_accuracy is not allowed with "
                              f"data.source={data_source!r}: accuracy is measured on synthetic "
                              "tasks only (data.source=task); use val_loss or val_bpb")
        if stop.at_least is None or not 0.0 < float(stop.at_least) <= 1.0:
            raise ConfigError(f"train.stop_when for val_accuracy needs at_least in (0, 1]; got "
                              f"{bounds}")


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Resolved plain dict, for records and checkpoints."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


__all__ = ["MISSING", "ConfigError", "root_schema", "validate", "register_schema"]
