"""The contract every registered mixer keeps, checked for each one the registry knows (a new mixer
file is picked up without editing this test).

Each mixer is built at its config dataclass's defaults in a tiny two-layer model (mixer-only
blocks, width the smallest multiple of 32 its width divisor allows), cast to fp64, and with every
parameter perturbed: several families initialise output projections at zero (RWKV-7), which would
make outputs constant and every check below vacuous.

Tolerances: outputs that must be identical by construction (causality) at 1e-12; outputs computed
in a different order or batch (chunked prefill, token-by-token decoding, padding, another kernel
path) at 2e-6 absolute on logits of magnitude ~1. Not tighter, although the model is in fp64: some
mixers form their decays and keep their recurrent state in fp32 whatever the model dtype, by
design (they accumulate over the whole context), so reorderings agree to fp32 rounding (seen: up
to 4e-7, RWKV-7).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from archbench.archs import registry
from archbench.archs.base import ForwardContext
from archbench.archs.model import LanguageModel, resolve_kernels
from archbench.archs.sizing import _width_divisor
from archbench.config import arch_schema

VOCAB = 29
SAME = {"rtol": 0.0, "atol": 1e-12}
REORDERED = {"rtol": 0.0, "atol": 2e-6}
MIXERS = registry.mixer_names()


def tiny_arch(mixers: list[str], n_layers: int = 2, **sections: dict[str, Any]) -> Any:
    """Defaults of every component, the given mixers, no MLPs, the smallest width they accept."""
    arch = OmegaConf.merge(OmegaConf.structured(arch_schema()), {
        "pattern": {"mixers": mixers, "mlps": [registry.NO_MLP]}, "n_layers": n_layers},
        sections)
    arch.d_model = math.lcm(32, _width_divisor(arch))
    return arch


def tiny_model(mixers: list[str], seed: int = 0, **sections: dict[str, Any]) -> LanguageModel:
    torch.manual_seed(seed)
    model = LanguageModel(tiny_arch(mixers, n_layers=max(2, len(mixers)), **sections), VOCAB)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.double().eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def run_pieces(model: LanguageModel, seq: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Logits of `seq` fed through one decoding cache in consecutive pieces."""
    cache = model.init_cache(seq.shape[0], seq.shape[1])
    outs, start = [], 0
    for size in pieces:
        outs.append(model(seq[:, start:start + size], cache))
        start += size
    assert cache.pos == seq.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("mixer", MIXERS)
def test_causal(mixer: str) -> None:
    """Changing token t changes no output before t, and does change later ones."""
    model = tiny_model([mixer])
    seq = tokens(2, 20)
    changed = seq.clone()
    changed[:, 12] = (changed[:, 12] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(seq), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], **SAME)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-6


@pytest.mark.parametrize("mixer", MIXERS)
def test_full_forward_equals_chunked_prefill_and_token_by_token(mixer: str) -> None:
    model = tiny_model([mixer])
    seq = tokens(2, 23)
    with torch.no_grad():
        full = model(seq)
        uneven = run_pieces(model, seq, [5, 1, 9, 2, 6])  # a single step among the chunks
        stepped = run_pieces(model, seq, [1] * 23)
    torch.testing.assert_close(uneven, full, **REORDERED)
    torch.testing.assert_close(stepped, full, **REORDERED)


def test_every_mixer_in_one_pattern_decodes_like_the_full_forward() -> None:
    """Different decoding states side by side (KV buffers next to recurrent states), and layers
    that pass things across depth (a value residual) with other mixers in between."""
    model = tiny_model(list(MIXERS) * 2)
    seq = tokens(2, 13)
    with torch.no_grad():
        full = model(seq)
        torch.testing.assert_close(run_pieces(model, seq, [6, 1, 4, 1, 1]), full, **REORDERED)


@pytest.mark.parametrize("mixer", MIXERS)
def test_right_padding_leaves_real_positions_unchanged(mixer: str) -> None:
    """Batches of unequal sequences are right-padded (perplexity.score_continuations): each row's
    logits at its real positions equal those of the row run alone."""
    model = tiny_model([mixer])
    long, short = tokens(1, 17, seed=2), tokens(1, 9, seed=3)
    padded = torch.cat([long, torch.cat([short, torch.zeros(1, 8, dtype=torch.long)], 1)])
    with torch.no_grad():
        batch = model(padded)
        torch.testing.assert_close(batch[:1], model(long), **REORDERED)
        torch.testing.assert_close(batch[1:, :9], model(short), **REORDERED)


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_state_bytes_analytic_equal_measured(mixer: str, dtype: torch.dtype) -> None:
    """`state_bytes` (no allocation) = the bytes of `init_state`, and still after a prefill."""
    model = tiny_model([mixer])
    context = 24
    for block in model.blocks:
        state = block.mixer.init_state(3, context, torch.device("cpu"), dtype)
        measured = state.nbytes() if state is not None else 0
        assert block.mixer.state_bytes(3, context, dtype) == measured
    if dtype == torch.float64:  # the model's own dtype: prefill and step, then measure again
        cache = model.init_cache(3, context)
        with torch.no_grad():
            model(tokens(3, 10), cache)
            model(tokens(3, 1), cache)
        assert cache.nbytes() == model.cache_bytes(3, context, dtype) > 0


@pytest.mark.parametrize("mixer", MIXERS)
def test_gradients_reach_every_parameter(mixer: str) -> None:
    model = tiny_model([mixer]).train()
    seq = tokens(2, 16)
    ctx = ForwardContext()
    logits = model(seq[:, :-1], ctx=ctx)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten())
    (loss + ctx.aux_loss()).backward()
    dead = [name for name, p in model.named_parameters()
            if p.grad is None or not torch.any(p.grad != 0)]
    assert not dead, f"no gradient reaches {dead}"


@pytest.mark.parametrize("mixer", MIXERS)
def test_kernel_path_is_reported(mixer: str) -> None:
    model = tiny_model([mixer])
    paths = resolve_kernels(model, "cpu")
    assert set(paths) == {mixer, "matmul"}
    built = {block.mixer.kernel_path for block in model.blocks}
    assert all(isinstance(p, str) and p for p in built)
    assert paths[mixer] == ",".join(sorted(built))


@pytest.mark.parametrize("mixer", MIXERS)
def test_cpu_path_is_selectable_and_no_choice_falls_back_silently(mixer: str) -> None:
    """kernels=torch runs on CPU and gives the default's outputs; any other declared choice that
    cannot run on CPU is an error, never the torch path in disguise."""
    comp = registry.get("mixer", mixer)
    assert comp.kernels[:2] == ("auto", "torch"), "every mixer needs auto and a torch path"
    key = comp.config_key
    default = tiny_model([mixer])
    explicit = tiny_model([mixer], **{key: {"kernels": "torch"}})
    explicit.load_state_dict(default.state_dict())
    torch_paths = resolve_kernels(explicit, "cpu")
    seq = tokens(1, 11)
    with torch.no_grad():
        torch.testing.assert_close(explicit(seq), default(seq), **REORDERED)
    for choice in comp.kernels[2:]:
        other = tiny_model([mixer], **{key: {"kernels": choice}})
        try:
            paths = resolve_kernels(other, "cpu")
        except RuntimeError as err:
            assert f"arch.{key}.kernels" in str(err)
        else:
            assert paths[mixer] != torch_paths[mixer], f"{choice} silently ran the torch path"
