"""`archbench compare [+preset=gpu] [overrides]`: the default comparison, end to end.

Every backbone of `compare.backbones` that exists and builds is trained at one matched size on
the same tokens (one Hydra multirun per study: `archbench train ... -m`), each run is evaluated
(`archbench eval`), each backbone is benchmarked (`archbench bench ... -m`), and one report is
built (evaluate/reporting/build.py). Settings live in conf/experiment/compare.yaml
(compare_gpu.yaml for `+preset=gpu`); any other override is passed to every stage, `compare.*`
ones configure this driver.

Why subprocesses: each stage is its own process, so one failure (an out-of-memory, a backbone that
breaks) is recorded in `<sweep>/stages.jsonl`, shown in the report, and the rest go on. The sweep
folders are fixed (`compare.sweep_dir`), so a second `archbench compare` finds what is done:
finished training runs, evaluations whose records exist and completed benchmarks are skipped, and
only the missing pieces run. Run folders are named by backbone and study,
e.g. `multirun/compare/lm/mamba` (values swept with a comma list join the name); a finished run
whose settings differ from the ones asked for now is moved to `<sweep>/stale/` and
trained again, so a changed setting never reuses a run trained under another.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from archbench.io import read_jsonl, write_text_atomic
from archbench.tuning import LrChoice, TuningError, select_lr

PRESETS = {"cpu": "compare", "gpu": "compare_gpu"}
# Lines of a stage's output worth showing live; everything goes to the stage's log file.
ECHO = ("run dir:", "skipping", "[bench]", "archbench:", "Error", "error:", "resumed")


# ---- configuration --------------------------------------------------------------------------

def split_argv(argv: list[str]) -> tuple[str, list[str], list[str]]:
    """(experiment, compare.* overrides, overrides for every stage) of the command line."""
    experiment = PRESETS["cpu"]
    own, stage = [], []
    for arg in argv:
        if arg.startswith("+preset="):
            name = arg.split("=", 1)[1]
            if name not in PRESETS:
                raise SystemExit(f"archbench compare: unknown preset {name!r}; "
                                 f"choose one of {sorted(PRESETS)}")
            experiment = PRESETS[name]
        elif arg.startswith("+experiment="):
            experiment = arg.split("=", 1)[1]
        elif arg in ("-m", "--multirun"):
            raise SystemExit("archbench compare runs its own sweeps; drop -m")
        elif arg.lstrip("+").startswith("compare."):
            own.append(arg)
        else:
            stage.append(arg)
    return experiment, own, stage


def compose(experiment: str, overrides: list[str], group: str = "experiment") -> DictConfig:
    """The config a stage of this experiment sees (the same tree, schema and validation);
    `group` is the config group that holds it (conf/experiment/, or conf/validate/ for the
    reproductions of `archbench validate`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from archbench.config import register_schema

    register_schema()
    with initialize_config_module(config_module="archbench.conf", version_base="1.3"):
        return hydra_compose(config_name="config", return_hydra_config=True,
                             overrides=[f"+{group}={experiment}", *overrides])


def archbench_exe() -> list[str]:
    """The console script of this environment (never `python -m` from a source checkout, whose
    evaluate/ folder would shadow Hugging Face's `evaluate` for lm-eval)."""
    local = Path(sys.executable).parent / "archbench"
    if local.is_file():
        return [str(local)]
    found = shutil.which("archbench")
    if not found:
        raise SystemExit("archbench compare: the `archbench` command is not on PATH")
    return [found]


def _parse(overrides: Iterable[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def expand_jobs(overrides: list[str]) -> list[list[str]]:
    """The override lines of each job of `-m` over `overrides` (comma lists are swept), in the
    form Hydra's basic sweeper gives them to the job."""
    fixed: list[str] = []
    swept: list[list[str]] = []
    for o in _parse(overrides):
        if o.is_sweep_override():
            swept.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            fixed.append(o.input_line)
    return [fixed + list(combo) for combo in itertools.product(*swept)]


def fixed_only(overrides: Iterable[str]) -> list[str]:
    """The overrides that are not comma-list sweeps (for a stage that must not sweep them)."""
    overrides = list(overrides)
    return [line for line, o in zip(overrides, _parse(overrides), strict=True)
            if not o.is_sweep_override()]


def override_dirname(job: list[str], exclude: Iterable[str]) -> str:
    """Hydra's `hydra.job.override_dirname` of one job (sorted `key=value`, excluded keys out)."""
    exclude = set(exclude)
    return ",".join(sorted(o.input_line for o in _parse(job) if o.key_or_group not in exclude))


def quote(value: str) -> str:
    """A Hydra override value as one quoted string (paths hold ',' and '=')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ---- stages ---------------------------------------------------------------------------------

@dataclass
class Stages:
    """Stage records of this invocation: what ran, how long, how it ended (the report reads
    them; a failed stage is flagged there)."""

    path: Path | None  # None: a dry run writes nothing
    records: list[dict[str, Any]] = field(default_factory=list)

    def add(self, stage: str, what: str, status: str, **extra: Any) -> dict[str, Any]:
        rec = {"kind": "stage", "stage": stage, "what": what, "status": status, **extra}
        self.records.append(rec)
        if self.path is not None:
            write_text_atomic(self.path, "".join(json.dumps(r, default=str) + "\n"
                                                 for r in self.records))
        return rec


def run_stage(cmd: list[str], log: Path, env_extra: dict[str, str] | None = None
              ) -> tuple[int, float]:
    """Run one stage process; its output goes to `log`, the telling lines also to the console."""
    log.parent.mkdir(parents=True, exist_ok=True)
    began = time.time()
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    # Idle OpenMP threads sleep instead of spinning: on a small shared CPU, spinning threads
    # waiting for a descheduled partner made a training step up to 15x slower (measured on the
    # 2-core demo machine: 6.8 s against 0.30 s per step); results are unchanged.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with open(log, "w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            if line.lstrip().startswith(ECHO):
                print("    " + line.rstrip(), flush=True)
        code = proc.wait()
    return code, time.time() - began


TRAIN_SECTIONS = ("arch", "size", "tokenizer", "data", "train")
BENCH_SECTIONS = ("arch", "size", "tokenizer", "bench")
# Settings that do not change what a run computes.
IGNORED = {"train.progress", "train.resume", "data.cache_dir", "tokenizer.cache_dir",
           "bench.timeout_s"}


def differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """Keys whose values differ; a key only one side has is not a difference (the schema grew
    or shrank since that run, its value was the default then)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) & set(now)):
            out += differences(saved[key], now[key], f"{prefix}{key}.")
        return out
    key = prefix.rstrip(".")
    if key in IGNORED or saved == now:
        return []
    if isinstance(saved, (int, float)) and isinstance(now, (int, float)) and float(saved) == float(
            now):
        return []
    return [f"{key}: {saved!r} then, {now!r} now"]


def _summary(run_dir: Path) -> dict[str, Any]:
    try:
        out = json.loads((run_dir / "summary.json").read_text())
        return out if isinstance(out, dict) else {}
    except (OSError, ValueError):
        return {}


def _records(folder: Path) -> list[dict[str, Any]]:
    try:
        return read_jsonl(folder / "records.jsonl")
    except (OSError, ValueError):
        return []


def finished(run_dir: Path) -> bool:
    return _summary(run_dir).get("status") == "finished"


def eval_done(run_dir: Path, tasks: list[str]) -> list[str]:
    """Tasks of `tasks` that still have no evaluation record in the run's records.jsonl (a
    record of a failed evaluation does not count: a re-run tries it again)."""
    have: set[str] = set()
    try:
        for rec in read_jsonl(run_dir / "records.jsonl"):
            if rec.get("kind") == "eval" and rec.get("status") != "failed":
                have.add(str(rec.get("eval")))
                if rec.get("eval") == "lm_eval":
                    have.add(str((rec.get("params") or {}).get("task")))
    except (OSError, ValueError):
        pass
    return [t for t in tasks if t not in have]


def failed_tasks(run_dir: Path, tasks: list[str]) -> list[str]:
    """Tasks of `tasks` with a record of a failed evaluation in the run's records.jsonl."""
    try:
        failed = {str(r.get("eval")) for r in read_jsonl(run_dir / "records.jsonl")
                  if r.get("kind") == "eval" and r.get("status") == "failed"}
    except (OSError, ValueError):
        return []
    return [t for t in tasks if t in failed]


# ---- the comparison -------------------------------------------------------------------------

class Comparison:
    group = "experiment"  # the config group of `self.experiment` (archbench validate: validate)

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.experiment, own, self.stage_overrides = split_argv(argv)
        self.cfg = compose(self.experiment, [*own, *fixed_only(self.stage_overrides)], self.group)
        self.cc = self.cfg.compare
        self.sweep = Path(self.cc.sweep_dir)
        self.dry = bool(self.cc.dry_run)
        if not self.dry:
            self.sweep.mkdir(parents=True, exist_ok=True)
        self.stages = Stages(None if self.dry else self.sweep / "stages.jsonl")
        self.exe = archbench_exe()
        self.arch_overrides: dict[str, list[str]] = {
            k: list(v) for k, v in OmegaConf.to_container(self.cc.arch_overrides).items()}
        check_tuning(self.cc)
        self.tuned: dict[str, float] = {}  # backbone -> learning rate of the current study
        self.forced: list[str] = []  # overrides that win over the user's (tuning budget)
        self.report_inputs: list[Path] = [self.sweep / "stages.jsonl"]
        self.load_before = os.getloadavg()[0]
        self.command = " ".join(["archbench compare", *argv])

    def overrides(self, extra: list[str], arch_ov: list[str] = ()) -> list[str]:
        """A stage's overrides: the study's, the backbone's, then the user's (which win), then
        what the stage itself must fix (the tuning budget)."""
        return [f"+{self.group}={self.experiment}", *extra, *arch_ov, *self.stage_overrides,
                *self.forced]

    # ---- which backbones ----------------------------------------------------------------------
    def lineup(self) -> list[str]:
        from archbench.archs.sizing import solve_size
        from archbench.config import validate
        from archbench.train.tokenizer import vocab_size_of

        arch_dir = resources.files("archbench.conf") / "arch"
        ready = []
        for name in self.cc.backbones:
            if not (arch_dir / f"{name}.yaml").is_file():
                self.stages.add("check", name, "skipped", reason=f"no conf/arch/{name}.yaml")
                print(f"  {name}: skipped (no conf/arch/{name}.yaml)")
                continue
            try:
                cfg = compose(self.experiment, [*fixed_only(self.stage_overrides),
                                                *self.arch_overrides.get(name, []),
                                                f"arch={name}"], self.group)
                validate(cfg)
                solve_size(cfg.arch, cfg.size, vocab_size_of(cfg.tokenizer)[0])
            except Exception as exc:  # an arch that does not import or fit is left out, said why
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                self.stages.add("check", name, "skipped", reason=reason)
                print(f"  {name}: skipped ({reason})")
                continue
            ready.append(name)
        return ready

    def backbone_overrides(self, name: str) -> list[str]:
        """The backbone's own overrides: `compare.arch_overrides`, then its tuned learning rate
        in the study being trained (a user's `train.lr=...` on the command line still wins)."""
        own = list(self.arch_overrides.get(name, []))
        if name in self.tuned:
            own.append(f"train.lr={self.tuned[name]:g}")
        return own

    def groups(self, backbones: list[str]) -> list[tuple[list[str], list[str]]]:
        """Backbones that share their own overrides run in one multirun."""
        out: dict[tuple[str, ...], list[str]] = {}
        for name in backbones:
            out.setdefault(tuple(self.backbone_overrides(name)), []).append(name)
        return [(list(k), v) for k, v in out.items()]

    def outcome(self, ok: bool) -> str:
        return "dry-run" if self.dry else "ok" if ok else "failed"

    def stage(self, cmd: list[str], log: Path, parallel: bool = False) -> tuple[int, float]:
        """Run a stage; `parallel` stages (training, evaluation) run `compare.parallel` jobs at
        once, each with its share of the cores (never the benchmarks: they time one job alone)."""
        env: dict[str, str] = {}
        jobs = int(self.cc.parallel)
        if parallel and jobs > 1:
            cmd = [*cmd[:-1], "hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}", cmd[-1]]
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
        if self.dry:
            print("    $ " + " ".join(cmd))
            return 0, 0.0
        return run_stage(cmd, log, env)

    def jobs(self, folder: Path, extra: list[str], name: str) -> list[tuple[Path, list[str]]]:
        """(run folder, overrides) of each job that `-m` over `extra` gives backbone `name`."""
        out = []
        for job in expand_jobs([*self.overrides(extra, self.backbone_overrides(name)),
                                f"arch={name}"]):
            sub = override_dirname(job, self.exclude(extra))
            out.append((folder / name / sub if sub else folder / name, job))
        return out

    def exclude(self, extra: list[str]) -> list[str]:
        """Keys kept out of run folder names: all but those swept by the user. A fixed setting
        that changed is caught by comparing configs (`stale`), so names stay short."""
        own = [o for v in self.arch_overrides.values() for o in v]
        own += [f"train.lr={lr:g}" for lr in self.tuned.values()]
        fixed = self.overrides(extra, own)
        swept = {o.key_or_group for o in _parse(fixed) if o.is_sweep_override()}
        keys = {o.key_or_group for o in _parse(fixed)} | {"arch"}
        base = set(self.cfg.hydra.job.config.override_dirname.exclude_keys)
        return sorted((keys - swept) | base)

    def sweep_cmd(self, command: str, folder: Path, extra: list[str], arch_ov: list[str],
                  names: list[str]) -> list[str]:
        return [*self.exe, command, *self.overrides(extra, arch_ov), f"arch={','.join(names)}",
                f"hydra.sweep.dir={folder}",
                "hydra.sweep.subdir=${arch.name}/${hydra.job.override_dirname}",
                f"hydra.job.config.override_dirname.exclude_keys=[{','.join(self.exclude(extra))}]",
                "-m"]  # last: Hydra's argument parser wants the overrides together

    def stale(self, saved: dict[str, Any] | None, job: list[str], sections: tuple[str, ...]
              ) -> list[str]:
        """Settings in which a finished run differs from what this job would run now."""
        cfg = compose(self.experiment, [o for o in job if not o.startswith(f"+{self.group}=")],
                      self.group)
        now = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in sections}
        return differences({k: (saved or {}).get(k) for k in sections}, now)

    def set_aside(self, run_dir: Path, why: list[str]) -> None:
        """A finished run made under other settings is moved away (kept, never deleted), out of
        the study folders so no later stage or report reads it as current."""
        rel = run_dir.relative_to(self.sweep)
        target = self.sweep / "stale" / f"{'_'.join(rel.parts)}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        run_dir.rename(target)
        print(f"  {run_dir} was made with other settings ({'; '.join(why[:3])}); "
              f"moved to {target}")

    # ---- train ----------------------------------------------------------------------------
    def train(self, study: str, extra: list[str], backbones: list[str]) -> dict[str, list[Path]]:
        folder = self.sweep / study
        jobs = {b: self.jobs(folder, extra, b) for b in backbones}
        for d, job in (j for js in jobs.values() for j in js):
            if finished(d):
                why = self.stale(_summary(d).get("config"), job, TRAIN_SECTIONS)
                if why:
                    self.set_aside(d, why)
        runs = {b: [d for d, _ in js] for b, js in jobs.items()}
        for arch_ov, names in self.groups(backbones):
            todo = [b for b in names if not all(finished(d) for d in runs[b])]
            for b in (n for n in names if n not in todo):
                for d in runs[b]:
                    print(f"  skipping {d}: already finished")
                self.stages.add("train", f"{study}: {b}", "skipped", reason="finished")
            if not todo:
                continue
            what = f"{study}: {', '.join(todo)}"
            print(f"  train {what} ...", flush=True)
            log = self.sweep / "logs" / f"train_{study}_{'_'.join(todo)}.log"
            cmd = self.sweep_cmd("train", folder, [*extra, "train.progress=false"], arch_ov, todo)
            code, secs = self.stage(cmd, log, parallel=True)
            for b in todo:
                ok = all(finished(d) for d in runs[b])
                self.stages.add("train", f"{study}: {b}", self.outcome(ok),
                                returncode=code, seconds=secs / len(todo), log=str(log))
        return runs

    def write_plan(self, backbones: list[str]) -> None:
        """What the report needs to know of this comparison beyond the runs: the reference
        backbone of its paired intervals, the seeds, the tuning grid."""
        if self.dry:
            return
        reference = self.cc.reference or next(
            (b for b in ("transformer", *backbones) if b in backbones), None)
        plan = {"kind": "compare", "reference": reference, "backbones": backbones,
                "seeds": [int(x) for x in self.cc.seeds],
                "tune": OmegaConf.to_container(self.cc.tune, resolve=True),
                "studies": list(self.cc.studies),
                "load_average": self.load_before, "cpu_count": os.cpu_count()}
        path = self.sweep / "compare.jsonl"
        write_text_atomic(path, json.dumps(plan) + "\n")
        self.report_inputs.append(path)

    # ---- learning rates -------------------------------------------------------------------
    def seed_overrides(self, spec: Any) -> list[str]:
        """`train.seed=` of a study's main runs: its `seeds`, else `compare.seeds`, unless the
        study's overrides or the user's set train.seed themselves."""
        if any(o.key_or_group == "train.seed"
               for o in _parse([*spec.train, *self.stage_overrides])):
            return []
        seeds = [int(s) for s in (self.cc.seeds if spec.seeds is None else spec.seeds)]
        return [f"train.seed={','.join(str(s) for s in seeds)}"]

    def tune(self, study: str, extra: list[str], backbones: list[str]) -> dict[str, float]:
        """Short runs of every backbone at each learning rate of `compare.tune.lrs` (folder
        `<sweep>/tune_<study>/`); returns each backbone's rate of lowest final validation loss.
        An edge winner gets `extend_by` more rates beyond that edge, once."""
        tc = self.cc.tune
        grid = [float(x) for x in tc.lrs]
        base = [*extra, *tc.overrides]
        name = f"tune_{study}"
        # the tuning budget wins over a user's train.tokens, which sizes the main runs
        self.forced = [f"train.tokens={float(tc.tokens):g}"]
        try:
            return self._tune(study, name, base, grid, backbones)
        finally:
            self.forced = []

    def _tune(self, study: str, name: str, base: list[str], grid: list[float],
              backbones: list[str]) -> dict[str, float]:
        tc = self.cc.tune
        runs = self.train(name, [*base, lr_sweep(grid)], backbones)
        choices = {b: choose(runs[b]) for b in backbones}
        edge = {b: c for b, c in choices.items() if c is not None and c.at_edge and c.extension}
        if tc.extend and edge:
            for ext, names in _by_extension(edge).items():
                more = self.train(name, [*base, lr_sweep(ext)], names)
                for b in names:
                    runs[b] += more[b]
                    choices[b] = choose(runs[b])
        records = []
        for b in backbones:
            c = choices[b]
            if c is None:
                print(f"  tune {study}: {b}: no finished tuning run; its main run keeps "
                      f"train.lr of the experiment")
                continue
            flag = f" (best at the {c.edge} edge of the grid)" if c.at_edge else ""
            print(f"  tune {study}: {b}: lr {c.lr:g}{flag}")
            records.append(tuning_record(study, b, c, float(tc.tokens), grid))
        if not self.dry:
            path = self.sweep / name / "tuning.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
            self.report_inputs.append(path)
        return {r["arch"]: r["chosen_lr"] for r in records}

    # ---- eval -----------------------------------------------------------------------------
    def evaluate(self, study: str, evals: list[Any], runs: dict[str, list[Path]]) -> None:
        """One `archbench eval -m` over the runs (a failing run is one failed job, the others go
        on) per evaluation call; a run whose records hold a task already is not evaluated again
        on it."""
        done_runs = [(b, d) for b, dirs in runs.items() for d in dirs if finished(d) or self.dry]
        for i, call in enumerate(evals):
            name = "+".join(call.tasks)
            todo: dict[tuple[str, ...], list[tuple[str, Path]]] = {}
            for b, run_dir in done_runs:
                missing = tuple(eval_done(run_dir, list(call.tasks)))
                if missing:
                    todo.setdefault(missing, []).append((b, run_dir))
                else:
                    print(f"  skipping eval {name} of {run_dir}: records present")
                    self.stages.add("eval", f"{study}: {b} {name}", "skipped",
                                    reason="records present")
            for tasks, targets in todo.items():
                names = ", ".join(b for b, _ in targets)
                print(f"  eval {study} {'+'.join(tasks)}: {names} ...", flush=True)
                log = self.sweep / "logs" / f"eval_{study}_{i}_{names.replace(', ', '_')}.log"
                ckpts = ",".join(quote(str(d)) for _, d in targets)
                # a sweep of the user's (train.seed=0,1) made the runs; each is evaluated once
                cmd = [*self.exe, "eval", *fixed_only(self.overrides(list(call.overrides))),
                       f"eval.tasks=[{','.join(tasks)}]", f"ckpt={ckpts}",
                       f"hydra.sweep.dir={self.sweep / 'logs' / f'eval_{study}_{i}'}",
                       "hydra.sweep.subdir=${hydra.job.num}", "-m"]
                code, secs = self.stage(cmd, log, parallel=True)
                for b, run_dir in targets:
                    left = eval_done(run_dir, list(tasks))
                    # a grid that failed part-way leaves records of its other cells: the task
                    # counts as done (no duplicates on a re-run), the stage as failed
                    broken = failed_tasks(run_dir, list(tasks)) if code else []
                    self.stages.add("eval", f"{study}: {b} {'+'.join(tasks)}",
                                    self.outcome(not left and not broken), returncode=code,
                                    seconds=secs / len(targets), log=str(log), missing=left,
                                    failed=broken)

    # ---- bench ----------------------------------------------------------------------------
    def bench(self, backbones: list[str]) -> None:
        folder = self.sweep / "bench"
        extra = list(self.cc.bench_overrides)
        jobs = {b: self.jobs(folder, extra, b) for b in backbones}
        for d, job in (j for js in jobs.values() for j in js):
            if (d / "bench.csv").is_file():
                saved = next((r.get("config") for r in _records(d) if r.get("kind") == "bench"),
                             None)
                why = self.stale(saved, job, BENCH_SECTIONS)
                if why:
                    self.set_aside(d, why)
        dirs = {b: [d for d, _ in js] for b, js in jobs.items()}
        for arch_ov, names in self.groups(backbones):
            todo = [b for b in names if not all((d / "bench.csv").is_file() for d in dirs[b])]
            for b in (n for n in names if n not in todo):
                print(f"  skipping bench of {b}: bench.csv present")
                self.stages.add("bench", b, "skipped", reason="bench.csv present")
            if not todo:
                continue
            for b in todo:  # a half-done benchmark is redone whole, not appended to
                for d in dirs[b]:
                    if (d / "records.jsonl").is_file():
                        (d / "records.jsonl").unlink()
            print(f"  bench {', '.join(todo)} ...", flush=True)
            log = self.sweep / "logs" / f"bench_{'_'.join(todo)}.log"
            code, secs = self.stage(self.sweep_cmd("bench", folder, extra, arch_ov, todo), log)
            for b in todo:
                ok = all((d / "bench.csv").is_file() for d in dirs[b])
                self.stages.add("bench", b, self.outcome(ok), returncode=code,
                                seconds=secs / len(todo), log=str(log))
        self.report_inputs += [d for ds in dirs.values() for d in ds if d.is_dir()]

    # ---- all ------------------------------------------------------------------------------
    def run(self) -> Path | None:
        began = time.time()
        print(f"archbench compare: experiment {self.experiment}, sweep folder {self.sweep}")
        backbones = self.lineup()
        print(f"  backbones: {', '.join(backbones) or 'none'}")
        self.write_plan(backbones)
        for study, spec in self.cc.studies.items():
            chosen = [b for b in backbones if not spec.backbones or b in spec.backbones]
            self.tuned = {}
            if study in self.cc.tune.studies:
                self.tuned = self.tune(study, list(spec.train), chosen)
            runs = self.train(study, [*list(spec.train), *self.seed_overrides(spec)], chosen)
            self.evaluate(study, list(spec.evals), runs)
            self.report_inputs += [d for ds in runs.values() for d in ds if d.is_dir()]
        self.tuned = {}
        if self.cc.bench:
            self.bench(backbones)
        if self.dry:
            return None
        return self.report(time.time() - began)

    def report(self, seconds: float) -> Path:
        from archbench.evaluate.reporting.build import build_report

        t = self.cfg.train
        preamble = [
            "## How this report was made", "",
            f"Command: `{self.command}` (experiment "
            f"`conf/experiment/{self.experiment}.yaml`), sweep folder `{self.sweep}`.", "",
            f"Machine: {machine_text()}.", "",
            f"Time: {seconds:.0f} s wall for this invocation, {_child_cpu_seconds():.0f} s of "
            f"CPU in its stage processes; load average {self.load_before:.1f} when it started "
            f"(other processes on the machine), {os.getloadavg()[0]:.1f} at the end. Stages "
            "skipped because they were done take no time (stage table under Provenance).", "",
            f"Setting: size `{self.cfg.size.name}` ({self.cfg.size.metric} target "
            f"{self.cfg.size.target:g}), tokenizer `{self.cfg.tokenizer.kind}`, data "
            f"`{self.cfg.data.source}`, {_tokens(t.tokens)} training tokens per backbone "
            f"(batch {t.batch_size} × {t.seq_len} tokens), seed {t.seed}; benchmark preset "
            f"`{self.cfg.bench.name}`.", "",
            "Studies (overrides of each training sweep, on top of the experiment's): "
            + "; ".join(f"`{name}`: {' '.join(spec.train) or '(none)'}"
                        + (f" (backbones: {', '.join(spec.backbones)})" if spec.backbones else "")
                        for name, spec in self.cc.studies.items()) + ".", "",
            f"Seeds of the main runs: {', '.join(str(x) for x in self.cc.seeds)}"
            + "".join(f" ({name}: {', '.join(str(x) for x in spec.seeds)})"
                      for name, spec in self.cc.studies.items() if spec.seeds is not None)
            + "; learning "
            + (f"rates tuned per backbone in {', '.join(self.cc.tune.studies)} over "
               f"{list(self.cc.tune.lrs)} at {float(self.cc.tune.tokens):g} tokens "
               "(section Learning rates)." if self.cc.tune.studies else
               "rates as set in the experiment (not tuned)."), "",
            *[line for note in self.cc.notes for line in (f"Note: {note}", "")],
        ]
        path, _ = build_report(self.report_inputs, self.cc.out, self.cc.title, preamble,
                               command=self.command)
        return path


