"""`archbench eval ckpt=... eval.tasks=[...]`: quality evaluations of checkpoints, as records.

`eval.tasks` names, in any mix:
    bpb             loss, bits per byte and loss by position bucket on the validation split of
                    the checkpoint's corpus (or `eval.file`), at the training context
    extrapolation   the same at eval.extrapolation x the training context (1x, 2x, 4x, 8x);
                    learned positions past their table are "not_supported", not a crash
    a synthetic task (mqar, mad, induction, selective_copying, passkey, in_context_recall, ...):
                    exact accuracy on the answer positions of `eval.n_examples` fresh test
                    examples per setting; a checkpoint trained on the same task starts from its
                    training parameters, `eval.task_params` overrides, `eval.grid` sweeps
                    (induction defaults to 1x..16x its training length, passkey to 1x/2x/4x the
                    training context at depths 0..1); both take flat keys for every task or
                    {task: {...}} for one: eval.task_params={passkey: {n_keys: 4}}
    anything else   an lm-eval task (archbench_passkey, archbench_heldout, lambada_openai, ...)
                    run through `lm_eval.simple_evaluate` with the local task folder included

`ckpt` may be a run directory, a checkpoint folder, a sweep directory (every run below it) or a
glob. Records (evaluate/records.py) are appended to `<run dir>/records.jsonl` or `eval.records`
as soon as each evaluation finishes.
"""

from __future__ import annotations

import glob
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from archbench.device import autocast_dtype, pick_device
from archbench.evaluate.quality.perplexity import extrapolation_metrics, file_split
from archbench.evaluate.records import EvalContext, make_record, write_records
from archbench.progress import Progress
from archbench.train.checkpoint import find_checkpoint, load_model
from archbench.train.metrics import padded_token_bytes, split_metrics
from archbench.train.tasks import (
    TASKS,
    make_task,
    position_limit,
    resolve,
    score_examples,
    task_names,
)

TEXT_EVALS = ("bpb", "extrapolation")


class EvaluationsFailed(RuntimeError):
    """Some evaluations failed (each recorded with its error); the others wrote their records."""

    one_line = True  # archbench.cli prints the message alone: every failure is named in it


def expand_checkpoints(spec: str) -> list[Path]:
    """A run dir or checkpoint folder, every run below a folder, or a glob of either."""
    paths = [Path(p) for p in sorted(glob.glob(spec))] or [Path(spec)]
    out: list[Path] = []
    for path in paths:
        if find_checkpoint(path) is not None:
            out.append(path)
        elif path.is_dir():
            out += sorted(p.parent.parent for p in path.rglob("checkpoints/latest.json"))
    if not out:
        raise FileNotFoundError(f"ckpt={spec!r}: no checkpoint there (a run dir, a checkpoint "
                                "folder, a sweep folder or a glob)")
    return out




def _autocast_dtype(state: dict[str, Any], device: torch.device) -> torch.dtype | None:
    """The precision the checkpoint was trained in (bf16 autocast on CUDA by default)."""
    name = ((state.get("config") or {}).get("train") or {}).get("dtype", "auto")
    return autocast_dtype(name, device, "the checkpoint's train.dtype")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def for_task(node: Any, name: str) -> dict[str, Any]:
    """eval.task_params / eval.grid: flat keys apply to every task, a key naming a task
    ({passkey: {depth: [0, 1]}}) to that task only."""
    plain = dict(_plain(node) or {})
    names = set(task_names())
    out = {k: v for k, v in plain.items() if k not in names}
    out.update(plain.get(name) or {})
    return out


