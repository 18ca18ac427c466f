"""RWKV-7: the chunked training form and the recurrent definition agree; the layer keeps RWKV-LM's
initialisation; a tiny model learns to copy; unavailable kernels are errors. (Decoding = the full
forward, state bytes, gradients: tests/test_mixer_contract.py.)"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from archbench.archs.base import ForwardContext
from archbench.archs.kernels.rwkv7 import LOG_DECAY_MIN, wkv7_chunked, wkv7_recurrent
from archbench.archs.model import LanguageModel, resolve_kernels
from archbench.archs.rwkv import RWKV7ChannelMix, RWKV7TimeMix, lora_rank
from archbench.config import ConfigError, arch_schema

VOCAB = 23


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small ops run faster on one thread, and the 2 shared cores stay free for others."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def wkv_inputs(
    batch: int, length: int, heads: int, size: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Inputs shaped like the layer's: decays in RWKV-7's range, a = -kk, b = kk * iclr."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    shape = (batch, length, heads, size)
    log_w = LOG_DECAY_MIN * torch.sigmoid(3 * randn(*shape))
    kk = F.normalize(randn(*shape), dim=-1)
    iclr = torch.sigmoid(randn(*shape))
    state = randn(batch, heads, size, size)
    return randn(*shape), log_w, randn(*shape), randn(*shape), -kk, kk * iclr, state


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def rwkv_arch(d_model: int = 64, n_layers: int = 2, **rwkv7: Any) -> Any:
    schema = OmegaConf.structured(arch_schema())  # every default, as Hydra composes it
    return OmegaConf.merge(schema, OmegaConf.load("conf/arch/rwkv7.yaml"), {
        "d_model": d_model, "n_layers": n_layers, "rwkv7": {"head_size": 32, **rwkv7}})


def perturbed_model(seed: int = 0, **kwargs: Any) -> LanguageModel:
    """RWKV-LM zero-initialises the output projections, which would make every mixer a no-op and
    every decoding test vacuous: perturb all parameters so each path carries signal."""
    torch.manual_seed(seed)
    model = LanguageModel(rwkv_arch(**kwargs), VOCAB)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


# ---- the WKV operator ---------------------------------------------------------------------------
@pytest.mark.parametrize("length,chunk", [(1, 16), (7, 4), (16, 16), (33, 16), (50, 8), (45, 64)])
def test_chunked_equals_recurrent_fp64(length: int, chunk: int) -> None:
    """In fp64 the two forms agree to rounding: the chunked algorithm is exact, not approximate."""
    x = wkv_inputs(2, length, 2, 16, torch.float64)
    y_ref, s_ref = wkv7_recurrent(*x)
    y, s = wkv7_chunked(*x, chunk_size=chunk)
    assert rel_err(y, y_ref) < 1e-12
    assert rel_err(s, s_ref) < 1e-12


@pytest.mark.parametrize("length,chunk", [(37, 16), (100, 16), (129, 32), (70, 64)])
def test_chunked_equals_recurrent_fp32(length: int, chunk: int) -> None:
    """fp32, head size 64: max error relative to the largest output below 1e-5 (seen: ~3e-7)."""
    x = wkv_inputs(1, length, 2, 64, torch.float32, seed=length)
    y_ref, s_ref = wkv7_recurrent(*x)
    y, s = wkv7_chunked(*x, chunk_size=chunk)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5


def test_chunked_at_the_decay_floor_with_the_longest_chunk() -> None:
    """Every step at the strongest decay RWKV-7 allows: exp(+-g) spans e^(+-39) in a 64 chunk."""
    r, _, k, v, a, b, s = wkv_inputs(1, 200, 2, 64, torch.float32, seed=3)
    log_w = torch.full_like(r, LOG_DECAY_MIN * (1 - 1e-6))
    y_ref, s_ref = wkv7_recurrent(r, log_w, k, v, a, b, s)
    y, s_out = wkv7_chunked(r, log_w, k, v, a, b, s, chunk_size=64)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(s_out, s_ref) < 1e-5


def test_chunked_gradients_equal_recurrent() -> None:
    """Gradients of outputs and final state w.r.t. every input and the initial state (fp64)."""
    base = wkv_inputs(2, 23, 2, 8, torch.float64, seed=5)
    gen = torch.Generator().manual_seed(9)
    dy = torch.randn(base[0].shape, generator=gen, dtype=torch.float64)
    ds = torch.randn(base[-1].shape, generator=gen, dtype=torch.float64)

    def grads(fn: Any, **kw: Any) -> tuple[torch.Tensor, ...]:
        inputs = [t.clone().requires_grad_() for t in base]
        y, s = fn(*inputs, **kw)
        return torch.autograd.grad((y * dy).sum() + (s * ds).sum(), inputs)

    for g_chunk, g_ref in zip(grads(wkv7_chunked, chunk_size=5), grads(wkv7_recurrent)):
        assert rel_err(g_chunk, g_ref) < 1e-10


def test_chunk_size_is_bounded() -> None:
    x = wkv_inputs(1, 4, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="chunk_size=65"):
        wkv7_chunked(*x, chunk_size=65)


# ---- the layers and the model -------------------------------------------------------------------
def test_model_chunked_equals_recurrent_form() -> None:
    """The whole model with every time mix switched to the step-by-step definition."""
    model = perturbed_model(n_layers=3)
    tokens = torch.randint(0, VOCAB, (2, 29))
    with torch.no_grad():
        chunked = model(tokens)
        for block in model.blocks:
            block.mixer.kernel_path = "torch:recurrent"
        recurrent = model(tokens)
    assert rel_err(chunked, recurrent) < 1e-5


def test_value_residual_comes_from_the_first_rwkv_layer() -> None:
    model = perturbed_model(n_layers=3)
    mixers = [block.mixer for block in model.blocks]
    assert [m.stores_v_first for m in mixers] == [True, False, False]
    assert not hasattr(mixers[0], "v1") and all(hasattr(m, "v1") for m in mixers[1:])
    ctx = ForwardContext()
    tokens = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        model(tokens, ctx=ctx)
    assert ctx.value_residual is not None and ctx.value_residual.shape == (2, 9, 64)
    with pytest.raises(RuntimeError, match="v_first"):
        mixers[1](torch.randn(2, 9, 64))
    hybrid = OmegaConf.merge(rwkv_arch(), {"pattern": {"mixers": ["attention", "rwkv7"]}})
    assert RWKV7TimeMix(hybrid, 1).stores_v_first and not RWKV7TimeMix(hybrid, 3).stores_v_first


def test_value_residual_follows_rwkv7_layers_pinned_by_pattern_at() -> None:
    """rwkv7 pinned at layers 1 and 3 of an attention stack: layer 1 stores v_first (it is the
    first RWKV-7 layer, though the period holds none), layer 3 reads it, and the model runs."""
    pinned = OmegaConf.merge(rwkv_arch(n_layers=4), {"pattern": {
        "mixers": ["attention"], "mlps": ["dense"], "at": {"rwkv7": [1, "L-1"]}}})
    pinned.attention.head_dim = 32
    model = LanguageModel(pinned, VOCAB).eval()
    kinds = [(type(b.mixer).__name__, getattr(b.mixer, "stores_v_first", None))
             for b in model.blocks]
    assert [k for k, _ in kinds].count("RWKV7TimeMix") == 2
    assert kinds[1] == ("RWKV7TimeMix", True) and kinds[3] == ("RWKV7TimeMix", False)
    with torch.no_grad():
        logits = model(torch.randint(0, VOCAB, (2, 9)))
    assert torch.isfinite(logits).all()


def test_state_bytes_are_constant_in_context() -> None:
    model = perturbed_model(n_layers=2)
    d, heads, n = 64, 2, 32
    per_layer = 2 * 3 * d * 4 + 3 * heads * n * n * 4  # two token shifts + fp32 WKV state, B=3
    sizes = {model.cache_bytes(3, ctx, torch.float32) for ctx in (1, 100, 10_000, 1_000_000)}
    assert sizes == {2 * per_layer}
    cache = model.init_cache(3, 500)
    assert cache.nbytes() == 2 * per_layer
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (3, 40)), cache)
        for _ in range(5):
            model(torch.randint(0, VOCAB, (3, 1)), cache)
    assert cache.nbytes() == 2 * per_layer
    assert model.cache_bytes(3, 10, torch.bfloat16) == 2 * (2 * 3 * d * 2 + 3 * heads * n * n * 4)


def test_initialisation_follows_rwkv_lm() -> None:
    arch = rwkv_arch(d_model=768, n_layers=12)
    arch.rwkv7.head_size = 64
    first, last = RWKV7TimeMix(arch, 0), RWKV7TimeMix(arch, 11)
    assert first.lora_ranks == {"w": 64, "a": 64, "v": 32, "g": 128}  # RWKV-7 paper, Table 16
    assert lora_rank(2048, 1.8) == 96 and lora_rank(2048, 0.6, 0.8) == 256
    for layer in (first, last):
        assert torch.all(layer.output.weight == 0)
        assert torch.all(layer.w1 == 0) and torch.all(layer.a1 == 0) and torch.all(layer.g1 == 0)
        decay = torch.exp(LOG_DECAY_MIN * torch.sigmoid(layer.w0))
        assert decay.min() > math.exp(-0.606531) and decay.max() < 1
        assert layer.ln_x.eps == pytest.approx(64e-5) and layer.ln_x.num_groups == 12
    # Layer-dependent shift ratios (r0 = 0 -> 1, r1 = 1 -> 1/12 over depth), at channel C / 2:
    assert first.x_r[0, 0, 384].item() == pytest.approx(1 - 0.5**0.2)
    assert last.x_k[0, 0, 384].item() == pytest.approx(1 - (0.5 ** (0.9 / 12) + 0.4))
    assert last.x_v[0, 0, 384].item() == pytest.approx(1 - (0.5 ** (0.4 / 12) + 0.6))
    assert last.w0[0, 0, -1].item() == pytest.approx(-1.5) and first.w0[0, 0, 0] == -6.5
    cmix = RWKV7ChannelMix(arch, 0)
    assert cmix.key.out_features == 4 * 768 and torch.all(cmix.value.weight == 0)


def test_no_weight_decay_matches_rwkv_lm() -> None:
    model = perturbed_model(n_layers=2)
    names = model.no_weight_decay_names()
    for short in ("x_r", "x_g", "w0", "w1", "a2", "v0", "g2", "k_k", "k_a", "r_k", "ln_x.weight"):
        assert f"blocks.1.mixer.{short}" in names
    assert "blocks.1.mlp.x_k" in names
    for decayed in ("mixer.receptance.weight", "mixer.output.weight", "mlp.key.weight"):
        assert f"blocks.1.{decayed}" not in names


# ---- kernel choice ------------------------------------------------------------------------------
def test_kernel_choices_on_cpu() -> None:
    assert resolve_kernels(perturbed_model(), "cpu")["rwkv7"] == "torch:chunked"
    triton = perturbed_model(kernels="triton")
    with pytest.raises(RuntimeError, match="CUDA device"):
        resolve_kernels(triton, "cpu")
    with pytest.raises(RuntimeError, match="kernels=triton cannot run"):
        triton(torch.randint(0, VOCAB, (1, 5)))  # never a silent fallback to torch
    with pytest.raises(ConfigError, match=r"arch.rwkv7.kernels='cuda' is not allowed.*triton"):
        perturbed_model(kernels="cuda")  # no CUDA-C kernel: refused at validation


# ---- learning -----------------------------------------------------------------------------------
def test_tiny_model_learns_to_copy() -> None:
    """Copy 8 random symbols after a separator. The copied half is uniform over 16 symbols given
    anything but the first half, so no model that does not copy gets below ln 16 = 2.77 nats;
    the bar is 1.0 nats within 300 steps (about 60 are needed)."""
    symbols, n = 16, 8
    torch.manual_seed(0)
    arch = rwkv_arch(d_model=64, n_layers=2)
    arch.rwkv7.head_size = 16
    model = LanguageModel(arch, symbols + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)

    def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, symbols, (size, n), generator=gen)
        seq = torch.cat([x, torch.full((size, 1), symbols), x], dim=1)
        return seq[:, :-1], seq[:, 1:]

    def copy_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = model(inputs)[:, n:]
        return F.cross_entropy(logits.reshape(-1, symbols + 1), targets[:, n:].reshape(-1))

    held_out = batch(256)
    with torch.no_grad():
        start = copy_loss(*held_out).item()
    assert start > 2.5
    loss = start
    for step in range(300):
        model.train()
        train_loss = copy_loss(*batch(32))
        opt.zero_grad()
        train_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 19:
            with torch.no_grad():
                loss = copy_loss(*held_out).item()
            if loss < 1.0:
                break
    assert loss < 1.0, f"copy loss {loss:.3f} after {step + 1} steps (start {start:.3f})"
