"""Depthwise causal convolution (Mamba's short conv, width 4) with SiLU, on (batch, L, channels).

A decoding state holds the last `width - 1` inputs, (batch, channels, width - 1). A chunk that
continues from a state is convolved with that state prepended as left context, which is exactly
the full-sequence convolution at those positions.

Why shifted multiply-adds instead of `F.conv1d(groups=channels)`: at width 4 the conv is four
fused multiply-adds per element; on CPU this form measured 1.6x faster forward and 2x faster
forward + backward than the grouped conv1d (batch 4, L 512, 1024 channels), and it works in the
(batch, L, channels) layout the projections produce, without transposes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """silu(causal depthwise conv) of x (batch, L, channels); weight (channels, width).

    With `conv_state` (batch, channels, width - 1) the state is the left context and is updated in
    place to the last width - 1 inputs; without it the left context is zeros.
    """
    length = x.shape[1]
    width = weight.shape[1]
    if conv_state is None:
        padded = F.pad(x, (0, 0, width - 1, 0))
    else:
        padded = torch.cat([conv_state.transpose(1, 2).to(x.dtype), x], dim=1)
        conv_state.copy_(padded[:, -(width - 1) :].transpose(1, 2))
    w = weight.t().contiguous().to(x.dtype)  # (width, channels): each tap's row contiguous
    head = padded[:, :length]
    out = head * w[0] if bias is None else torch.addcmul(bias.to(x.dtype), head, w[0])
    for k in range(1, width):
        out = torch.addcmul(out, padded[:, k : k + length], w[k])
    return F.silu(out)


def causal_conv1d_step(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor
) -> torch.Tensor:
    """One decoding step: x (batch, channels) -> silu(conv) (batch, channels); state updated."""
    window = torch.cat([conv_state, x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)
    out = (window * weight.to(window.dtype)).sum(dim=-1)
    if bias is not None:
        out = out + bias.to(out.dtype)
    conv_state.copy_(window[..., 1:])
    return F.silu(out).to(x.dtype)


def causal_conv1d_missing() -> str | None:
    """Why the `causal_conv1d` CUDA package cannot be imported, or None when it can."""
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update  # noqa: F401
    except ImportError as err:
        return f"causal_conv1d is not importable ({err}); pip install 'archbench[cuda]'"
    return None


def causal_conv1d_cuda(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """`causal_conv1d` through the CUDA `causal_conv1d_fn`, same contract.

    With a state, the state is prepended to the input and its outputs dropped, which gives the
    continuation exactly without the kernel's channel-last `initial_states` layout requirement.
    """
    from causal_conv1d import causal_conv1d_fn

    width = weight.shape[1]
    xt = x.transpose(1, 2)  # (batch, channels, L)
    if conv_state is not None:
        xt = torch.cat([conv_state.to(x.dtype), xt], dim=-1)
        conv_state.copy_(xt[..., -(width - 1) :])
    out = causal_conv1d_fn(xt.contiguous(), weight, bias, activation="silu")
    if conv_state is not None:
        out = out[..., width - 1 :]
    return out.transpose(1, 2)


def causal_conv1d_step_cuda(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor
) -> torch.Tensor:
    """`causal_conv1d_step` through `causal_conv1d_update` (state of width - 1, in place)."""
    from causal_conv1d import causal_conv1d_update

    x_state = x.to(conv_state.dtype).contiguous()  # the kernel wants one dtype for both
    return causal_conv1d_update(x_state, conv_state, weight, bias, activation="silu").to(x.dtype)
