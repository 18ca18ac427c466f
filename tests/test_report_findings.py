"""The report's leading sections (evaluate/reporting/findings.py) on records whose truth is
known: a backbone clearly worse than the reference is called worse, one drawn from the same
distribution is within noise, MQAR accuracies carry Wilson intervals, the learning-rate section
shows the grid and flags an edge winner, and unfair settings are stated before the numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from archbench.evaluate.reporting.build import build_report

N_WINDOWS = 48


def _bpb_record(arch: str, seed: int, shift: float, rng: np.random.Generator,
                difficulty: np.ndarray) -> dict:
    nats = (difficulty + shift + rng.normal(0, 0.02, N_WINDOWS)) * 256  # 256 tokens a window
    n_bytes = [256] * N_WINDOWS
    value = float(nats.sum() / math.log(2) / sum(n_bytes))
    return {"kind": "eval", "eval": "bpb", "metric": "bpb", "value": value, "status": "ok",
            "params": {"context": 256, "corpus": "c0"}, "arch": arch, "tokenizer": "byte",
            "run": f"{arch}-{seed}", "train": {"seed": seed, "lr": 1e-3, "task": None},
            "windows": {"nats": nats.tolist(), "bytes": n_bytes, "tokens": [256] * N_WINDOWS}}


def _mqar_record(arch: str, seed: int, p_right: float, lr: float,
                 rng: np.random.Generator) -> dict:
    pairs, n = 4, 200
    correct = rng.binomial(pairs, p_right, size=n)
    return {"kind": "eval", "eval": "mqar", "metric": "accuracy", "status": "ok",
            "value": float(correct.sum() / (pairs * n)), "n": pairs * n, "primary": True,
            "params": {"seq_len": 64, "num_kv_pairs": pairs, "vocab_size": 64},
            "arch": arch, "run": f"mqar-{arch}-{seed}-{lr}", "tokenizer": "byte",
            "train": {"seed": seed, "lr": lr, "d_model": 128, "task": "mqar"},
            "correct": correct.tolist()}


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_findings_claim_only_what_the_intervals_support(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    difficulty = rng.gamma(4.0, 0.5, N_WINDOWS)
    records = [{"kind": "compare", "reference": "transformer", "seeds": [0, 1],
                "backbones": ["transformer", "mamba", "rwkv7"], "load_average": 9.5,
                "cpu_count": 2}]
    for seed in (0, 1):
        records += [_bpb_record("transformer", seed, 0.0, rng, difficulty),
                    _bpb_record("mamba", seed, 0.3, rng, difficulty),    # clearly worse
                    _bpb_record("rwkv7", seed, 0.0, rng, difficulty)]    # the same
        for lr, p_tf in ((1e-3, 0.5), (3e-3, 0.98)):                     # best lr: 3e-3
            records.append(_mqar_record("transformer", seed, p_tf, lr, rng))
        records.append(_mqar_record("mamba", seed, 0.4, 1e-3, rng))
        records.append(_mqar_record("rwkv7", seed, 0.97, 1e-3, rng))
    records += [
        {"kind": "lr_tune", "study": "lm", "arch": "transformer", "metric": "val_loss",
         "tokens": 5e4, "grid": [1e-3, 3e-3, 1e-2], "lrs": [1e-3, 3e-3, 1e-2],
         "losses": [2.5, 2.2, 2.4], "chosen_lr": 3e-3, "chosen_loss": 2.2, "edge": None,
         "extended": False},
        {"kind": "lr_tune", "study": "lm", "arch": "mamba", "metric": "val_loss",
         "tokens": 5e4, "grid": [1e-3, 3e-3, 1e-2], "lrs": [1e-3, 3e-3, 1e-2, 3e-2],
         "losses": [2.6, 2.3, 2.1, 2.0], "chosen_lr": 3e-2, "chosen_loss": 2.0, "edge": "high",
         "extended": True},
    ]
    _write(tmp_path / "in" / "records.jsonl", records)
    path, _ = build_report([tmp_path / "in"], tmp_path / "out", "t")
    text = path.read_text()
    head = text.split("## What this comparison shows")[0]
    assert "## Read this first" in head                       # unfair settings come first
    assert "mamba (lm): best learning rate 0.03 is at the high edge" in head
    assert "load average 9.5 on 2 cores" in head
    shows = text.split("## What this comparison shows")[1].split("\n## ")[0]
    lm_worse = next(line for line in shows.splitlines() if line.startswith("- Validation bits")
                    and "worse" in line)
    assert "**mamba**" in lm_worse and "rwkv7" not in lm_worse
    assert any("rwkv7 cannot be told apart from transformer" in line
               for line in shows.splitlines())
    mqar = [line for line in shows.splitlines() if line.startswith("- MQAR accuracy at 4 pairs")]
    assert any("**mamba**" in line and "**worse**" in line for line in mqar)
    assert any("rwkv7 cannot be told apart" in line for line in mqar)
    # the transformer's accuracy is that of its best learning rate, with a Wilson interval
    row = next(line for line in shows.splitlines() if line.startswith("| **mamba** | MQAR"))
    ref_cell = row.split("|")[4]
    estimate = float(ref_cell.split()[1])
    assert estimate > 0.9 and "[" in ref_cell
    assert "## Learning rates" in text and (tmp_path / "out" / "lr_tuning_lm.png").is_file()
    assert text.index("## What this comparison shows") < text.index("## Learning rates")


def test_no_claims_without_paired_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    difficulty = rng.gamma(4.0, 0.5, N_WINDOWS)
    rec = _bpb_record("mamba", 0, 0.0, rng, difficulty)
    other = _bpb_record("transformer", 0, 0.5, rng, difficulty)
    other["params"]["context"] = 512                        # other windows: no pairing
    _write(tmp_path / "in" / "records.jsonl", [rec, other])
    path, _ = build_report([tmp_path / "in"], tmp_path / "out", "t")
    text = path.read_text()
    assert "better** than" not in text and "worse** than" not in text
    assert "scored on other windows" in text
    assert "learning rate not tuned per backbone" not in text  # no training runs: nothing said


def test_a_plain_lr_sweep_gets_the_learning_rate_section(tmp_path: Path) -> None:
    # `archbench train arch=... train.lr=a,b,c -m` then `archbench report`: best per backbone
    for arch, losses in (("transformer", (2.6, 2.3, 2.5)), ("mamba", (2.6, 2.4, 2.2))):
        for lr, loss in zip((1e-3, 3e-3, 1e-2), losses, strict=True):
            run = tmp_path / "sweep" / f"{arch}-{lr}"
            run.mkdir(parents=True)
            (run / "summary.json").write_text(json.dumps({
                "arch": arch, "status": "finished", "run": run.name, "tokens_budget": 1000,
                "config": {"train": {"lr": lr}, "data": {"source": "stdlib"}},
                "final": {"loss": loss, "bpb": loss / math.log(2)}}))
    path, _ = build_report([tmp_path / "sweep"], tmp_path / "out", "t")
    text = path.read_text()
    section = text.split("## Learning rates")[1].split("\n## ")[0]
    transformer = next(line for line in section.splitlines() if "**transformer**" in line)
    mamba = next(line for line in section.splitlines() if "**mamba**" in line)
    assert "| 0.003 | inside the grid |" in transformer
    assert "| 0.01 | at the high edge |" in mamba
    assert "mamba (lm): best learning rate 0.01 is at the high edge" in text
