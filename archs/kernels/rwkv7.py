"""RWKV-7's WKV operator in three forms that compute one result.

Per head (head size N), with the state S an N x N matrix indexed [value, key] as in RWKV-LM, and
row vectors r, w, k, v, a, b of length N at each step t:

    S_t = S_{t-1} (diag(w_t) + a_t^T b_t) + v_t^T k_t,        y_t = S_t r_t^T

RWKV-7 calls it with a = -kk and b = kk * iclr (kk the L2-normalised key), which gives the paper's
generalised delta rule S_t = S_{t-1} (diag(w_t) - kk_t^T (iclr_t * kk_t)) + v_t^T k_t. Decays are
passed as log_w = log(w_t) (RWKV-7 keeps them in (-exp(-1/2), 0)).

The forms:
- `wkv7_recurrent`: the definition, one token at a time. Decoding steps and the test reference.
- `wkv7_chunked`: pure PyTorch, for training and prefill. The sequence is cut into chunks of L
  tokens; inside a chunk everything is a handful of L x L and L x N matmuls plus one unit
  lower-triangular solve (the UT transform of the product of the L diagonal-plus-rank-one
  transitions); only the N x N state is carried from chunk to chunk. Time and memory are linear
  in the length.
- `wkv7_fla`: flash-linear-attention's Triton chunk kernel (`fla.ops.rwkv7.chunk_rwkv7`), CUDA
  only.

The chunked algorithm (per chunk, positions t = 1..L, S_0 the state entering the chunk). With
g_t = sum_{i<=t} log w_i (log space, relative to the chunk start) and u_t = S_{t-1} a_t^T, the
recurrence unrolls to

    S_t = S_0 G_t + sum_{s<=t} (u_s b_s + v_s^T k_s) G_t G_s^{-1},        G_t = diag(exp(g_t)),

so the u_t solve the unit lower-triangular system

    u_t = S_0 G_{t-1} a_t^T + sum_{s<t} ([a_t G_{t-1} G_s^{-1} b_s^T] u_s
                                         + [a_t G_{t-1} G_s^{-1} k_s^T] v_s^T),

and y_t and S_L follow from them with two more masked L x L products. Writing U = W S_0^T + U'
(W and U' do not depend on S_0) makes the state pass between chunks one N x N matmul per chunk:
S_L = S_0 A + C. Every exp(+-g) factor is bounded by exp(0.6065 * L) because each step decays by
at most exp(-0.6065): about 1.6e4 for L = 16 and 7e16 for L = 64, which fp32 holds without loss
(each product is formed as a product of two such factors, never as a difference). Chunks longer
than `MAX_CHUNK` are refused for that reason.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

LOG_DECAY_MIN = -math.exp(-0.5)  # RWKV-7's decay is exp(-0.606531 * sigmoid(.)) > exp(-0.606531)
MAX_CHUNK = 64


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for everything below fp64: the state accumulates over thousands of steps."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _zero_state(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    batch, _, heads, size = x.shape
    return torch.zeros(batch, heads, size, size, device=x.device, dtype=dtype)


def wkv7_recurrent(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, step by step. Inputs (B, T, H, N); state (B, H, N, N) as [value, key].

    Returns y (B, T, H, N) and the final state, both in the compute dtype (fp32 or fp64).
    """
    dt = _compute_dtype(r)
    s = _zero_state(r, dt) if state is None else state.to(dt)
    r, k, v, a, b = (x.to(dt) for x in (r, k, v, a, b))
    w = log_w.to(dt).exp()
    outs = []
    # unbind, not x[:, t]: indexing's backward would build a full-size gradient for every step.
    steps = zip(*(x.unbind(1) for x in (r, w, k, v, a, b)))
    for r_t, w_t, k_t, v_t, a_t, b_t in steps:
        sa = s @ a_t.unsqueeze(-1)  # (B, H, N, 1): S_{t-1} a_t^T
        s = s * w_t.unsqueeze(-2) + sa * b_t.unsqueeze(-2) + v_t.unsqueeze(-1) * k_t.unsqueeze(-2)
        outs.append((s @ r_t.unsqueeze(-1)).squeeze(-1))
    if not outs:
        return r.new_zeros(r.shape), s
    return torch.stack(outs, dim=1), s


def _chunks(x: torch.Tensor, pad: int, n_chunks: int, size: int, dt: torch.dtype) -> torch.Tensor:
    """(B, T, H, N) -> (B, H, n_chunks, size, N), zero-padded at the end.

    Zero padding is inert: log_w = 0 (no decay) and a = b = k = v = 0 leave the state unchanged.
    """
    x = x.to(dt).transpose(1, 2)
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    batch, heads, _, dim = x.shape
    return x.reshape(batch, heads, n_chunks, size, dim)


