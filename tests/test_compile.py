"""torch.compile for every registered mixer: no graph breaks in the decode step or the training
forward, the stated recompilation policy (archs/compiling.py), and compiled = eager numerics.

Graph breaks are a property of dynamo's tracing, not of the backend: the per-mixer checks trace
with `torch._dynamo.explain` (no code generation, a few seconds per mixer on CPU). Inductor's code
generation costs 10-60 s per graph on a small CPU, so the default run compiles one model that
holds every registered mixer in its pattern (two graphs: its decode step and its forward); the
per-mixer inductor comparison is marked slow.

Tolerances (fp32 models, logits of magnitude ~1): compiled against eager at 1e-4 absolute;
inductor fuses and reorders fp32 reductions (seen: ~1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from archbench.archs import registry
from archbench.archs.base import ForwardContext
from archbench.archs.compiling import graph_report
from archbench.archs.model import LanguageModel, resolve_kernels
from archbench.archs.sizing import _width_divisor
from archbench.config import arch_schema
from archbench.train.step import lm_loss

VOCAB = 29
COMPILED = {"rtol": 0.0, "atol": 1e-4}
MIXERS = registry.mixer_names()


def tiny_model(mixers: list[str], mlp: str = registry.NO_MLP, seed: int = 0) -> LanguageModel:
    """Defaults of every component at the smallest width the mixers accept, fp32, parameters
    perturbed (zero-initialised projections would make every output constant)."""
    arch = OmegaConf.merge(OmegaConf.structured(arch_schema()), {
        "pattern": {"mixers": mixers, "mlps": [mlp]}, "n_layers": max(2, len(mixers))})
    arch.d_model = math.lcm(32, _width_divisor(arch))
    torch.manual_seed(seed)
    model = LanguageModel(arch, VOCAB)
    resolve_kernels(model, "cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def prefilled(model: LanguageModel, batch: int = 2, prompt: int = 7, room: int = 8) -> Any:
    cache = model.init_cache(batch, prompt + room)
    with torch.no_grad():
        model(tokens(batch, prompt), cache)
    return cache


def training_loss(model: LanguageModel) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The trainer's loss of `model` (LM loss + the sublayers' auxiliary losses)."""
    def loss_of(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ctx = ForwardContext()
        return lm_loss(model(inputs, ctx=ctx), targets) + ctx.aux_loss()

    return loss_of


class CountingBackend:
    """A dynamo backend that runs the captured graph as is and counts compilations."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs += 1
        return gm.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mixer", MIXERS)
def test_every_mixer_has_a_static_decode_step(mixer: str) -> None:
    """A mixer that keeps a state must implement Sublayer.decode_step (tensor position, state
    updated in place); without it the model decodes through forward and cannot be compiled."""
    cls = registry.get("mixer", mixer).cls
    assert cls.has_static_decode(), f"{cls.__name__} has no decode_step (archs/base.py)"


@pytest.mark.parametrize("mixer", MIXERS)
def test_decode_step_is_one_graph_without_breaks(mixer: str) -> None:
    model = tiny_model([mixer], mlp="dense").eval()
    cache = prefilled(model)
    with torch.no_grad():
        report = graph_report(model.decode_body, tokens(2, 1)[:, 0], cache.states,
                              cache.position_tensor())
    assert report.breaks == 0 and report.graphs == 1, report.reasons


@pytest.mark.parametrize("mixer", MIXERS)
def test_training_forward_and_loss_is_one_graph_without_breaks(mixer: str) -> None:
    model = tiny_model([mixer], mlp="dense").train()
    seq = tokens(2, 33)
    report = graph_report(training_loss(model), seq[:, :-1], seq[:, 1:])
    assert report.breaks == 0 and report.graphs == 1, report.reasons


def test_moe_compiles_without_breaks_and_matches_eager_with_gradients() -> None:
    """The MoE MLP (Jamba's) on its CPU grouped-GEMM path: one graph for training and for the
    decode step (expert counts by scatter-add, not bincount), and AOTAutograd's trace (fake
    tensors: torch's own grouped_mm shape rule accepts bf16 only) gives eager's loss and
    gradients."""
    model = tiny_model(["attention"], mlp="moe").train()
    assert model.kernel_paths()["mlp:moe"] == "grouped_mm"
    seq = tokens(4, 33)
    loss_of = training_loss(model)
    report = graph_report(loss_of, seq[:, :-1], seq[:, 1:])
    assert report.breaks == 0 and report.graphs == 1, report.reasons
    eager = loss_of(seq[:, :-1], seq[:, 1:])
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    traced = torch.compile(loss_of, backend="aot_eager", dynamic=False)(seq[:, :-1], seq[:, 1:])
    traced_grads = torch.autograd.grad(traced, list(model.parameters()))
    torch.testing.assert_close(traced, eager, rtol=0.0, atol=1e-6)
    for a, b in zip(traced_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-6)
    model.eval()
    cache = prefilled(model)
    with torch.no_grad():
        report = graph_report(model.decode_body, tokens(2, 1)[:, 0], cache.states,
                              cache.position_tensor())
    assert report.breaks == 0 and report.graphs == 1, report.reasons


def test_decode_compiles_once_for_every_position_and_every_cache_of_that_shape() -> None:
    """Policy: one graph per (batch, cache length, dtype); positions are tensors, so stepping
    and a fresh cache of the same shape reuse it; another batch size compiles one more."""
    model = tiny_model(list(MIXERS), mlp="dense").eval()
    backend = CountingBackend()
    model._compiled_step = torch.compile(model.decode_body, backend=backend, dynamic=False)
    with torch.no_grad():
        for batch, expected in ((2, 1), (2, 1), (3, 2)):
            cache = prefilled(model, batch=batch)
            for i in range(5):
                model.decode_step(tokens(batch, 5)[:, i], cache)
            assert backend.graphs == expected


def test_training_recompiles_once_per_new_length_and_never_per_step() -> None:
    """Policy: static shapes; repeated steps reuse the graph, a second length compiles one more
    graph once, and going back to the first length reuses the first."""
    model = tiny_model(list(MIXERS), mlp="dense").train()
    backend = CountingBackend()
    forward = torch.compile(model, backend=backend, dynamic=False)
    for length, expected in ((16, 1), (16, 1), (16, 1), (24, 2), (24, 2), (16, 2)):
        ctx = ForwardContext()
        seq = tokens(2, length + 1)
        (lm_loss(forward(seq[:, :-1], ctx=ctx), seq[:, 1:]) + ctx.aux_loss()).backward()
        assert backend.graphs == expected, f"length {length}: {backend.graphs} graphs"


def _compiled_matches_eager(mixers: list[str], autotune_gemms: bool = True) -> None:
    model = tiny_model(mixers, mlp="dense").eval()
    seq = tokens(2, 21)
    eager_cache, compiled_cache = prefilled(model), prefilled(model)
    with torch.no_grad():
        eager_full = model(seq)
        eager_steps = [model.decode_step(seq[:, i], eager_cache) for i in range(4)]
        compiled_full = torch.compile(model, dynamic=False)(seq)
        model.compile_decoding(autotune_gemms=autotune_gemms)
        compiled_steps = [model.decode_step(seq[:, i], compiled_cache) for i in range(4)]
    torch.testing.assert_close(compiled_full, eager_full, **COMPILED)
    torch.testing.assert_close(torch.stack(compiled_steps), torch.stack(eager_steps), **COMPILED)
    for eager_pair, compiled_pair in zip(eager_cache.states, compiled_cache.states, strict=True):
        for eager_state, compiled_state in zip(eager_pair, compiled_pair, strict=True):
            if eager_state is None:
                continue
            for a, b in zip(eager_state.tensors(), compiled_state.tensors(), strict=True):
                torch.testing.assert_close(b, a, **COMPILED)
    assert compiled_cache.pos == eager_cache.pos


def test_inductor_matches_eager_with_every_mixer_in_one_model() -> None:
    """Full forward and four decode steps (logits and final states), compiled by inductor."""
    _compiled_matches_eager(list(MIXERS))


def decoded(model: LanguageModel, seq: torch.Tensor) -> torch.Tensor:
    """Logits of decoding `seq` token by token from a fresh prefilled cache."""
    cache = prefilled(model)
    return torch.stack([model.decode_step(seq[:, i], cache) for i in range(seq.shape[1])])


def eager_decoded(model: LanguageModel, seq: torch.Tensor) -> torch.Tensor:
    """`decoded` with the model's compiled step set aside."""
    compiled, model._compiled_step = model._compiled_step, None
    try:
        return decoded(model, seq)
    finally:
        model._compiled_step = compiled


def test_frozen_decode_steps_of_two_models_of_one_architecture_keep_their_own_weights() -> None:
    """A frozen graph holds its weights as constants and dynamo guards them by identity, not
    value: each model compiles its own copy of the step (archs/compiling.py), so the second
    model of the same layers never decodes with the first one's weights."""
    first, second = (tiny_model(["attention", "mamba"], mlp="dense", seed=s).eval()
                     for s in (0, 1))
    seq = tokens(2, 3)
    with torch.no_grad():
        eager = [decoded(m, seq) for m in (first, second)]
        for model in (first, second):
            model.compile_decoding(autotune_gemms=False)  # GEMM choice: tested above
        compiled = [decoded(m, seq) for m in (first, second)]
    assert first.decode_frozen and second.decode_frozen  # the CPU default
    assert float((eager[0] - eager[1]).abs().max()) > 1e-2  # the two models are told apart
    for eager_logits, compiled_logits in zip(eager, compiled, strict=True):
        torch.testing.assert_close(compiled_logits, eager_logits, **COMPILED)


def test_frozen_decode_step_follows_the_weights_after_training_and_loading() -> None:
    """An optimizer step, then load_state_dict of the old weights: the next cache's first step
    compiles again and decodes with the weights the model holds now, as eager decoding does."""
    model = tiny_model(["attention", "mamba"], mlp="dense").eval()
    seq = tokens(2, 3)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = decoded(model, seq)
        model.compile_decoding(autotune_gemms=False)
        torch.testing.assert_close(decoded(model, seq), before, **COMPILED)
    batch = tokens(2, 9, seed=5)
    lm_loss(model(batch[:, :-1]), batch[:, 1:]).backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    with torch.no_grad():
        trained, trained_eager = decoded(model, seq), eager_decoded(model, seq)
        assert float((trained_eager - before).abs().max()) > 1e-2  # the step moved the logits
        torch.testing.assert_close(trained, trained_eager, **COMPILED)
        model.load_state_dict(saved)
        torch.testing.assert_close(decoded(model, seq), before, **COMPILED)


def test_decoding_can_be_compiled_without_freezing() -> None:
    """compile_decoding(frozen=False) reads the weights as graph inputs: an in-place change is
    decoded at once by the same compiled step, with no recompilation."""
    model = tiny_model(["attention", "mamba"], mlp="dense").eval()
    seq = tokens(2, 3)
    with torch.no_grad():
        model.compile_decoding(frozen=False)
        step = model._compiled_step
        torch.testing.assert_close(decoded(model, seq), eager_decoded(model, seq), **COMPILED)
        model.lm_head.weight.mul_(2.0)
        torch.testing.assert_close(decoded(model, seq), eager_decoded(model, seq), **COMPILED)
    assert not model.decode_frozen and model._compiled_step is step


@pytest.mark.slow
@pytest.mark.parametrize("mixer", MIXERS)
def test_inductor_matches_eager_per_mixer(mixer: str) -> None:
    """Per mixer, the decode step frozen without the GEMM autotuning (seconds per shape; the
    test above runs it for every mixer at once)."""
    _compiled_matches_eager([mixer], autotune_gemms=False)


class GraphKeeper(CountingBackend):
    """A CountingBackend that also keeps the code of every captured graph."""

    def __init__(self) -> None:
        super().__init__()
        self.code: list[str] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.code.append(gm.code)
        return super().__call__(gm, example_inputs)


@pytest.mark.parametrize("cache_len", [16, 300])
def test_compiled_attention_step_reads_rope_rows_from_the_table(cache_len: int) -> None:
    """The traced step computes no sines or cosines (inductor would inline them into its score
    loop, once per cached position): it reads the rows of the shared table, and gives the eager
    logits; one table serves every layer."""
    model = tiny_model(["attention", "attention"], mlp="dense").eval()
    seq = tokens(2, 9)
    eager_cache, traced_cache = model.init_cache(2, cache_len), model.init_cache(2, cache_len)
    backend = GraphKeeper()
    with torch.no_grad():
        model(seq[:, :5], eager_cache)
        model(seq[:, :5], traced_cache)
        eager = [model.decode_step(seq[:, i], eager_cache) for i in range(5, 9)]
        model._compiled_step = torch.compile(model.decode_body, backend=backend, dynamic=False)
        traced = [model.decode_step(seq[:, i], traced_cache) for i in range(5, 9)]
    assert backend.graphs == 1
    assert not any(op in backend.code[0] for op in ("torch.cos", "torch.sin", ".cos()", ".sin()"))
    torch.testing.assert_close(torch.stack(traced), torch.stack(eager), rtol=0.0, atol=1e-5)
    first, second = (block.mixer for block in model.blocks)
    assert first.rope_cos is second.rope_cos and first.rope_cos.shape[0] >= cache_len


def test_rope_table_rows_equal_the_per_position_rows() -> None:
    """A decoding row from the table is bit for bit the row the full forward computes."""
    from archbench.archs.attention import rope_rows, rope_table, rope_tables

    cos, sin = rope_table(1000, 64, 10000.0, torch.device("cpu"))
    assert cos.shape == (1000, 32)  # half a head: the rows repeat their halves
    at = torch.tensor([0, 1, 517, 999])
    want_cos, want_sin = rope_tables(at, 64, 10000.0, torch.float32)
    assert torch.equal(rope_rows(cos, at, torch.float32), want_cos)
    assert torch.equal(rope_rows(sin, at, torch.float32), want_sin)


def test_grouped_query_decode_step_equals_the_full_forward() -> None:
    """Grouped-query heads attend as rows of their KV head in the step (no repeated cache)."""
    model = tiny_model(["attention"], mlp="dense")
    grouped = LanguageModel(OmegaConf.merge(model.arch, {"attention": {
        "head_dim": 16, "n_kv_heads": 1}}), VOCAB).eval()
    seq = tokens(2, 13)
    cache = grouped.init_cache(2, 16)
    with torch.no_grad():
        full = grouped(seq)
        grouped(seq[:, :5], cache)
        steps = torch.stack([grouped.decode_step(seq[:, i], cache) for i in range(5, 13)], 1)
    torch.testing.assert_close(steps, full[:, 5:], rtol=0.0, atol=1e-5)
    assert cache.pos == 13 and cache.states[0][0].length == 13


def test_selective_scan_operators_keep_their_registered_shapes_and_gradients() -> None:
    """Mamba-1's scan is a pair of custom operators: their fake (shape-only) versions must
    match the real outputs in shape and layout, or compiled training fails in the backward."""
    from archbench.archs.kernels import selective_scan

    gen = torch.Generator().manual_seed(0)
    length, batch, dim, n_state = 11, 2, 6, 4

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    dt = torch.nn.functional.softplus(rand(length, batch, dim)).requires_grad_()
    u, B, C = (rand(*s).requires_grad_() for s in ((length, batch, dim), (length, batch, n_state),
                                                    (length, batch, n_state)))
    A = (-torch.rand(dim, n_state, generator=gen, dtype=torch.float64) - 0.5).requires_grad_()
    h0 = rand(batch, n_state, dim).requires_grad_()
    args = (dt, u, A, B, C, h0, 4, True)
    torch.library.opcheck(selective_scan._scan_fwd_op, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
    y, last, starts = selective_scan._scan_fwd_op(*args)
    gy = rand(length, batch, dim)
    grads = selective_scan._scan_bwd_op(gy, dt.detach(), u.detach(), A.detach(), B.detach(),
                                        C.detach(), starts.detach(), 4)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (gy, dt, u, A, B, C, starts)]
        shapes = selective_scan._scan_bwd_op(*fakes, 4)
    for real, fake in zip(grads, shapes, strict=True):
        assert real.shape == fake.shape and real.stride() == fake.stride()
    torch.autograd.gradcheck(lambda *t: selective_scan._scan_fwd_op(*t, 4, True)[0],
                             (dt, u, A, B, C, h0))
