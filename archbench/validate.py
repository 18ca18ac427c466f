"""`archbench validate [+preset=gpu] [validate.only=[..]] [validate.skip=[..]] [overrides]`:
known published results, reproduced, each with a verdict.

A reproduction is one config of conf/validate/ (conf/validate/gpu/ for `+preset=gpu`, the
published scale): the claim, its source, how the run here is scaled, and a `compare`-style
experiment (studies of training runs with their evaluations, and/or benchmarks). Each runs
through `archbench compare`'s machinery (archbench/compare.py) in its own sweep folder
`<validate.sweep_root>/<name>`, so every stage is a separate process whose failure is recorded,
and running the command again only does what is missing (finished runs, evaluations with
records and benchmarks with results are skipped). Its records are then measured and judged by
the rule of its `validate.metric` (evaluate/reporting/validation.py), and one report,
`<validate.out>/report.md`, tabulates every claim with our number, its interval and the verdict.

A reproduction left out with `validate.skip` (or not in `validate.only`) is still judged when its
sweep folder holds results from an earlier run; otherwise its row says it was not run, and why.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from archbench.compare import Comparison, _parse, compose, finished, fixed_only, machine_text
from archbench.config import ConfigError
from archbench.io import write_text_atomic

GROUPS = {"cpu": "validate", "gpu": "validate/gpu"}
OWN_KEYS = ("validate.only", "validate.skip", "validate.out", "validate.sweep_root")


class Reproduction(Comparison):
    """One reproduction: a comparison whose experiment lives in conf/validate/; it writes no
    report of its own (the validation report covers the set)."""

    def __init__(self, argv: list[str], group: str) -> None:
        self.group = group
        super().__init__(argv)

    def report(self, seconds: float) -> Path:
        return self.sweep

    def expected_runs(self) -> list[Path]:
        """The run folders of every study's training jobs (whether or not they ran)."""
        out = []
        for study, spec in self.cc.studies.items():
            names = [b for b in self.cc.backbones if not spec.backbones or b in spec.backbones]
            extra = [*spec.train, *self.seed_overrides(spec)]
            for b in names:
                out += [d for d, _ in self.jobs(self.sweep / study, extra, b)]
        return out


def reproduction_names(group: str = GROUPS["cpu"]) -> list[str]:
    """The reproductions of a config group: one YAML file each."""
    folder = resources.files("archbench.conf").joinpath(*group.split("/"))
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def split_args(argv: list[str]) -> tuple[str, dict[str, Any], list[str]]:
    """(preset, the command's own validate.* settings, overrides for every reproduction)."""
    preset, own, rest = "cpu", {}, []
    for arg in argv:
        key = arg.lstrip("+").split("=", 1)[0]
        if arg.startswith("+preset="):
            preset = arg.split("=", 1)[1]
            if preset not in GROUPS:
                raise ConfigError(f"+preset={preset} is not allowed; choose one of "
                                  f"{sorted(GROUPS)}")
        elif key in OWN_KEYS:
            own[key.split(".", 1)[1]] = _parse([arg.lstrip("+")])[0].value()
        elif arg in ("-m", "--multirun"):
            raise ConfigError("archbench validate runs its own sweeps; drop -m")
        elif key.startswith("validate."):
            raise ConfigError(f"{key} is set by each conf/validate/<name>.yaml; the command "
                              f"takes {', '.join(OWN_KEYS)}")
        else:
            rest.append(arg)
    return preset, own, rest


def selected(names: list[str], only: list[str], skip: list[str]) -> list[str]:
    for key, given in (("validate.only", only), ("validate.skip", skip)):
        unknown = [n for n in given if n not in names]
        if unknown:
            raise ConfigError(f"{key}={list(given)} names {unknown}, which are not "
                              f"reproductions; choose from {names}")
    return [n for n in names if (not only or n in only) and n not in skip]


def judge(name: str, meta: Any, sweep: Path) -> Any:
    """The outcome of one reproduction from what its sweep folder holds now."""
    from archbench.evaluate.reporting.data import load
    from archbench.evaluate.reporting.validation import METRICS, Outcome

    if not sweep.is_dir():
        return Outcome.not_run("not run (no results in " + str(sweep) + ")")
    # the studies' and benchmarks' folders: not runs set aside as stale, nor tuning runs
    current = [p for p in sorted(sweep.iterdir()) if p.is_dir()
               and p.name not in ("stale", "logs") and not p.name.startswith("tune_")]
    col = load(current)
    params = OmegaConf.to_container(meta.params, resolve=True)
    outcome = METRICS[meta.metric](col.records, col.runs, params)
    failed = [r for r in _stage_records(sweep) if r.get("status") == "failed"]
    if failed and outcome.verdict != "reproduced":
        outcome.why = (outcome.why + "; " if outcome.why else "") + "failed stages: " + ", ".join(
            f"{r['stage']} {r['what']}" for r in failed)
    return outcome