class CheckpointEval:
    """All evaluations of one checkpoint, sharing the loaded model."""

    def __init__(self, cfg: DictConfig, path: Path) -> None:
        self.cfg, self.ecfg = cfg, cfg.eval
        self.device = pick_device(self.ecfg.device, "eval.device")
        self.model, self.tokenizer, self.state = load_model(path, self.device)
        ckpt = find_checkpoint(path)
        assert ckpt is not None
        self.ckpt = ckpt
        self.ctx = EvalContext.from_checkpoint(ckpt, self.state, self.device)
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
        self.records_path = Path(self.ecfg.records) if self.ecfg.records else \
            run_dir / "records.jsonl"
        self.amp = _autocast_dtype(self.state, self.device)
        config = self.state.get("config") or {}
        self.train_cfg = config.get("train") or {}
        self.seq_len = int(self.train_cfg.get("seq_len") or cfg.train.seq_len)
        self.data_cfg = OmegaConf.create(config["data"]) if (
            self.ecfg.use_ckpt_data and config.get("data")) else cfg.data
        self.records: list[dict[str, Any]] = []

    def emit(self, records: list[dict[str, Any]]) -> None:
        write_records(records, self.records_path)
        self.records += records
        for r in records:
            where = ", ".join(f"{k}={v}" for k, v in r["params"].items()
                              if k in ("context", "seq_len", "depth", "task", "setting", "start"))
            value = r["value"] if r["status"] == "ok" else r["status"]
            print(f"{self.ctx.run}: {r['eval']}/{r['metric']} [{where}] = {value}")

    # ---- text ------------------------------------------------------------------------------------
    def _token_bytes(self) -> np.ndarray:
        return padded_token_bytes(self.tokenizer, self.model.vocab_size)

    def _text_split(self) -> tuple[Any, dict[str, Any]]:
        if self.ecfg.file:
            return file_split(self.ecfg.file, self.tokenizer), {"source": "file",
                                                                "file": str(self.ecfg.file)}
        from archbench.train.data import build_corpus, load_data

        # load_data splits exactly as training did (one-file corpora hold out their tail).
        data = self.data_cfg
        corpus = build_corpus(data)
        tokens = load_data(data, self.tokenizer, corpus)
        return tokens.val, {"source": data.source, "corpus": corpus.describe().get("hash", "")[:16],
                            "split": "val"}

    def _task_checkpoint(self, eval_name: str) -> list[dict[str, Any]] | None:
        if self.ecfg.file or self.data_cfg.get("source") != "task":
            return None
        reason = ("the checkpoint was trained on a synthetic task; evaluate it with "
                  "eval.tasks=[<that task>] or give eval.file")
        return [make_record(self.ctx, eval_name, m, None, status="not_supported", reason=reason)
                for m in ("loss", "bpb")]

    def _on_text(self, eval_name: str,
                 records_of: Callable[[Any, dict[str, Any]], list[dict[str, Any]]]) -> None:
        """Emit `records_of(split, source)` on the text split, or, for a checkpoint trained on a
        synthetic task (it has no text), the `not_supported` records saying so."""
        skipped = self._task_checkpoint(eval_name)
        self.emit(skipped if skipped else records_of(*self._text_split()))

    def bpb(self) -> None:
        self._on_text("bpb", self._bpb_records)

    def extrapolation(self) -> None:
        self._on_text("extrapolation", self._extrapolation_records)

    def _bpb_records(self, split: Any, source: dict[str, Any]) -> list[dict[str, Any]]:
        e = self.ecfg
        m = split_metrics(self.model, split, self.seq_len, e.batch_size, self._token_bytes(),
                          e.max_batches, self.device, e.position_buckets, self.amp,
                          per_window=True)
        params = {**source, "context": self.seq_len}
        # per-window sums (the same first windows of the split for every backbone): the report
        # pairs them across backbones for a bootstrap interval on each difference
        windows = {"nats": m["window_nats"], "tokens": m["window_tokens"],
                   "bytes": m["window_bytes"]}
        recs = [make_record(self.ctx, "bpb", "loss", m["loss"], params=params, n=m["tokens"]),
                make_record(self.ctx, "bpb", "bpb", m["bpb"], params=params, n=m["bytes"],
                            windows=windows)]
        for b in m.get("position_buckets", []):
            if b["loss"] is not None:
                recs.append(make_record(self.ctx, "bpb", "loss_bucket", b["loss"],
                                        params={**params, "start": b["start"], "end": b["end"]},
                                        n=b["tokens"]))
        return recs

    def _extrapolation_records(self, split: Any, source: dict[str, Any]
                               ) -> list[dict[str, Any]]:
        e = self.ecfg
        results = extrapolation_metrics(self.model, split, self.seq_len, list(e.extrapolation),
                                        e.batch_size, self._token_bytes(), e.max_batches,
                                        self.device, e.position_buckets, self.amp)
        recs = []
        for r in results:
            params = {**source, "context": r["context"], "multiple": r["multiple"],
                      "train_context": self.seq_len}
            if r["status"] != "ok":
                recs += [make_record(self.ctx, "extrapolation", m, None, params=params,
                                     status=r["status"], reason=r["reason"])
                         for m in ("loss", "bpb")]
                continue
            recs += [make_record(self.ctx, "extrapolation", "loss", r["loss"], params=params,
                                 n=r["tokens"]),
                     make_record(self.ctx, "extrapolation", "bpb", r["bpb"], params=params,
                                 n=r["bytes"])]
            if r.get("loss_beyond_train") is not None:
                recs.append(make_record(self.ctx, "extrapolation", "loss_beyond_train",
                                        r["loss_beyond_train"], params=params))
        return recs

    # ---- synthetic tasks ------------------------------------------------------------------------
    def _base_params(self, name: str) -> dict[str, Any]:
        """The checkpoint's training parameters when it was trained on this task, else {}."""
        data = _plain(self.data_cfg)
        if data.get("source") != "task":
            if name == "mad":
                raise ValueError("eval.tasks=[mad] needs a checkpoint trained on a MAD setting "
                                 "(data.task.name=mad)")
            return {}
        trained = data.get("task") or {}
        t_name, t_params = trained.get("name"), dict(trained.get("params") or {})
        if name == "mad":
            if t_name != "mad":
                raise ValueError(f"eval.tasks=[mad]: the checkpoint was trained on {t_name!r}, "
                                 "not on a MAD setting")
            return t_params
        if t_name == name or (t_name == "mad" and resolve(t_name, t_params)[0] == name):
            return resolve(t_name, t_params)[1] if t_name == "mad" else t_params
        return {}

    def _grid(self, name: str, base: dict[str, Any]) -> list[dict[str, Any]]:
        grid = for_task(self.ecfg.grid, name)
        if not grid:
            if name == "induction":
                length = int(base.get("seq_len", TASKS["induction"].defaults["seq_len"]))
                grid = {"seq_len": [length * k for k in (1, 2, 4, 8, 16)]}
            elif name == "passkey":
                grid = {"seq_len": [self.seq_len * k for k in (1, 2, 4)],
                        "depth": [0.0, 0.25, 0.5, 0.75, 1.0]}
        keys = list(grid)
        values = [v if isinstance(v, list) else [v] for v in grid.values()]
        return [dict(zip(keys, combo)) for combo in itertools.product(*values)] or [{}]

    def synthetic(self, name: str) -> None:
        base = {**self._base_params(name), **for_task(self.ecfg.task_params, name)}
        limit = position_limit(self.model)
        for combo in self._grid(name, base):
            params = {**base, **combo}
            task = make_task(name, params, self.tokenizer, split="test")
            desc = task.describe()
            if name == "mad":
                desc["setting"] = params.get("setting")
            if task.vocab_size > self.model.vocab_size:
                raise ValueError(f"task {name} uses {task.vocab_size} token ids; the model has "
                                 f"{self.model.vocab_size}: train it on the task first")
            metrics = ("accuracy", "exact_match", "loss")
            if limit is not None and task.seq_len > limit:
                reason = f"learned absolute positions end at {limit} tokens"
                self.emit([make_record(self.ctx, name, m, None, params=desc,
                                       status="not_supported", reason=reason) for m in metrics])
                continue
            inputs, targets = task.batch(range(int(self.ecfg.n_examples)), int(self.ecfg.seed))
            try:
                s = score_examples(self.model, inputs, targets, self.ecfg.batch_size,
                                   self.device, self.amp)
            except torch.OutOfMemoryError as exc:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.emit([make_record(self.ctx, name, m, None, params=desc, status="oom",
                                       reason=str(exc).splitlines()[0]) for m in metrics])
                continue
            self.emit([
                make_record(self.ctx, name, "accuracy", s["accuracy"], params=desc,
                            n=s["n_answers"], stderr=s["accuracy_stderr"],
                            primary=task.primary_metric == "accuracy",
                            correct=s["correct_per_example"]),
                make_record(self.ctx, name, "exact_match", s["exact_match"], params=desc,
                            n=s["n_examples"], stderr=s["exact_match_stderr"],
                            primary=task.primary_metric == "exact_match"),
                make_record(self.ctx, name, "loss", s["loss"], params=desc, n=s["n_answers"]),
            ])

    # ---- lm-eval --------------------------------------------------------------------------------
    def lm_eval(self, tasks: list[str]) -> None:
        from archbench.evaluate.quality.lm_eval_adapter import result_rows, run_lm_eval

        e = self.ecfg
        results = run_lm_eval(self.model, self.tokenizer, tasks, e.batch_size, e.limit,
                              e.num_fewshot, e.max_length, int(e.seed))
        recs = []
        for row in result_rows(results):
            params = {"task": row["task"], "filter": row["filter"],
                      "num_fewshot": row["num_fewshot"], "limit": e.limit}
            if not np.isfinite(row["value"]):
                recs.append(make_record(self.ctx, "lm_eval", row["metric"], None, params=params,
                                        status="nonfinite", reason=f"value is {row['value']}"))
                continue
            recs.append(make_record(self.ctx, "lm_eval", row["metric"], row["value"],
                                    params=params, n=row["n"], stderr=row["stderr"]))
        self.emit(recs)

    def _isolated(self, name: str, work: Any) -> bool:
        """Run one evaluation; a failure (a dataset out of reach, a bad parameter) is recorded
        with its error and the next evaluation still runs."""
        try:
            work()
            return True
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.failures.append(f"{self.ctx.run}: {name} ({error})")
            self.emit([make_record(self.ctx, name, "error", None, status="failed",
                                   reason=error)])
            return False

    def _lm_eval_isolated(self, tasks: list[str], progress: Progress) -> None:
        """All lm-eval tasks in one harness call; when that fails, one call per task, so the
        tasks that can run still write their records."""
        progress.start(f"lm-eval {','.join(tasks)}")
        try:
            self.lm_eval(tasks)
        except Exception:
            if len(tasks) == 1:
                self._isolated(tasks[0], lambda: self.lm_eval(tasks))
            else:
                for task in tasks:
                    self._isolated(task, lambda task=task: self.lm_eval([task]))
        progress.advance("lm-eval", units=len(tasks))

    def run(self, names: list[str]) -> list[dict[str, Any]]:
        self.failures: list[str] = []
        progress = Progress(len(names), f"eval {self.ctx.run}")
        lm_tasks = []
        for name in names:
            if name in TEXT_EVALS or name in task_names():
                progress.start(name)
                work = getattr(self, name) if name in TEXT_EVALS else \
                    (lambda name=name: self.synthetic(name))
                self._isolated(name, work)
                progress.advance(name)
            else:
                lm_tasks.append(name)
        if lm_tasks:
            self._lm_eval_isolated(lm_tasks, progress)
        return self.records


def run_eval(cfg: DictConfig) -> list[dict[str, Any]]:
    """Evaluate every checkpoint of `cfg.ckpt` on `cfg.eval.tasks`; return all records."""
    if not cfg.get("ckpt"):
        raise ValueError("eval needs ckpt=<run dir, checkpoint folder, sweep folder or glob>")
    names = [str(t) for t in (cfg.eval.tasks or ["bpb"])]
    if int(cfg.eval.n_examples) < 1:
        raise ValueError(f"eval.n_examples={cfg.eval.n_examples} must be >= 1")
    records: list[dict[str, Any]] = []
    failures: list[str] = []
    for path in expand_checkpoints(str(cfg.ckpt)):
        try:
            evaluation = CheckpointEval(cfg, path)
        except Exception as exc:  # a corrupt checkpoint of one run of a sweep
            failures.append(f"{path}: not loaded ({type(exc).__name__}: {exc})")
            continue
        records += evaluation.run(names)
        failures += evaluation.failures
    if failures:
        raise EvaluationsFailed(f"{len(failures)} evaluation(s) failed, the others wrote their "
                                "records: " + "; ".join(failures))
    return records