def wkv7_chunked(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked parallel form; same signature and result as `wkv7_recurrent` (see module doc)."""
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(
            f"chunk_size={chunk_size} must be in [1, {MAX_CHUNK}]: decay factors of up to "
            f"exp(0.6065 * chunk_size) must stay well inside the fp32 range"
        )
    dt = _compute_dtype(r)
    batch, length, heads, size = r.shape
    s = _zero_state(r, dt) if state is None else state.to(dt)
    if length == 0:
        return r.new_zeros(r.shape, dtype=dt), s
    n_chunks = -(-length // chunk_size)
    pad = n_chunks * chunk_size - length
    r, lw, k, v, a, b = (
        _chunks(x, pad, n_chunks, chunk_size, dt) for x in (r, log_w, k, v, a, b)
    )

    g = lw.cumsum(dim=-2)  # inclusive: decay from the chunk start through step t
    g_end = g[..., -1:, :]
    r_dec = r * g.exp()  # r_t G_t
    a_dec = a * (g - lw).exp()  # a_t G_{t-1}
    inv = (-g).exp()
    k_inv, b_inv = k * inv, b * inv  # k_s G_s^{-1}, b_s G_s^{-1}
    to_end = (g_end - g).exp()
    k_end, b_end = k * to_end, b * to_end  # k_s G_L G_s^{-1}, b_s G_L G_s^{-1}

    ones = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=r.device)
    strict, causal = ones.tril(-1), ones.tril(0)
    zero = torch.zeros((), dtype=dt, device=r.device)
    m_ab = torch.where(strict, a_dec @ b_inv.mT, zero)
    m_ak = torch.where(strict, a_dec @ k_inv.mT, zero)
    m_rb = torch.where(causal, r_dec @ b_inv.mT, zero)
    m_rk = torch.where(causal, r_dec @ k_inv.mT, zero)

    # UT transform: (I - M_ab) [W, U'] = [a G_{t-1}, M_ak V]; u_t = W_t S_0^T + U'_t.
    eye = torch.eye(chunk_size, dtype=dt, device=r.device)
    rhs = torch.cat([a_dec, m_ak @ v], dim=-1)
    sol = torch.linalg.solve_triangular(eye - m_ab, rhs, upper=False, unitriangular=True)
    w_mat, u_free = sol.split([size, size], dim=-1)

    # Chunk transition S_L = S_0 A + C, then the only sequential part: N x N matmuls per chunk.
    trans = torch.diag_embed(g_end.squeeze(-2).exp()) + w_mat.mT @ b_end
    inject = u_free.mT @ b_end + v.mT @ k_end
    # unbind, not indexing: the backward of x[:, :, c] would build a full-size gradient per chunk
    # (quadratic in the length); unbind's backward stacks them once.
    trans_c = trans.flatten(0, 1).unbind(1)
    inject_c = inject.flatten(0, 1).unbind(1)
    starts = []
    for c in range(n_chunks):
        starts.append(s)
        s = torch.baddbmm(inject_c[c], s.flatten(0, 1), trans_c[c]).view(batch, heads, size, size)
    s0 = torch.stack(starts, dim=2)  # (B, H, n_chunks, N, N): state entering each chunk

    u = w_mat @ s0.mT + u_free
    y = r_dec @ s0.mT + m_rb @ u + m_rk @ v
    y = y.reshape(batch, heads, n_chunks * chunk_size, size)[:, :, :length]
    return y.transpose(1, 2), s


def fla_unavailable(device: torch.device) -> str | None:
    """Why `triton:fla` cannot run on `device`, naming every missing piece; None when it can."""
    missing = []
    if device.type != "cuda":
        missing.append(f"it needs a CUDA device, got {device.type!r}")
    try:
        from fla.ops.rwkv7 import chunk_rwkv7  # noqa: F401
    except Exception as err:  # ImportError, or triton failing to initialise
        missing.append(
            "flash-linear-attention is not importable (pip install flash-linear-attention): "
            f"{type(err).__name__}: {err}"
        )
    return "; ".join(missing) if missing else None


def wkv7_fla(
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-linear-attention's chunk kernel; its state is [key, value], ours [value, key].

    Inputs go in the activation dtype (bf16 in bf16 training, as fla's own RWKV-7 layer does);
    the kernel keeps its state in fp32. Keywords follow fla's signature, which moved between
    releases (`w` is the log decay in 0.6; one intermediate release named it `log_w`).
    """
    from fla.ops.rwkv7 import chunk_rwkv7

    params = inspect.signature(chunk_rwkv7).parameters
    init = None if state is None else state.transpose(-1, -2).float().contiguous()
    # One dtype for all inputs: r's, the activation dtype (under autocast some of the others,
    # formed with fp32 parameters, come out in fp32).
    k, v, a, b, log_w = (x.to(r.dtype).contiguous() for x in (k, v, a, b, log_w))
    kwargs = dict(
        r=r.contiguous(), k=k, v=v, a=a, b=b, scale=1.0, initial_state=init,
        output_final_state=True,
    )
    kwargs["log_w" if "log_w" in params else "w"] = log_w
    if "lower_bound" in params:  # lets fla use its tensor-core scheme, as its RWKV-7 layer does
        kwargs.update(safe_gate=True, lower_bound=LOG_DECAY_MIN)
    y, final = chunk_rwkv7(**kwargs)
    return y, final.transpose(-1, -2).float()


def wkv7(
    path: str,
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one of the forms by kernel-path name; the reference forms run outside autocast so the
    state never drops to half precision."""
    if path == "triton:fla":
        reason = fla_unavailable(r.device)
        if reason is not None:
            raise RuntimeError(f"arch.rwkv7.kernels=triton cannot run: {reason}")
        return wkv7_fla(r, log_w, k, v, a, b, state)
    with torch.autocast(device_type=r.device.type, enabled=False):
        if path == "torch:chunked":
            return wkv7_chunked(r, log_w, k, v, a, b, state, chunk_size)
        if path == "torch:recurrent":
            return wkv7_recurrent(r, log_w, k, v, a, b, state)
    raise ValueError(
        f"unknown RWKV-7 kernel path {path!r}; one of torch:chunked, torch:recurrent, triton:fla"
    )
