"""`archbench <command> [hydra overrides]`: every stage is a Hydra app over the same conf/ tree,
so `-m` turns any of them into a sweep and `--cfg job` prints the resolved config."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from archbench.config import ConfigError, register_schema, validate
from archbench.config_keys import check_known_keys
from archbench.runlock import run_folder_lock
from archbench.train.resume import record_subdir

register_schema()
# conf/config.yaml: hydra.output_subdir, so a later start never overwrites the first one's record.
OmegaConf.register_new_resolver("archbench.record_subdir", record_subdir, replace=True)
# conf/hydra/launcher/{joblib,submitit_*}.yaml spell out every field of the plugin's own config of
# the same name, so Hydra 1.3 checks them against it (a typo fails) and warns that this matching
# is deprecated; they do not rely on it, so the warning is noise.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against "
                        "ConfigStore schema")

CONF = "pkg://archbench.conf"
USAGE = """usage: archbench COMMAND [key=value ...] [-m]

commands:
  train     train a backbone            archbench train arch=mamba size=tiny train.tokens=1e6
  info      sizes, FLOPs, memory        archbench info arch=jamba size=m
  generate  sample from a checkpoint    archbench generate ckpt=runs/X "prompt='def main'"
  eval      quality evaluations         archbench eval ckpt=runs/X eval.tasks=[bpb,mqar]
  bench     speed and memory            archbench bench arch=rwkv7 bench=cpu_smoke
  compare   the default comparison      archbench compare
  validate  published results, redone  archbench validate validate.only=[decoding_memory]
  report    build a report from runs    archbench report multirun/ runs/ -o reports/latest
  import    a Hugging Face model in     archbench import state-spaces/mamba-130m-hf out=runs/m130
  export    a checkpoint as HF folder   archbench export ckpt=runs/X out=hf/X

