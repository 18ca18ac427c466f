"""Any archbench checkpoint inside the lm-evaluation-harness, registered as the model `archbench`.

In process (what `archbench eval eval.tasks=[...]` does): `run_lm_eval(model, tokenizer, tasks)`
calls `lm_eval.simple_evaluate` with the local task folder included.

The lm-eval command line: lm-eval 0.4 finds models only in its own registry (no plugin entry
points), and `--include_path` only indexes task YAML, so the registration must run before the
harness looks the name up. This module is a drop-in for the `lm-eval` command that does exactly
that, and includes the local task folder beside any `--include_path` (run it outside the source
checkout: a local `evaluate/` folder would shadow Hugging Face's `evaluate`):

    python -m archbench.evaluate.quality.lm_eval_adapter run --model archbench \
        --model_args ckpt=runs/X,device=cpu --tasks archbench_passkey,lambada_openai --limit 50

`model_args`: ckpt (run dir or checkpoint folder, required), device (default cpu), max_length
(truncate contexts from the left to this many tokens; default: the learned-position limit, else
none), dtype (bf16 / fp16 autocast, default fp32). `--batch_size` is a number of sequences.

Scoring is exact: `perplexity.score_continuations` right-pads batches (a causal model never
looks right); generation goes through `generate.generate`, which never pads inside a mixer.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lm_eval.api.model import LM

from archbench.device import autocast_dtype
from archbench.evaluate.generation.generate import Sampling, generate
from archbench.evaluate.quality.perplexity import document_logprobs, score_continuations
from archbench.train.tasks.base import position_limit
from archbench.train.tasks.passkey import draw_needles, hide_needles, needle_texts

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
LOCAL_TASKS = ("archbench_heldout", "archbench_passkey", "archbench_passkey_multikey",
               "archbench_kv_recall")


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as the harness scores them: trailing spaces of the
    context move to the continuation, the pair is encoded whole and split where the context
    ends (BPE merges across the boundary stay as the model saw them), and an empty context
    becomes EOS."""
    if not context:
        return [int(tokenizer.eos_id)], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context))
    return whole[:n_ctx], whole[n_ctx:]