def check_tuning(cc: Any) -> None:
    """compare.tune and compare.seeds, checked before any work."""
    from archbench.config import ConfigError

    tc = cc.tune
    unknown = [s for s in tc.studies if s not in cc.studies]
    if unknown:
        raise ConfigError(f"compare.tune.studies={list(tc.studies)} names {unknown}, which are "
                          f"not studies of this comparison ({sorted(cc.studies)})")
    if not tc.lrs or any(float(x) <= 0 for x in tc.lrs):
        raise ConfigError(f"compare.tune.lrs={list(tc.lrs)} is not allowed; it must be a "
                          "non-empty list of learning rates > 0")
    if float(tc.tokens) <= 0:
        raise ConfigError(f"compare.tune.tokens={tc.tokens} is not allowed; it must be > 0")
    if int(tc.extend_by) < 1:
        raise ConfigError(f"compare.tune.extend_by={tc.extend_by} is not allowed; it must be "
                          ">= 1")
    if not cc.seeds:
        raise ConfigError("compare.seeds=[] is not allowed; give at least one seed")
    if int(cc.parallel) < 1:
        raise ConfigError(f"compare.parallel={cc.parallel} is not allowed; it must be >= 1")
    for name, spec in cc.studies.items():
        if spec.seeds is not None and not spec.seeds:
            raise ConfigError(f"compare.studies.{name}.seeds=[] is not allowed; give at least "
                              "one seed or null (compare.seeds)")
        extra = [b for b in spec.backbones if b not in cc.backbones]
        if extra:
            raise ConfigError(f"compare.studies.{name}.backbones names {extra}, which are not in "
                              f"compare.backbones {list(cc.backbones)}")
    if cc.reference is not None and cc.reference not in cc.backbones:
        raise ConfigError(f"compare.reference={cc.reference!r} is not one of compare.backbones "
                          f"{list(cc.backbones)}")


