"""The GEMM behind every linear projection on CPU: oneDNN's, or aten's (MKL's), chosen per model.

Why a second path: on the AMD EPYC (Zen 5, AVX-512) machines this project is developed on, the
MKL build inside the PyTorch CPU wheel runs fp32 GEMMs at ~90 GFLOP/s on one core, whatever
`MKL_ENABLE_INSTRUCTIONS` says, while oneDNN, also inside the wheel, runs the same products at
~200 (one thread, 2048 x 256 x 768: 9.1 ms against 4.2 ms; the weight gradient's transposed form
9.4 against 7.2 ms). Every projection of every backbone, and the LM head, is such a product in
training and prefill, so this choice moves training speed more than any change to a mixer.

Both paths compute x @ W^T + b in fp32 with the same parameters; only the order of the sums
differs (tests/test_linear_kernels.py bounds the difference, forward and gradients). oneDNN has
a fixed cost per call of ~20 us, so small products stay on aten: the per-token decoding steps of
the small sizes (e.g. batch 8 x 256 x 768 measured 51 us on aten, 46 on oneDNN; 8 x 128 x 258
11 against 26 us). The rule is one threshold on the multiply-adds of the product, `MIN_MACS`.

The path is a model setting, `arch.matmul` = auto | aten | onednn, resolved with the device by
`archs.model.resolve_kernels` and named in every record's kernel paths: auto takes oneDNN on a
CPU that has it and aten elsewhere (CUDA's GEMMs are cuBLAS's either way). Only fp32 products
outside autocast take oneDNN; under a bf16 / fp16 autocast the projections are aten's, and so
are they in a graph traced with frozen weights (the compiled CPU decode step,
archs/compiling.py), where inductor picks each GEMM itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Products smaller than this (rows x in x out multiply-adds) stay on aten: measured break-even
# at 1-1.6e6 on one Zen 5 core (16 x 256 x 256: 1.00x; 8 x 256 x 768: 1.10x); 2^21 keeps to
# where oneDNN wins clearly (12 x 256 x 768: 1.31x, 16 x 256 x 768: 1.39x).
MIN_MACS = 1 << 21

MATMUL_PATHS = ("onednn", "aten")  # in order of preference for arch.matmul=auto on CPU


def onednn_missing(device: torch.device) -> str | None:
    """Why the oneDNN GEMM cannot run on `device`, or None when it can."""
    if device.type != "cpu":
        return f"oneDNN's GEMM is a CPU path; the device is {device.type!r} (use aten)"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this torch build lacks torch.ops.mkldnn._linear_pointwise"
    return None


# An operator of our own, so that the compiler keeps the call (inductor would otherwise lower the
# product to its own extern GEMM, MKL's) and autograd gets gradients from the same GEMM.
@torch.library.custom_op("archbench::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                  ) -> torch.Tensor:
    """x (..., in) @ weight (out, in)^T + bias by oneDNN; any strides (x's rows are copied to
    row-major first when its last dimension is not contiguous)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _onednn_linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                         ) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("archbench::onednn_linear_weight_grad", mutates_args=())
def onednn_linear_weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The weight's gradient, grad (..., out)^T @ x (..., in) -> (out, in), summed over rows.
    An operator of its own: the rows are flattened inside it, where the real strides are known
    (a reshape traced by AOTAutograd was fixed to a view that a non-contiguous gradient broke)."""
    # Row-major copies first: given a column slice of a wider tensor (Mamba's dt, 16 of 48
    # columns), oneDNN took 425 ms for what takes 1 ms from contiguous rows.
    rows_grad = grad.reshape(-1, grad.shape[-1]).contiguous()
    rows_x = x.reshape(-1, x.shape[-1]).contiguous()
    return torch.ops.mkldnn._linear_pointwise(rows_grad.t(), rows_x.t(), None, "none", [], "")


@onednn_linear_weight_grad.register_fake
def _weight_grad_shape(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return grad.new_empty(grad.shape[-1], x.shape[-1])


def _keep(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _grads(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = onednn_linear(grad, weight.t(), None)  # (..., out) @ W: W^T as the "weight"
    if ctx.needs_input_grad[1]:
        grad_w = onednn_linear_weight_grad(grad, x)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.sum(dim=tuple(range(grad.dim() - 1)))
    return grad_x, grad_w, grad_b


onednn_linear.register_autograd(_grads, setup_context=_keep)


@torch._dynamo.assume_constant_result
def tracing_frozen_weights() -> bool:
    """Whether a graph with frozen weights is being traced (archs/compiling.py: the compiled
    decode step on CPU). Its projections are left to inductor, which times its C++ GEMM on a
    prepacked weight against aten's; our oneDNN operator is opaque to it and repacks the weight
    at every call (RWKV-7's batch-8 channel mix: 140-180 us a product). Read once at trace time
    (assume_constant_result): no guard, so the graph is not recompiled when the flag drops."""
    return bool(torch._inductor.config.freezing) and not torch.is_grad_enabled()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, path: str
           ) -> torch.Tensor:
    """F.linear through `path`; oneDNN only for fp32 products of at least MIN_MACS outside
    autocast and outside frozen graphs (the rule is on shapes, dtypes and the trace, so a
    compiled graph fixes it once)."""
    if (path == "onednn" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() * weight.shape[0] >= MIN_MACS
            and not torch.is_autocast_enabled("cpu") and not tracing_frozen_weights()):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class PathLinear(nn.Linear):
    """nn.Linear whose product goes through `linear(..., self.matmul_path)`. The model shell turns
    its nn.Linear modules into this class in place (`use_matmul_path`): same parameters, same
    state dict, so a new mixer writes plain nn.Linear and gets the path without asking."""

    matmul_path: str = "aten"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.matmul_path)


def use_matmul_path(model: nn.Module, path: str) -> None:
    """Set every nn.Linear of `model` to `path` (the class changes in place, as
    torch.nn.utils.parametrize does)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = PathLinear
        if isinstance(module, PathLinear):
            module.matmul_path = path