class ArchbenchLM(LM):
    """lm-eval's LM interface over an archbench LanguageModel and its own tokenizer."""

    def __init__(self, ckpt: str | None = None, device: str | None = "cpu",
                 batch_size: int | str | None = 8, max_batch_size: int | None = None,
                 max_length: int | str | None = None, dtype: str | None = None,
                 model: torch.nn.Module | None = None, tokenizer: Any = None,
                 **unused: Any) -> None:
        super().__init__()
        if model is None:
            if not ckpt:
                raise ValueError("model_args needs ckpt=<run dir or checkpoint folder>")
            from archbench.train.checkpoint import load_model

            model, tokenizer, _ = load_model(ckpt, device or "cpu")
        elif tokenizer is None:
            raise ValueError("a model given directly needs its tokenizer")
        self.model, self.tokenizer = model, tokenizer
        self._device = next(model.parameters()).device
        try:
            self.batch_size = int(batch_size if batch_size is not None else 8)
        except ValueError as exc:
            raise ValueError(f"batch_size={batch_size!r}: give a number of sequences "
                             "(automatic batch sizing is not supported)") from exc
        self.autocast = (None if dtype in (None, "") else
                         autocast_dtype(str(dtype), self._device, "model_args dtype"))
        limit = position_limit(model)
        self.max_length = int(max_length) if max_length not in (None, "", "None") else limit
        if limit is not None and self.max_length > limit:
            raise ValueError(f"max_length={self.max_length} exceeds the model's {limit} positions")

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                            additional_config: dict[str, Any] | None = None) -> ArchbenchLM:
        """model_args win over the harness's own --device / --batch_size (which it passes too)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str,
                               additional_config: dict[str, Any] | None = None) -> ArchbenchLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def tokenizer_name(self) -> str:
        return f"archbench-{self.tokenizer.identity}"

    def _truncate(self, ctx: list[int], cont: list[int]) -> tuple[list[int], int]:
        tokens = ctx + cont
        if self.max_length is not None and len(tokens) - 1 > self.max_length:
            tokens = tokens[-(self.max_length + 1):]
        return tokens, len(cont)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False
                      ) -> list[tuple[float, bool]]:
        items, empty = [], set()
        for i, req in enumerate(requests):
            context, continuation = req.args
            ctx, cont = encode_pair(self.tokenizer, context, continuation)
            if not cont:
                empty.add(i)
                items.append(([self.eot_token_id, self.eot_token_id], 1))
                continue
            items.append(self._truncate(ctx, cont))
        scores = score_continuations(self.model, items, self.batch_size, self._device,
                                     self.autocast, pad_id=self.eot_token_id)
        out = []
        for i, (req, (lp, greedy, _)) in enumerate(zip(requests, scores)):
            result = (0.0, True) if i in empty else (lp, greedy)
            self.cache_hook.add_partial("loglikelihood", req.args, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        docs = [self.tokenizer.encode(req.args[0]) for req in requests]
        totals = document_logprobs(self.model, docs, self.eot_token_id, self.max_length,
                                   self.batch_size, self._device, self.autocast)
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        for key, members in groups.items():
            sampling = self._sampling(json.loads(key))
            keep = (None if self.max_length is None
                    else self.max_length + 1 - sampling.max_new_tokens)
            if keep is not None and keep < 1:
                raise ValueError(f"max_gen_toks={sampling.max_new_tokens} leaves no room for a "
                                 f"prompt in max_length={self.max_length}")
            prompts = []
            for i in members:
                ids = self.tokenizer.encode(requests[i].args[0]) or [self.eot_token_id]
                prompts.append(ids[-keep:] if keep is not None else ids)
            order = sorted(range(len(members)), key=lambda k: -len(prompts[k]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                results = generate(self.model, self.tokenizer, [prompts[k] for k in chunk],
                                   sampling, self._device)
                for k, res in zip(chunk, results):
                    i = members[k]
                    out[i] = res.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, res.text)
        return out

    @staticmethod
    def _sampling(kwargs: dict[str, Any]) -> Sampling:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        do_sample = bool(kwargs.get("do_sample", False))
        temperature = float(kwargs.get("temperature", 0.0) or 0.0) if do_sample else 0.0
        top_p, top_k = kwargs.get("top_p"), kwargs.get("top_k")
        return Sampling(max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                        temperature=temperature,
                        top_k=int(top_k) if do_sample and top_k else None,
                        top_p=float(top_p) if do_sample and top_p else None,
                        stop=tuple(s for s in until if s), seed=int(kwargs.get("seed", 0)))

    def get_model_info(self) -> dict[str, Any]:
        counts = self.model.param_counts() if hasattr(self.model, "param_counts") else {}
        return {"model_num_parameters": counts.get("total"),
                "tokenizer_identity": self.tokenizer.identity}


def register() -> None:
    """Make `--model archbench` resolvable (idempotent; the built-in models stay registered)."""
    import lm_eval.models  # noqa: F401  (registers the harness's own models first)
    from lm_eval.api.registry import model_registry

    current = model_registry.get("archbench", None)
    if current is None:
        model_registry.register("archbench", target=ArchbenchLM)
    elif current is not ArchbenchLM:
        raise RuntimeError(f"lm-eval model 'archbench' is already registered as {current}")


@functools.lru_cache(maxsize=4)
def task_manager(include: tuple[str, ...] = ()) -> Any:
    """Indexing every task YAML takes seconds: built once per process (per include list), so
    running tasks one at a time after a failure costs no more indexing."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR), *include])


def always_include_local_tasks() -> None:
    """Make every TaskManager the harness builds include the local task folder beside the
    user's `--include_path` (the flag takes one folder, and giving it used to drop the local
    tasks)."""
    import lm_eval.tasks

    base = lm_eval.tasks.TaskManager
    if getattr(base, "archbench_local_tasks", False):
        return

    class WithLocalTasks(base):  # type: ignore[misc, valid-type]
        archbench_local_tasks = True

        def __init__(self, *args: Any, include_path: Any = None, **kwargs: Any) -> None:
            paths = [] if include_path is None else (
                list(include_path) if isinstance(include_path, (list, tuple)) else [include_path])
            if str(TASKS_DIR) not in map(str, paths):
                paths.insert(0, str(TASKS_DIR))
            super().__init__(*args, include_path=paths, **kwargs)

    lm_eval.tasks.TaskManager = WithLocalTasks


def run_lm_eval(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str],
                batch_size: int = 8, limit: int | float | None = None,
                num_fewshot: int | None = None, max_length: int | None = None,
                seed: int = 0) -> dict[str, Any]:
    """lm_eval.simple_evaluate on an in-memory model; the local task folder is included."""
    import lm_eval

    register()
    lm = ArchbenchLM(model=model, tokenizer=tokenizer, batch_size=batch_size,
                     max_length=max_length)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
        task_manager=task_manager(), log_samples=False, random_seed=seed,
        numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        bootstrap_iters=1000)
    if results is None:  # lm-eval aggregates on LOCAL_RANK 0 only
        raise RuntimeError("lm-eval returned no results: it aggregates only where LOCAL_RANK is 0 "
                           f"(LOCAL_RANK={os.environ.get('LOCAL_RANK')!r} here); run archbench "
                           "eval outside a distributed launch")
    return results


