"""Trained models out, into lm-eval: an exported folder scored by lm-eval's own `hf` model gives
the numbers of archbench's lm-eval model on the same checkpoint (an offline local task, every
request's log-likelihood compared); and the `lm_eval.models` plugin entry point."""

from __future__ import annotations

import importlib.metadata
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (lm-eval[hf])")

from archbench.archs.model import LanguageModel  # noqa: E402
from archbench.evaluate.quality.lm_eval_adapter import (  # noqa: E402
    ArchbenchLM,
    register,
    task_manager,
)
from archbench.hf import export_model  # noqa: E402
from archbench.train.checkpoint import save_checkpoint  # noqa: E402
from archbench.train.tokenizer import ByteTokenizer  # noqa: E402

TASK = "archbench_kv_recall"
LIMIT = 6
ARCHS = {
    "transformer": {"name": "transformer", "pattern": {"mixers": ["attention"],
                                                       "mlps": ["dense"]},
                    "d_model": 32, "n_layers": 2, "attention": {"head_dim": 16}},
    "mamba": {"name": "mamba", "pattern": {"mixers": ["mamba"], "mlps": ["none"]},
              "d_model": 32, "n_layers": 2, "mamba": {"d_state": 8}},
}


def _samples(results: dict) -> list[float]:
    """Each request's log-likelihood, in document order."""
    out = []
    for sample in sorted(results["samples"][TASK], key=lambda s: s["doc_id"]):
        out += [float(resp[0]) for resp in sample["filtered_resps"]]
    return out


def _evaluate(model: object, **kwargs: object) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(model=model, tasks=[TASK], limit=LIMIT, log_samples=True,
                                   task_manager=task_manager(), random_seed=0,
                                   numpy_random_seed=0, torch_random_seed=0,
                                   fewshot_random_seed=0, bootstrap_iters=0, **kwargs)


@pytest.mark.parametrize("name", list(ARCHS))
def test_lm_eval_hf_on_the_export_gives_our_numbers(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LanguageModel(ARCHS[name], 258).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    tokenizer = ByteTokenizer()
    save_checkpoint(tmp_path / "run", 1, model, None, tokenizer,
                    {"arch": OmegaConf.to_container(model.arch), "vocab_size": 258})
    export_model(tmp_path / "run", tmp_path / "hf")
    register()
    ours = _evaluate(ArchbenchLM(model=model, tokenizer=tokenizer, batch_size=4))
    theirs = _evaluate("hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
                       device="cpu", batch_size=4)
    a, b = _samples(ours), _samples(theirs)
    assert len(a) == len(b) >= LIMIT
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    assert ours["results"][TASK]["acc,none"] == theirs["results"][TASK]["acc,none"]


def test_the_package_declares_the_lm_eval_model_plugin() -> None:
    found = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="lm_eval.models")}
    if "archbench" not in found:
        pytest.skip("the installed archbench metadata predates the entry point: reinstall with "
                    "pip install -e .")
    assert found["archbench"] == "archbench.evaluate.quality.lm_eval_adapter:ArchbenchLM"


def _reads_model_plugins() -> bool:
    from lm_eval.api import registry

    return "entry_points" in inspect.getsource(registry)


@pytest.mark.skipif(not _reads_model_plugins(), reason=(
    f"lm-eval {importlib.metadata.version('lm_eval')} resolves --model only against its own "
    "registry; entry-point model plugins (group lm_eval.models) arrived upstream later "
    "(lm-evaluation-harness PR #4013). Use archbench-lm-eval until then."))
def test_plain_lm_eval_finds_the_archbench_model(tmp_path: Path) -> None:
    code = ("from lm_eval.api.registry import get_model; "
            "print(get_model('archbench').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ArchbenchLM" in out.stdout, out.stderr
