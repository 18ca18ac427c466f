"""Mamba-1 / Mamba-2: kernels against plain recurrences written here, parallel = chunked = decoded,
constant state size, Hugging Face parity, published init, learning, and kernel-choice errors.

Tolerances: fp64 kernel checks at 1e-10 (the chunked forms are exact rearrangements of the
recurrence); fp32 model-level checks at 2e-5 absolute on logits of magnitude ~1 (float rounding
of differently ordered sums).
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from archbench.archs.kernels.selective_scan import selective_scan_chunked, selective_state_step
from archbench.archs.kernels.ssd import ssd_chunked, ssd_step
from archbench.archs.mamba import Mamba, Mamba2, hf_mamba_config, to_hf_mamba_state_dict
from archbench.archs.model import LanguageModel, arch_config, resolve_kernels
from archbench.config import ConfigError

ATOL = 2e-5
VOCAB = 40


def tiny_arch(kind: str, **sub: object) -> dict:
    if kind == "mamba":
        cfg = {"d_state": 8, "chunk_size": 4, **sub}
    else:
        cfg = {"d_state": 8, "head_dim": 16, "ngroups": 2, "chunk_size": 4, **sub}
    return {"d_model": 32, "n_layers": 2, "pattern": {"mixers": [kind], "mlps": ["none"]},
            kind: cfg}


def tiny_model(kind: str, seed: int = 0, **sub: object) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(tiny_arch(kind, **sub), VOCAB).eval()


# ---- plain sequential recurrences (the definitions) --------------------------------------------


def mamba1_recurrence(u, delta, A, B, C, D, z, h0):
    """h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t; y_t = (C_t . h_t + D u_t) * silu(z_t)."""
    h, ys = h0, []
    for t in range(u.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[
            :, t, None, :
        ]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return (torch.stack(ys, 1) + u * D) * F.silu(z), h


def mamba2_recurrence(x, dt, A, B, C, D, h0):
    """Per head: H_t = exp(dt_t A) H_{t-1} + dt_t x_t B_t^T; y_t = H_t C_t + D x_t."""
    heads, groups = x.shape[2], B.shape[2]
    Bh = B.repeat_interleave(heads // groups, dim=2)
    Ch = C.repeat_interleave(heads // groups, dim=2)
    h, ys = h0, []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((h * Ch[:, t, :, None, :]).sum(-1))
    return torch.stack(ys, 1) + x * D[:, None], h


def mamba1_inputs(batch=2, length=11, dim=5, n=3):
    g = torch.Generator().manual_seed(0)
    kw = {"dtype": torch.float64, "generator": g}
    return [
        torch.randn(batch, length, dim, **kw),  # u
        torch.rand(batch, length, dim, **kw) * 0.8 + 0.01,  # delta (after softplus)
        -torch.rand(dim, n, **kw) * 4 - 0.1,  # A
        torch.randn(batch, length, n, **kw),  # B
        torch.randn(batch, length, n, **kw),  # C
        torch.randn(dim, **kw),  # D
        torch.randn(batch, length, dim, **kw),  # z
        torch.randn(batch, dim, n, **kw),  # h0
    ]


def mamba2_inputs(batch=2, length=11, heads=4, hdim=3, groups=2, n=5):
    g = torch.Generator().manual_seed(1)
    kw = {"dtype": torch.float64, "generator": g}
    return [
        torch.randn(batch, length, heads, hdim, **kw),  # x
        torch.rand(batch, length, heads, **kw) * 0.8 + 0.01,  # dt (after softplus)
        -torch.rand(heads, **kw) * 4 - 0.1,  # A
        torch.randn(batch, length, groups, n, **kw),  # B
        torch.randn(batch, length, groups, n, **kw),  # C
        torch.randn(heads, **kw),  # D
        torch.randn(batch, heads, hdim, n, **kw),  # h0
    ]


# ---- kernels -----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 4, 11, 16])
def test_selective_scan_matches_recurrence(chunk: int) -> None:
    u, delta, A, B, C, D, z, h0 = mamba1_inputs()
    y_ref, h_ref = mamba1_recurrence(u, delta, A, B, C, D, z, h0)
    y, h = selective_scan_chunked(u, delta, A, B, C, D, z, h0, chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(h, h_ref, atol=1e-10, rtol=0)
    with torch.no_grad():  # the inference branch keeps no boundary states but must agree
        y_ng, _ = selective_scan_chunked(u, delta, A, B, C, D, z, h0, chunk_size=chunk)
    torch.testing.assert_close(y_ng, y_ref, atol=1e-10, rtol=0)


def test_selective_scan_gradients_match_recurrence() -> None:
    inputs = [t.requires_grad_() for t in mamba1_inputs(length=9)]
    w = torch.randn(2, 9, 5, dtype=torch.float64)  # a generic output weighting
    ref = torch.autograd.grad((mamba1_recurrence(*inputs)[0] * w).sum(), inputs)
    y, _ = selective_scan_chunked(*inputs[:7], inputs[7], chunk_size=4)
    ours = torch.autograd.grad((y * w).sum(), inputs)
    for name, g_ours, g_ref in zip("u delta A B C D z h0".split(), ours, ref, strict=True):
        torch.testing.assert_close(g_ours, g_ref, atol=1e-10, rtol=0, msg=f"grad of {name}")


def test_selective_step_matches_recurrence() -> None:
    u, delta, A, B, C, D, z, h0 = mamba1_inputs(length=3)
    y_ref, h_ref = mamba1_recurrence(u, delta, A, B, C, D, z, h0)
    state = h0.clone()
    ys = [selective_state_step(state, u[:, t], delta[:, t], A, B[:, t], C[:, t], D, z[:, t])
          for t in range(3)]
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(state, h_ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("chunk", [1, 4, 5, 16])
def test_ssd_matches_recurrence(chunk: int) -> None:
    x, dt, A, B, C, D, h0 = mamba2_inputs()
    y_ref, h_ref = mamba2_recurrence(x, dt, A, B, C, D, h0)
    y, h = ssd_chunked(x, dt, A, B, C, chunk, D, h0)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(h, h_ref, atol=1e-10, rtol=0)
    y0, _ = ssd_chunked(x, dt, A, B, C, chunk, D, None)
    y0_ref, _ = mamba2_recurrence(x, dt, A, B, C, D, torch.zeros_like(h0))
    torch.testing.assert_close(y0, y0_ref, atol=1e-10, rtol=0)


def test_ssd_gradients_and_step_match_recurrence() -> None:
    inputs = [t.requires_grad_() for t in mamba2_inputs(length=7)]
    x, dt, A, B, C, D, h0 = inputs
    w = torch.randn(x.shape, dtype=torch.float64)
    ref = torch.autograd.grad((mamba2_recurrence(*inputs)[0] * w).sum(), inputs)
    ours = torch.autograd.grad((ssd_chunked(x, dt, A, B, C, 3, D, h0)[0] * w).sum(), inputs)
    for name, g_ours, g_ref in zip("x dt A B C D h0".split(), ours, ref, strict=True):
        torch.testing.assert_close(g_ours, g_ref, atol=1e-10, rtol=0, msg=f"grad of {name}")
    with torch.no_grad():
        y_ref, h_ref = mamba2_recurrence(*inputs)
        state = h0.detach().clone()
        ys = [ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(7)]
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(state, h_ref, atol=1e-10, rtol=0)


# ---- parallel = chunked = recurrent, at model level ---------------------------------------------


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_chunk_size_is_a_speed_knob_not_math(kind: str) -> None:
    """(Prefill, decoding and the full forward agreeing: tests/test_mixer_contract.py.)"""
    model = tiny_model(kind)
    tokens = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        for chunk in (1, 3, 8, 32):  # 19 is divisible by none of them but 1
            for block in model.blocks:
                block.mixer.chunk_size = chunk
            torch.testing.assert_close(model(tokens), full, atol=ATOL, rtol=0)
        cache = model.init_cache(2, 19)
        model(tokens[:, :5], cache)
        model(tokens[:, 5:6], cache)
    assert cache.states[0][0].length == 6


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_state_bytes_constant_and_analytic(kind: str) -> None:
    model = tiny_model(kind)
    mixer = model.blocks[0].mixer
    if kind == "mamba":  # conv window (d_inner x 3) + SSM state (d_inner x N), fp32
        per_layer = 64 * 3 * 4 + 64 * 8 * 4
    else:  # conv over x, B, C: (64 + 2*2*8) x 3, SSM state 4 heads x 16 x 8, fp32
        per_layer = (64 + 32) * 3 * 4 + 4 * 16 * 8 * 4
    assert mixer.state_bytes(1, 10, torch.float32) == per_layer
    sizes = {model.cache_bytes(3, ctx, torch.float32) for ctx in (1, 100, 100_000)}
    assert sizes == {3 * 2 * per_layer}
    small, large = model.init_cache(3, 8), model.init_cache(3, 4096)
    assert small.nbytes() == large.nbytes() == 3 * 2 * per_layer
    with torch.no_grad():
        model(torch.zeros(3, 6, dtype=torch.long), large)
        model(torch.zeros(3, 1, dtype=torch.long), large)
    assert large.nbytes() == 3 * 2 * per_layer
    # bf16 keeps the conv window in bf16 but the SSM state in fp32 (it accumulates)
    conv_bytes = (64 if kind == "mamba" else 96) * 3
    assert mixer.state_bytes(1, 10, torch.bfloat16) == per_layer - conv_bytes * 2
    assert model.init_cache(1, 4, dtype=torch.bfloat16).nbytes() == 2 * (per_layer - conv_bytes * 2)


# ---- peers, init, learning -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_matches_hugging_face(kind: str) -> None:
    transformers = pytest.importorskip("transformers")
    model = tiny_model(kind, seed=3)
    hf_cls = transformers.MambaForCausalLM if kind == "mamba" else transformers.Mamba2ForCausalLM
    hf_config, state_dict = hf_mamba_config(model), to_hf_mamba_state_dict(model)
    hf = hf_cls(hf_config).eval()
    hf.load_state_dict(state_dict, strict=True)  # every name and shape
    tokens = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.abs().max() > 0.1  # a non-trivial comparison
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_published_init_and_shapes() -> None:
    arch = arch_config(tiny_arch("mamba", dt_min=0.002, dt_max=0.05))
    torch.manual_seed(0)
    m1 = Mamba(arch, 0)
    shapes = {name: tuple(p.shape) for name, p in m1.named_parameters()}
    assert shapes == {
        "in_proj.weight": (128, 32), "conv1d.weight": (64, 1, 4), "conv1d.bias": (64,),
        "x_proj.weight": (2 + 16, 64), "dt_proj.weight": (64, 2), "dt_proj.bias": (64,),
        "A_log": (64, 8), "D": (64,), "out_proj.weight": (32, 64),
    }
    torch.testing.assert_close(m1.A_log.exp(), torch.arange(1.0, 9.0).repeat(64, 1))
    assert torch.equal(m1.D, torch.ones(64))
    dt = F.softplus(m1.dt_proj.bias)
    assert 0.002 * 0.999 <= dt.min() and dt.max() <= 0.05 * 1.001
    assert dt.max() / dt.min() > 5  # spread log-uniformly, not constant
    assert m1.dt_proj.weight.abs().max() <= 2**-0.5
    std = 0.02 / math.sqrt(2 * 2)  # residual_std: init_std / sqrt(2 * n_layers)
    assert abs(m1.out_proj.weight.std().item() - std) < 0.3 * std

    arch2 = arch_config(tiny_arch("mamba2"))
    m2 = Mamba2(arch2, 0)
    shapes2 = {name: tuple(p.shape) for name, p in m2.named_parameters()}
    assert shapes2 == {
        "in_proj.weight": (2 * 64 + 2 * 2 * 8 + 4, 32), "conv1d.weight": (96, 1, 4),
        "conv1d.bias": (96,), "dt_bias": (4,), "A_log": (4,), "D": (4,),
        "norm.weight": (64,), "out_proj.weight": (32, 64),
    }
    a = m2.A_log.exp()
    assert 1.0 <= a.min() and a.max() <= 16.0
    dt2 = F.softplus(m2.dt_bias)
    assert 0.001 * 0.999 <= dt2.min() and dt2.max() <= 0.1 * 1.001


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_no_weight_decay_names(kind: str) -> None:
    model = tiny_model(kind)
    names = model.no_weight_decay_names()
    dt_name = "dt_proj.bias" if kind == "mamba" else "dt_bias"
    for i in range(2):
        for p in ("A_log", "D", dt_name):
            assert f"blocks.{i}.mixer.{p}" in names
        assert f"blocks.{i}.mixer.in_proj.weight" not in names
    assert set(model.blocks[0].mixer.no_weight_decay()) <= {
        n for n, _ in model.blocks[0].mixer.named_parameters()
    }


def bigram_floor(seq: list[int]) -> float:
    """Best mean loss (nats) of any predictor that sees only the current token."""
    pairs = Counter(zip(seq[:-1], seq[1:], strict=True))
    firsts = Counter(seq[:-1])
    return -sum(c * math.log(c / firsts[a]) for (a, _), c in pairs.items()) / (len(seq) - 1)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_loss_falls_on_repetitive_sequence(kind: str) -> None:
    torch.manual_seed(0)
    model = LanguageModel(tiny_arch(kind, chunk_size=8), 16).train()
    # period 12 with repeated tokens: the next token depends on more than the current one
    pattern = torch.randint(0, 16, (12,), generator=torch.Generator().manual_seed(2))
    seq = pattern.repeat(6)[None].repeat(4, 1)
    floor = bigram_floor(seq[0].tolist())
    assert floor > 0.4
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(100):
        logits = model(seq[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.5  # untrained: about ln 16 = 2.77
    # far below what the current token alone allows: the mixer carries the context
    assert losses[-1] < min(0.1, floor / 4), (floor, losses[-10:])


# ---- kernel choice ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_kernel_choice(kind: str) -> None:
    cuda_model = tiny_model(kind, kernels="cuda")
    with pytest.raises(RuntimeError, match=f"arch.{kind}.kernels.*CUDA device"):
        resolve_kernels(cuda_model, "cpu")
    # never silently run the torch path under a cuda request, even without resolve_kernels
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        cuda_model(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ConfigError, match=f"arch.{kind}.kernels='triton' is not allowed"):
        tiny_model(kind, kernels="triton")  # refused before the model is built


def test_cuda_error_names_missing_package() -> None:
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("mamba_ssm is installed here")
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        resolve_kernels(tiny_model("mamba", kernels="cuda"), "cuda")
