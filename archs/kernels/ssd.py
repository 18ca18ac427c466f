"""Mamba-2's state-space duality (SSD): the chunked pure-PyTorch algorithm, the recurrent step, and
the dispatch to `mamba_ssm`'s Triton `mamba_chunk_scan_combined`.

Per head h (scalar decay a_t = exp(dt_t * A_h), A_h < 0), head-dim row p and state column n:

    H_t = a_t * H_{t-1} + dt_t * x_t B_t^T,        y_t = H_t C_t + D_h * x_t

Chunked form (Dao & Gu, 2024, section 6), with cumulative log-decay s_t = sum_{r <= t} dt_r A_h
inside each chunk of length Q:
  1. within a chunk, attention-like:  y_t += sum_{r <= t} exp(s_t - s_r) (C_t . B_r) dt_r x_r
     (the segment-sum mask exp(s_t - s_r) is Q x Q per head, never exp of a positive number);
  2. each chunk's own final state from zero: S_c = sum_r exp(s_Q - s_r) dt_r x_r B_r^T;
  3. states passed between chunks: H_c = exp(s_Q) H_{c-1} + S_c (a loop over chunks);
  4. from the state entering a chunk: y_t += exp(s_t) H_{c-1} C_t.
Everything but step 3 is a batched matmul over all chunks at once, so plain autograd is fast and
its memory is O(L * Q) per head plus O(L / Q) states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOG2E = 1.4426950408889634


def _chunked(t: torch.Tensor, chunk: int) -> torch.Tensor:
    """(b, L, ...) -> (b, L / chunk, chunk, ...); L must be a multiple of chunk."""
    return t.reshape(t.shape[0], t.shape[1] // chunk, chunk, *t.shape[2:])


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (b, L, h, p) in the dtype of x, and the final state (b, h, p, n) in fp32.

    x: (b, L, h, p); dt: (b, L, h) after softplus; A: (h,) negative; B, C: (b, L, g, n) with g
    dividing h (head i reads group i // (h / g)); D: (h,); initial_state: (b, h, p, n) or None.
    Padding the tail with dt = 0 leaves the state unchanged (decay 1, input 0), so the final state
    is exact for any L.
    """
    batch, length, heads, hdim = x.shape
    groups, n_state = B.shape[2], B.shape[3]
    hg = heads // groups  # heads per group; head i = (group i // hg, member i % hg)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    q = min(chunk_size, length)
    pad = (-length) % q
    xf, dtf, Bf, Cf = (F.pad(t.to(cdt), (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    nc = (length + pad) // q
    # x dt keeps the input layout (b, c, q, g, hg, p); B and C are (b, c, g, q, n).
    x_dt = _chunked(xf * dtf.unsqueeze(-1), q).view(batch, nc, q, groups, hg, hdim)
    B_c = _chunked(Bf, q).transpose(2, 3)
    C_c = _chunked(Cf, q).transpose(2, 3)
    # Log-decays in base 2: exp2 is ~3x faster than exp on CPU and has no slow path when a long
    # chunk's decay underflows (exp's vectorised path falls back ~25x slower there).
    s = torch.cumsum(_chunked(dtf, q) * (A.to(cdt) * LOG2E), dim=2)  # (b, c, q, h)
    s = s.view(batch, nc, q, groups, hg).permute(0, 1, 3, 4, 2)  # (b, c, g, hg, q)

    # 1. Intra-chunk, quadratic: (C B^T) masked by the segment-sum decay, per head.
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    seg = (s.unsqueeze(-1) - s.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
    scores = torch.matmul(C_c, B_c.transpose(-1, -2)).unsqueeze(3)  # (b, c, g, 1, q, q)
    y_diag = torch.matmul(scores * torch.exp2(seg), x_dt.permute(0, 1, 3, 4, 2, 5))

    # 2. Each chunk's final state from a zero start, all heads of a group in one product:
    #    (n x q) @ (q x hg*p), the state kept as (n, hg, p).
    to_end = torch.exp2(s[..., -1:] - s).permute(0, 1, 4, 2, 3).unsqueeze(-1)  # (b,c,q,g,hg,1)
    x_w = (x_dt * to_end).transpose(2, 3).reshape(batch, nc, groups, q, hg * hdim)
    chunk_states = torch.matmul(B_c.transpose(-1, -2), x_w)  # (b, c, g, n, hg * p)

    # 3. Pass states across chunks (unbind once: indexing in the loop would make the backward
    #    allocate a full-size zero gradient per chunk).
    decays = torch.exp2(s[..., -1]).view(batch, nc, groups, 1, hg, 1).unbind(1)
    own = chunk_states.view(batch, nc, groups, n_state, hg, hdim).unbind(1)
    if initial_state is None:
        state = x.new_zeros((batch, groups, n_state, hg, hdim), dtype=cdt)
    else:
        state = initial_state.to(cdt).view(batch, groups, hg, hdim, n_state).permute(0, 1, 4, 2, 3)
    entering = []
    for c in range(nc):
        entering.append(state)
        state = torch.addcmul(own[c], decays[c], state)
    states_in = torch.stack(entering, dim=1).reshape(batch, nc, groups, n_state, hg * hdim)

    # 4. Read-out of the state entering each chunk, decayed to t: (q x n) @ (n x hg*p).
    y_off = torch.matmul(C_c, states_in).view(batch, nc, groups, q, hg, hdim)
    y = y_off * torch.exp2(s).transpose(-1, -2).unsqueeze(-1) + y_diag.transpose(3, 4)

    y = y.transpose(2, 3).reshape(batch, nc * q, heads, hdim)[:, :length]
    if D is not None:
        y = y + x.to(cdt) * D.to(cdt).view(heads, 1)
    final = state.permute(0, 1, 3, 4, 2).reshape(batch, heads, hdim, n_state)
    return y.to(x.dtype), final


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """One recurrent step, updating `state` (b, h, p, n) in place.

    x: (b, h, p); dt: (b, h) after softplus; B, C: (b, g, n). Returns y (b, h, p) in x's dtype.
    """
    batch, heads, hdim, n_state = state.shape
    groups = B.shape[1]
    cdt = state.dtype
    dtc = dt.to(cdt)
    B_h = B.to(cdt).repeat_interleave(heads // groups, dim=1)  # (b, h, n)
    C_h = C.to(cdt).repeat_interleave(heads // groups, dim=1)
    decay = torch.exp(dtc * A.to(cdt)).view(batch, heads, 1, 1)
    update = (x.to(cdt) * dtc.unsqueeze(-1)).unsqueeze(-1) * B_h.unsqueeze(-2)
    state.mul_(decay).add_(update)
    y = (state * C_h.unsqueeze(-2)).sum(-1)  # ~6x faster on CPU than a batched mat-vec
    if D is not None:
        y = y + x.to(cdt) * D.to(cdt).view(heads, 1)
    return y.to(x.dtype)


# ---- the CUDA path (mamba_ssm, Triton) ----------------------------------------------------------


def ssd_cuda_missing() -> str | None:
    """Why `mamba_ssm`'s SSD kernels cannot be imported, or None when they can."""
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update  # noqa: F401
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # noqa: F401
    except ImportError as err:
        return f"mamba_ssm is not importable ({err}); pip install 'archbench[cuda]'"
    return None


def ssd_cuda(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `ssd_chunked`, through `mamba_chunk_scan_combined` (dt already softplus)."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    y, last = mamba_chunk_scan_combined(
        x, dt, A.float(), B, C, chunk_size, D=None if D is None else D.float(),
        initial_states=initial_state,
        dt_softplus=False, return_final_states=True,
    )
    return y, last.float()


def ssd_step_cuda(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """`ssd_step` through mamba_ssm's Triton `selective_state_update` (state updated in place)."""
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    heads, hdim, n_state = state.shape[1:]
    A_full = A.float().view(heads, 1, 1).expand(heads, hdim, n_state)
    dt_full = dt.unsqueeze(-1).expand(-1, -1, hdim)
    D_full = None if D is None else D.view(heads, 1).expand(heads, hdim)
    return selective_state_update(state, x, dt_full, A_full, B, C, D=D_full, dt_softplus=False)