def lr_sweep(lrs: Iterable[float]) -> str:
    """A sweep override even for one rate (choice(...)), so every tuning run's folder is named
    by its rate and an extension never lands in another rate's folder."""
    return "train.lr=choice(" + ",".join(f"{x:g}" for x in lrs) + ")"


def choose(run_dirs: list[Path]) -> LrChoice | None:
    """The best learning rate of finished runs by final validation loss (mean over seeds)."""
    by_lr: dict[float, list[float]] = {}
    for d in run_dirs:
        summary = _summary(d)
        if summary.get("status") != "finished":
            continue
        lr = float(((summary.get("config") or {}).get("train") or {}).get("lr"))
        loss = (summary.get("final") or {}).get("loss")
        by_lr.setdefault(lr, []).append(float("inf") if loss is None else float(loss))
    if not by_lr:
        return None
    try:
        return select_lr([(lr, sum(v) / len(v)) for lr, v in by_lr.items()])
    except TuningError:
        return None


def _by_extension(choices: dict[str, LrChoice]) -> dict[tuple[float, ...], list[str]]:
    out: dict[tuple[float, ...], list[str]] = {}
    for b, c in choices.items():
        out.setdefault(c.extension, []).append(b)
    return out


def tuning_record(study: str, arch: str, choice: LrChoice, tokens: float,
                  grid: list[float]) -> dict[str, Any]:
    """What the report shows of one backbone's tuning: every (lr, loss), the choice, the edge."""
    return {
        "kind": "lr_tune", "study": study, "arch": arch, "metric": "val_loss",
        "tokens": tokens, "grid": grid, "lrs": list(choice.grid),
        "losses": [None if v == float("inf") else v for v in choice.losses],
        "chosen_lr": choice.lr, "chosen_loss": choice.loss, "edge": choice.edge,
        "extended": len(choice.grid) > len(grid),
    }


def _tokens(value: Any) -> str:
    return f"{float(value):g}" if isinstance(value, (int, float)) else str(value)


def _child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_text() -> str:
    """Host, CPU model and cores, memory, GPU: what the report's numbers were measured on."""
    from archbench.device import cpu_name

    cpu = cpu_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{platform.node()}, {cpu}, {os.cpu_count()} CPU cores"
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        text += f", {pages / 2**30:.0f} GiB memory"
    except (OSError, ValueError):
        pass
    try:
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        text += f", GPU: {', '.join(gpus)}" if gpus else ", no GPU"
    except Exception:  # the report header only; a broken CUDA setup shows up in the stages
        text += ", GPU: unknown"
    return f"{text}, {platform.platform()}, Python {platform.python_version()}"


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    comparison = Comparison(argv)
    path = comparison.run()
    if path is None:
        print("dry run (compare.dry_run=true): nothing was run")
        return
    failed = [r for r in comparison.stages.records if r["status"] == "failed"]
    print(f"report: {path}")
    if failed:
        print(f"archbench compare: {len(failed)} stage(s) failed (see the report's Provenance "
              f"section and the logs under {comparison.sweep / 'logs'})", file=sys.stderr)