def _stage_records(sweep: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in (sweep / "stages.jsonl").read_text().splitlines()
                if line.strip()]
    except (OSError, ValueError):
        return []


def run_one(name: str, group: str, own: dict[str, Any], rest: list[str]) -> dict[str, Any]:
    """Run (or resume) one reproduction and judge it; a row of the validation table."""
    root = Path(own.get("sweep_root", "multirun/validate"))
    sweep = root / (name if group == GROUPS["cpu"] else f"gpu/{name}")
    cfg = compose(name, fixed_only(rest), group)
    meta = cfg.validate
    began, cpu_before = time.time(), _child_cpu_seconds()
    reason = meta.not_run_here
    if not own.get("_run", True) and not sweep.is_dir():
        reason = "left out by validate.only / validate.skip, and no earlier results"
    if group == GROUPS["gpu"] and reason is None and not _has_cuda():
        reason = "needs a GPU: +preset=gpu runs the published scale"
    missing: list[Path] = []
    if reason is None:
        try:
            rep = Reproduction([f"+experiment={name}", f"compare.sweep_dir={sweep}", *rest],
                               group)
            if own.get("_run", True):
                print(f"validate {name}: {meta.claim}", flush=True)
                rep.run()
            expected = rep.expected_runs()
            missing = [d for d in expected if not finished(d)]
        except ConfigError:
            raise
        except Exception as exc:  # one reproduction that breaks does not stop the others
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    from archbench.evaluate.reporting.validation import NOT_RUN, Outcome

    outcome = Outcome.not_run(reason) if reason else judge(name, meta, sweep)
    if missing and not reason and outcome.verdict != NOT_RUN:
        # a partial sweep (stopped, or runs that failed) is reported as such, never judged
        outcome.verdict = NOT_RUN
        outcome.why = (f"incomplete: {len(missing)} of {len(expected)} training runs not "
                       "finished (stopped or failed; the measurement shown is partial); run "
                       f"`archbench validate validate.only=[{name}]` again to finish")
    row = {"name": name, "claim": meta.claim, "source": meta.source, "scaling": meta.scaling,
           "rule": meta.rule, "metric": meta.metric, "sweep": str(sweep),
           "seconds": time.time() - began, "cpu_seconds": _child_cpu_seconds() - cpu_before,
           **asdict(outcome)}
    row["first_run"] = _first_run(sweep, row)
    if sweep.is_dir():
        write_text_atomic(sweep / "validation.json", json.dumps(row, default=str, indent=1))
    print(f"validate {name}: {outcome.verdict}" + (f" ({outcome.why})" if outcome.why else ""),
          flush=True)
    return row


def _first_run(sweep: Path, row: dict[str, Any]) -> dict[str, Any]:
    """Wall and stage CPU seconds of the invocation that did the work: this one, unless it
    found everything done (under a second of stage CPU) and an earlier one recorded its cost."""
    if row["cpu_seconds"] < 1.0:
        try:
            earlier = json.loads((sweep / "validation.json").read_text()).get("first_run")
        except (OSError, ValueError, AttributeError):
            earlier = None
        return earlier or {}  # {}: done by an invocation that did not record its cost
    return {"seconds": row["seconds"], "cpu_seconds": row["cpu_seconds"],
            "load": os.getloadavg()[0]}


def _child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # no torch CUDA runtime: no GPU to run on
        return False


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    began = time.time()
    load_before = os.getloadavg()[0]
    try:
        preset, own, rest = split_args(argv)
        group = GROUPS[preset]
        names = reproduction_names(group)
        chosen = selected(names, list(own.get("only", [])), list(own.get("skip", [])))
    except ConfigError as exc:
        print(f"archbench: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    rows = []
    for name in names:
        try:
            rows.append(run_one(name, group, {**own, "_run": name in chosen}, rest))
        except ConfigError as exc:
            print(f"archbench: config error: {exc}", file=sys.stderr)
            sys.exit(2)
    from archbench.evaluate.reporting.validation import write_report

    out = Path(own.get("out", "reports/validation" if preset == "cpu"
                       else "reports/validation-gpu"))
    header = {"command": " ".join(["archbench validate", *argv]), "machine": machine_text(),
              "seconds": time.time() - began, "load": (load_before, os.getloadavg()[0]),
              "preset": preset, "ran": chosen}
    path = write_report(rows, out, header)
    print(f"report: {path}")