Any command takes Hydra overrides; -m sweeps (e.g. arch=transformer,mamba -m).
Resolved config: archbench train --cfg job
"""


def output_dir(cfg: DictConfig) -> Path:
    if cfg.get("out_dir"):
        return Path(cfg.out_dir)
    return Path(HydraConfig.get().runtime.output_dir)


def _in_sweep() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _checked(fn: Callable[[DictConfig], Any],
             on_error: Callable[[DictConfig, Exception], None] | None = None
             ) -> Callable[[DictConfig], Any]:
    """Validate before any work, and turn config errors into one clear line and exit code 2.
    In a sweep the error is raised instead: Hydra then marks that job failed and runs the others
    (an exit would end the whole sweep). `on_error` records the failure first."""

    def run(cfg: DictConfig) -> Any:
        try:
            validate(cfg)
            check_known_keys(cfg)
            return fn(cfg)  # commands check their own settings too (e.g. sampling)
        except ConfigError as exc:
            if on_error is not None:
                on_error(cfg, exc)
            if _in_sweep():
                raise
            print(f"archbench: config error: {exc}", file=sys.stderr)
            sys.exit(2)
        except Exception as exc:
            if not _said_in_full(exc) or _in_sweep():
                raise
            print(f"archbench: {exc}", file=sys.stderr)
            sys.exit(1)

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _said_in_full(exc: BaseException) -> bool:
    """Errors whose message names the file or folder and the fix (a corrupt or mismatched
    checkpoint, a folder another process writes, evaluations that failed and were recorded):
    one line, no traceback. Those classes set `one_line = True`."""
    return bool(getattr(exc, "one_line", False))


def _record_train_failure(cfg: DictConfig, exc: Exception) -> None:
    """A config error is recorded in a new folder (a sweep's report lists it), never over a
    folder that already holds a run: a failed start leaves that run's record as it was."""
    from archbench.train.resume import holds_a_run
    from archbench.train.trainer import record_failure

    if not holds_a_run(output_dir(cfg)):
        record_failure(cfg, output_dir(cfg), exc)


@hydra.main(config_path=CONF, config_name="config", version_base="1.3")
@partial(_checked, on_error=_record_train_failure)
def train_app(cfg: DictConfig) -> float | None:
    from archbench.train.distributed import process_rank
    from archbench.train.resume import plan_start
    from archbench.train.trainer import run_training

    run_dir = output_dir(cfg)
    writer = process_rank() == 0  # under torchrun or submitit, rank 0 writes the folder
    with run_folder_lock(run_dir) if writer else nullcontext():
        plan = plan_start(cfg, run_dir, list(HydraConfig.get().overrides.task))
        if plan.message:
            print(plan.message)
        if plan.cfg is None:
            return None
        summary = run_training(plan.cfg, run_dir)
    final = summary.get("final", {})
    if summary:  # empty on ranks > 0 of a distributed run: rank 0 reports
        print(f"run dir: {run_dir}  val_loss={final.get('loss')}  val_bpb={final.get('bpb')}")
    return final.get("loss")


@hydra.main(config_path=CONF, config_name="config", version_base="1.3")
@_checked
def info_app(cfg: DictConfig) -> None:
    from archbench.archs.info import print_info

    print_info(cfg)


def _check_requested_tokenizer(cfg: DictConfig, checkpoints: list[Path]) -> None:
    """A tokenizer named on the eval / generate command line must be the checkpoints' own."""
    given = [o for o in HydraConfig.get().overrides.task
             if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == "tokenizer"]
    if not given:
        return
    from archbench.train.checkpoint import check_configured_tokenizer, find_checkpoint

    for path in checkpoints:
        ckpt = find_checkpoint(path)
        if ckpt is not None:
            check_configured_tokenizer(cfg.tokenizer, ckpt)


@hydra.main(config_path=CONF, config_name="config", version_base="1.3")
@_checked
def generate_app(cfg: DictConfig) -> None:
    from archbench.evaluate.generation.generate import run_generate

    if cfg.get("ckpt"):
        _check_requested_tokenizer(cfg, [Path(cfg.ckpt)])
    run_generate(cfg)


@hydra.main(config_path=CONF, config_name="config", version_base="1.3")
@_checked
def eval_app(cfg: DictConfig) -> None:
    from archbench.evaluate.quality.runner import expand_checkpoints, run_eval

    if cfg.get("ckpt"):
        _check_requested_tokenizer(cfg, expand_checkpoints(str(cfg.ckpt)))
    run_eval(cfg)


@hydra.main(config_path=CONF, config_name="config", version_base="1.3")
@_checked
def bench_app(cfg: DictConfig) -> None:
    from archbench.evaluate.bench.runner import run_bench

    run_bench(cfg)


# Commands that write nothing to a run directory keep Hydra from making one.
_NO_RUN_DIR = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
               "hydra/hydra_logging=disabled"]

COMMANDS: dict[str, tuple[Callable[[], Any], list[str]]] = {
    "train": (train_app, []),
    "info": (info_app, _NO_RUN_DIR),
    "generate": (generate_app, _NO_RUN_DIR),
    "eval": (eval_app, _NO_RUN_DIR),  # records go to the checkpoint's run directory
    "bench": (bench_app, []),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "report":
        from archbench.evaluate.reporting.build import main as report_main

        report_main(rest)
        return
    if command == "compare":
        from archbench.compare import main as compare_main

        compare_main(rest)
        return
    if command == "validate":
        from archbench.validate import main as validate_main

        validate_main(rest)
        return
    if command in ("import", "export"):
        from archbench.hf import main as hf_main

        hf_main(command, rest)
        return
    if command not in COMMANDS:
        print(f"archbench: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    app, defaults = COMMANDS[command]
    extra = [d for d in defaults if d.split("=")[0] not in {a.split("=")[0] for a in rest}]
    if "-m" in rest or "--multirun" in rest:
        extra = [d for d in extra if not d.startswith("hydra.run")]
    sys.argv = [f"archbench-{command}", *extra, *rest]
    app()


if __name__ == "__main__":
    main()
