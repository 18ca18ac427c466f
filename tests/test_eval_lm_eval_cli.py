"""The lm-eval command line against an archbench checkpoint, fully offline on CPU:
`python -m archbench.evaluate.quality.lm_eval_adapter run --model archbench ...` registers the
model, includes the local tasks, and gives the numbers archbench's own scoring gives on those
docs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from conftest import save_tiny_checkpoint

from archbench.evaluate.quality.lm_eval_adapter import TASKS_DIR
from archbench.evaluate.quality.perplexity import score_continuations
from archbench.train.checkpoint import load_model


def test_the_lm_eval_cli_runs_a_local_task_on_a_checkpoint(tmp_path: Path) -> None:
    save_tiny_checkpoint(tmp_path / "run")
    out = tmp_path / "lm_eval_out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "archbench.evaluate.quality.lm_eval_adapter", "run",
           "--model", "archbench", "--model_args", f"ckpt={tmp_path / 'run'},device=cpu",
           "--tasks", "archbench_kv_recall", "--limit", "5", "--batch_size", "4",
           "--output_path", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(out.rglob("results_*.json"))
    assert len(files) == 1
    cli = json.loads(files[0].read_text())["results"]["archbench_kv_recall"]
    loaded, tokenizer, _ = load_model(tmp_path / "run")
    lines = (TASKS_DIR / "kv_recall.jsonl").read_text(encoding="utf-8").splitlines()[:5]
    items = []
    for doc in map(json.loads, lines):
        ctx, cont = tokenizer.encode(doc["context"]), tokenizer.encode(doc["answer"])
        items.append((ctx + cont, len(cont)))
    scores = score_continuations(loaded, items, batch_size=1)
    assert cli["acc,none"] == sum(greedy for _, greedy, _ in scores) / 5
    assert math.isclose(cli["perplexity,none"], math.exp(-sum(lp for lp, _, _ in scores) / 5),
                        rel_tol=1e-5)
