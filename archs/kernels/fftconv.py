"""Causal long convolution through the FFT, and the direct sum it must equal.

S4D, H3 and Hyena all apply a filter as long as the sequence. Summing it directly costs O(L^2)
per channel; zero-padding both signals to 2L turns the circular product of the FFT into a linear
(hence causal, after keeping the first L outputs) convolution at O(L log L). Biases and skip terms
(S4D's D, Hyena's bias) are left to the callers, so this stays one operation with one reference.
"""

from __future__ import annotations

import torch


def _fft_size(length: int) -> int:
    """Smallest power of two >= 2 * length: no wrap-around, and the FFT's fastest sizes."""
    return 1 << max(1, (2 * length - 1).bit_length())


def fft_causal_conv(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """y[..., t] = sum_{s<=t} kernel[..., t - s] * u[..., s], over the last dimension.

    `u` is (..., L); `kernel` (..., K) broadcasts against it (e.g. (channels, K) against
    (batch, channels, L)); a kernel shorter than L is zero beyond its end, a longer one is cut.
    Computed in at least fp32 (half-precision FFTs lose the small tail of long filters); the
    result has u's dtype.
    """
    length = u.shape[-1]
    kernel = kernel[..., :length]
    n = _fft_size(length)
    work = torch.promote_types(torch.promote_types(u.dtype, kernel.dtype), torch.float32)
    u_f = torch.fft.rfft(u.to(work), n=n)
    k_f = torch.fft.rfft(kernel.to(work), n=n)
    return torch.fft.irfft(u_f * k_f, n=n)[..., :length].to(u.dtype)


def direct_causal_conv(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The same convolution as an explicit sum over lags: the O(L^2) reference for tests."""
    length = u.shape[-1]
    kernel = kernel[..., :length]
    out = torch.zeros(torch.broadcast_shapes(u.shape, kernel.shape[:-1] + (length,)),
                      dtype=torch.promote_types(u.dtype, kernel.dtype), device=u.device)
    for lag in range(kernel.shape[-1]):
        out[..., lag:] += kernel[..., lag : lag + 1] * u[..., : length - lag]
    return out