def result_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten simple_evaluate's results into (task, metric, filter, value, stderr, n) rows."""
    rows = []
    n_samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            stderr = float(stderr) if isinstance(stderr, (int, float)) and \
                math.isfinite(stderr) else None
            rows.append({"task": task, "metric": metric, "filter": filt, "value": float(value),
                         "stderr": stderr,
                         "n": (n_samples.get(task) or {}).get("effective"),
                         "num_fewshot": (results.get("n-shot") or {}).get(task)})
    return rows


# ---- local task data ---------------------------------------------------------------------------
def _heldout_texts(n_docs: int, max_chars: int) -> list[dict[str, Any]]:
    """The first validation documents of the embedded corpus (the data layer's split)."""
    from archbench.train.data import StdlibCorpus, is_validation

    out = []
    for doc_id, text in StdlibCorpus().documents():
        if is_validation(doc_id, 0.01) and len(text) >= 200:
            out.append({"id": doc_id, "text": text[:max_chars]})
            if len(out) == n_docs:
                break
    return out


def _passkey_docs(texts: list[str], rng: np.random.Generator, n_keys: int,
                  lengths: Sequence[int], depths: Sequence[float], per_cell: int
                  ) -> list[dict[str, Any]]:
    """Passkey documents in characters (lm-eval scores text): the synthetic task's wording and
    needle placement, over held-out filler text; 5-digit values for one key, 7 for several."""
    filler = "\n".join(texts)
    docs = []
    for length in lengths:
        for depth in depths:
            for _ in range(per_cell):
                keys, values = draw_needles(rng, n_keys, 5 if n_keys == 1 else 7)
                intro, needles, question = needle_texts(keys, values, 0)
                n_fill = length - len(intro) - sum(map(len, needles)) - len(question)
                start = int(rng.integers(0, len(filler) - n_fill))
                hidden = hide_needles(filler[start:start + n_fill], needles, depth, rng)
                docs.append({"context": intro + "".join(hidden) + question,
                             "answer": " " + values[0], "chars": length,
                             "depth": depth, "n_keys": n_keys})
    return docs


def _kv_docs(rng: np.random.Generator, n_docs: int, n_pairs: int) -> list[dict[str, Any]]:
    """Text associative recall: 'key=value' pairs, then one key is asked again."""
    docs = []
    for _ in range(n_docs):
        keys: list[str] = []
        while len(keys) < n_pairs:
            word = "".join(chr(97 + int(c)) for c in rng.integers(0, 26, size=3))
            if word not in keys:
                keys.append(word)
        values = [str(int(v)) for v in rng.integers(10, 100, size=n_pairs)]
        asked = int(rng.integers(0, n_pairs))
        pairs = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
        docs.append({"context": f"Pairs: {pairs}.\nQuery: {keys[asked]}=",
                     "answer": values[asked], "n_pairs": n_pairs})
    return docs


def write_local_tasks(out_dir: str | Path = TASKS_DIR, seed: int = 0) -> dict[str, int]:
    """Write the data files of the local lm-eval tasks (deterministic for a Python version:
    the held-out text is the embedded corpus's validation split). Returns docs per file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    heldout = _heldout_texts(40, 3000)
    files = {
        "heldout.jsonl": heldout,
        "passkey.jsonl": _passkey_docs([d["text"] for d in heldout], rng, 1,
                                       (512, 1024, 2048), (0.0, 0.25, 0.5, 0.75, 1.0), 4),
        "passkey_multikey.jsonl": _passkey_docs([d["text"] for d in heldout], rng, 4,
                                                (512, 1024, 2048), (0.0, 0.25, 0.5, 0.75, 1.0),
                                                4),
        "kv_recall.jsonl": _kv_docs(rng, 100, 8),
    }
    for name, rows in files.items():
        text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
        (out_dir / name).write_text(text, encoding="utf-8")
    return {name: len(rows) for name, rows in files.items()}


def main(argv: list[str] | None = None) -> None:
    """The lm-eval command line with `archbench` registered (see the module docstring)."""
    from lm_eval.__main__ import cli_evaluate

    register()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "write-tasks":
        print(write_local_tasks(args[1] if len(args) > 1 else TASKS_DIR))
        return
    always_include_local_tasks()
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    from archbench.evaluate.quality.lm_eval_adapter import main as _main

    _main()
elif __name__ == "archbench.evaluate.quality.lm_eval_adapter":
    register()
