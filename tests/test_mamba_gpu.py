"""kernels=cuda (mamba_ssm + causal_conv1d) against the pure-PyTorch path with the same weights:
forward logits, every parameter gradient, decoding steps and prefill from a non-empty state.

Skipped without a CUDA device or without the kernel packages (the skip says which). fp32
throughout; tolerances allow for the kernels' different summation order (and, for Mamba-2, Triton
matmuls in TF32 inside the chunk scan).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from archbench.archs.kernels.conv import causal_conv1d_missing
from archbench.archs.kernels.selective_scan import mamba_ssm_missing
from archbench.archs.kernels.ssd import ssd_cuda_missing
from archbench.archs.model import LanguageModel, resolve_kernels

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
_missing = mamba_ssm_missing() or ssd_cuda_missing() or causal_conv1d_missing()
if _missing:
    pytest.skip(_missing, allow_module_level=True)

VOCAB = 64
TOL = {"mamba": 2e-4, "mamba2": 5e-3}


def pair(kind: str) -> tuple[LanguageModel, LanguageModel]:
    """The same weights on the torch path and on the cuda path."""
    sub = {"d_state": 16, "chunk_size": 16}
    if kind == "mamba2":
        sub = {"d_state": 32, "head_dim": 32, "ngroups": 2, "chunk_size": 16}
    arch = {"d_model": 128, "n_layers": 2, "pattern": {"mixers": [kind], "mlps": ["none"]},
            kind: {**sub, "kernels": "torch"}}
    torch.manual_seed(0)
    ref = LanguageModel(arch, VOCAB).cuda()
    fast = copy.deepcopy(ref)
    for block in fast.blocks:
        block.mixer.kernels = "cuda"
    assert resolve_kernels(ref, "cuda")[kind] == ref.blocks[0].mixer.torch_path
    assert resolve_kernels(fast, "cuda")[kind] == "cuda:mamba_ssm"
    return ref, fast


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_cuda_forward_backward_match_torch(kind: str) -> None:
    ref, fast = pair(kind)
    tokens = torch.randint(0, VOCAB, (2, 100), device="cuda")
    losses = []
    for model in (ref, fast):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        losses.append((logits.detach(), loss.item()))
    tol = TOL[kind]
    torch.testing.assert_close(losses[1][0], losses[0][0], atol=tol, rtol=tol)
    for (name, p_ref), (_, p_fast) in zip(
        ref.named_parameters(), fast.named_parameters(), strict=True
    ):
        scale = p_ref.grad.abs().max().clamp_min(1e-6)
        err = (p_fast.grad - p_ref.grad).abs().max() / scale
        assert err < 10 * tol, f"grad of {name}: relative error {err:.2e}"


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_cuda_decoding_and_continued_prefill_match_torch(kind: str) -> None:
    ref, fast = pair(kind)
    tokens = torch.randint(0, VOCAB, (2, 30), device="cuda")
    with torch.no_grad():
        full = ref(tokens)
        cache = fast.init_cache(2, 30)
        parts = [fast(tokens[:, :9], cache), fast(tokens[:, 9:20], cache)]  # prefill from a state
        parts += [fast(tokens[:, t : t + 1], cache) for t in range(20, 30)]  # step kernels
    tol = TOL[kind]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=tol, rtol=tol)
