"""Activation checkpointing per block (train.activation_checkpointing): the blocks are re-run in
backward instead of keeping their activations, which must not change a single number.

Measured peak memory (scripts/bench_activation_checkpointing.py) is in the report of the issue
that added this; here: identical gradients for every mixer, identical training with the trainer,
and that the flag really checkpoints every block.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_config, tiny_arch

import archbench.archs.model as model_mod
from archbench.archs.base import ForwardContext
from archbench.archs.model import LanguageModel
from archbench.train.checkpoint import find_checkpoint
from archbench.train.trainer import run_training

PATTERNS = {
    "attention": {"mixers": ["attention"], "mlps": ["dense"]},
    "mamba": {"mixers": ["mamba"], "mlps": ["none"]},
    "mamba2": {"mixers": ["mamba2"], "mlps": ["none"]},
    "rwkv7": {"mixers": ["rwkv7"], "mlps": ["dense"]},
    "hybrid_moe": {"mixers": ["mamba", "attention"], "mlps": ["moe", "dense"]},
}


def _grads(model: LanguageModel, tokens: torch.Tensor, checkpointing: bool
           ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    model.zero_grad(set_to_none=True)
    model.train()
    model.activation_checkpointing = checkpointing
    ctx = ForwardContext()
    logits = model(tokens[:, :-1], ctx=ctx)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    aux = ctx.aux_loss_terms()
    (loss + sum(aux.values())).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in aux.items()}}


@pytest.mark.parametrize("kind", list(PATTERNS))
def test_gradients_identical_with_and_without(kind: str) -> None:
    torch.manual_seed(0)
    arch = tiny_arch(pattern=PATTERNS[kind], moe={"n_experts": 4, "top_k": 2})
    model = LanguageModel(arch, 64)
    tokens = torch.randint(0, 64, (2, 33))
    plain, plain_values = _grads(model, tokens, checkpointing=False)
    checked, checked_values = _grads(model, tokens, checkpointing=True)
    assert plain.keys() == checked.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], rtol=0, atol=0, msg=name)
    assert checked_values["loss"] == plain_values["loss"]


def test_trainer_checkpoints_every_block_and_trains_identically(
        cache_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A MoE hybrid through the trainer: same losses, aux losses, routing fractions, gradient
    norms and weights with the flag on; the flag makes each block forward go through
    torch.utils.checkpoint."""
    calls = []
    real = model_mod.checkpoint

    def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(type(fn).__name__)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(model_mod, "checkpoint", counting)
    common = ("data.max_bytes=300000", "data.val_fraction=0.1", "arch=jamba", "arch.d_model=64",
              "arch.n_layers=2", "arch.pattern.mixers=[mamba,attention]",
              "arch.pattern.mlps=[moe,dense]", "arch.moe.n_experts=4", "arch.attention.head_dim=16",
              "train.batch_size=4", "train.seq_len=16", "train.max_steps=2", "train.log_every=1",
              "train.eval_batches=1", "train.warmup_steps=0", "train.progress=false")
    run_training(make_config(*common), tmp_path / "plain")
    assert calls == []
    run_training(make_config(*common, "train.activation_checkpointing=true"), tmp_path / "ckpt")
    assert calls == ["Block"] * (2 * 2)  # 2 blocks x 2 steps (evaluation runs without it)

    def lines(run: str) -> list[dict[str, Any]]:
        out = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for line in out:
            line.pop("tokens_per_s", None)
        return out

    plain, ckpt = lines("plain"), lines("ckpt")
    assert "moe_load_balance" in plain[0] and "expert_fraction_max" in plain[0]
    assert ckpt == plain
    from safetensors.torch import load_file

    a = load_file(str(find_checkpoint(tmp_path / "plain") / "model.safetensors"))
    b = load_file(str(find_checkpoint(tmp_path / "ckpt") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
