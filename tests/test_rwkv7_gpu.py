"""RWKV-7 on CUDA: flash-linear-attention's Triton kernel (kernels=triton) gives the results of
the pure-PyTorch chunked form. Skipped without a CUDA device or without flash-linear-attention.

Tolerances are looser than on CPU because fla's kernels use TF32 tensor-core matmuls for fp32
inputs (about 1e-3 relative per product).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from archbench.archs.kernels.rwkv7 import fla_unavailable, wkv7_chunked, wkv7_fla
from archbench.archs.model import LanguageModel, resolve_kernels

_REASON = "no CUDA device" if not torch.cuda.is_available() else fla_unavailable(
    torch.device("cuda")
)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_REASON is not None, reason=f"triton:fla unavailable: {_REASON}"),
]
VOCAB = 97


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def wkv_inputs(length: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (2, length, 4, 64)

    def randn(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=gen, device="cuda")

    log_w = -0.606531 * torch.sigmoid(3 * randn(*shape))
    kk = torch.nn.functional.normalize(randn(*shape), dim=-1)
    iclr = torch.sigmoid(randn(*shape))
    return [randn(*shape), log_w, randn(*shape), randn(*shape), -kk, kk * iclr,
            0.1 * randn(2, 4, 64, 64)]


@pytest.mark.parametrize("length", [1, 50, 256, 1000])
def test_fla_forward_equals_torch(length: int) -> None:
    x = wkv_inputs(length, seed=length)
    y_ref, s_ref = wkv7_chunked(*x)
    y, s = wkv7_fla(*x)
    assert rel_err(y, y_ref) < 5e-3
    assert rel_err(s, s_ref) < 5e-3


def test_fla_gradients_equal_torch() -> None:
    base = wkv_inputs(200, seed=7)
    dy = torch.randn_like(base[0])
    ds = torch.randn_like(base[-1])

    def grads(fn: Any) -> tuple[torch.Tensor, ...]:
        inputs = [t.clone().requires_grad_() for t in base]
        y, s = fn(*inputs)
        return torch.autograd.grad((y * dy).sum() + (s * ds).sum(), inputs)

    for g_fla, g_ref in zip(grads(wkv7_fla), grads(wkv7_chunked)):
        assert rel_err(g_fla, g_ref) < 2e-2


def _model(kernels: str) -> LanguageModel:
    arch = OmegaConf.load("conf/arch/rwkv7.yaml")
    arch.d_model, arch.n_layers, arch.rwkv7.kernels = 128, 2, kernels
    torch.manual_seed(0)
    model = LanguageModel(arch, VOCAB)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.cuda().eval()


def test_triton_model_equals_torch_model_and_decodes() -> None:
    fast, ref = _model("triton"), _model("torch")
    assert resolve_kernels(fast, "cuda")["rwkv7"] == "triton:fla"
    assert resolve_kernels(ref, "cuda")["rwkv7"] == "torch:chunked"
    tokens = torch.randint(0, VOCAB, (2, 300), device="cuda")
    with torch.no_grad():
        full = fast(tokens)
        assert rel_err(full, ref(tokens)) < 5e-3
        cache = fast.init_cache(2, 300)
        pieces = [fast(tokens[:, :130], cache), fast(tokens[:, 130:290], cache)]
        pieces += [fast(tokens[:, t : t + 1], cache) for t in range(290, 300)]
    assert rel_err(torch.cat(pieces, dim=1), full) < 5e-3
