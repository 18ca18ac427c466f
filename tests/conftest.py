"""Shared test helpers: compose configs exactly as the CLI does, and keep tests on one thread."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from archbench.config import register_schema

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def make_config(*overrides: str) -> DictConfig:
    """The resolved config of `archbench <cmd> OVERRIDES` (same tree, same schema)."""
    register_schema()
    with initialize_config_module(config_module="archbench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Token and tokenizer caches in a temporary folder, so tests never share state."""
    monkeypatch.setenv("ARCHBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_arch(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"d_model": 64, "n_layers": 2,
                            "attention": {"head_dim": 16}, "mlp": {"multiple_of": 16}}
    base.update(overrides)
    return base


def run_killable(cmd: list[str], cwd: Path, env: dict[str, str],
                 timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run a launcher in its own session, so a hang kills its worker processes too."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def save_tiny_checkpoint(folder: Path) -> Path:
    """A 2-layer, 32-wide attention model with the byte tokenizer saved as a run folder at step 3:
    the smallest checkpoint `archbench eval` / `generate` / the lm-eval adapter accept."""
    from omegaconf import OmegaConf

    from archbench.archs.model import LanguageModel
    from archbench.train.checkpoint import save_checkpoint
    from archbench.train.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = LanguageModel({"d_model": 32, "n_layers": 2, "attention": {"head_dim": 16}},
                          tok.vocab_size)
    save_checkpoint(folder, 3, model, None, tok,
                    {"arch": OmegaConf.to_container(model.arch), "vocab_size": tok.vocab_size,
                     "config": {}, "tokenizer": tok.identity})
    return folder
