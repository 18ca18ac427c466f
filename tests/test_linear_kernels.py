"""The projections' GEMM paths (archs/kernels/linear.py): oneDNN against aten on the same weights,
the rule that keeps small products on aten, and the setting's errors.

Tolerances: fp32; the two libraries sum in different orders. Outputs of 256-term products of
magnitude ~1: 1e-5 absolute; weight gradients summed over 256 rows have magnitude ~16, so 1e-4
absolute there (seen: 1.6e-5).
"""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from archbench.archs.base import ForwardContext
from archbench.archs.kernels import linear as linear_kernels
from archbench.archs.kernels.linear import MIN_MACS, PathLinear, linear, onednn_linear
from archbench.archs.model import LanguageModel, resolve_kernels
from archbench.config import ConfigError, arch_schema
from archbench.train.step import lm_loss

pytestmark = pytest.mark.skipif(linear_kernels.onednn_missing(torch.device("cpu")) is not None,
                                reason="this torch build has no oneDNN GEMM")

REORDERED = {"rtol": 1e-4, "atol": 1e-5}
VOCAB = 97


def _model(matmul: str, mixers: tuple[str, ...] = ("attention", "mamba")) -> LanguageModel:
    arch = OmegaConf.merge(OmegaConf.structured(arch_schema()), {
        "pattern": {"mixers": list(mixers), "mlps": ["dense"]}, "n_layers": len(mixers),
        "d_model": 128, "matmul": matmul})
    torch.manual_seed(0)
    return LanguageModel(arch, VOCAB)


@pytest.mark.parametrize("case", ["2d+bias", "3d", "strided input", "transposed weight"])
def test_onednn_product_matches_aten_forward_and_gradients(case: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 256, generator=gen)
    weight = torch.randn(384, 256, generator=gen) / 16
    bias = torch.randn(384, generator=gen) if case == "2d+bias" else None
    if case == "2d+bias":
        x = x.flatten(0, 1)
    elif case == "strided input":
        x = x.transpose(0, 1)  # (64, 4, 256), not contiguous
    elif case == "transposed weight":
        weight = torch.randn(256, 384, generator=gen).t() / 16
    given = (x, weight) if bias is None else (x, weight, bias)
    leaves = [t.clone().requires_grad_() for t in given]
    ref = [t.clone().detach().requires_grad_() for t in leaves]
    out = onednn_linear(leaves[0], leaves[1], leaves[2] if bias is not None else None)
    expected = torch.nn.functional.linear(*ref)
    torch.testing.assert_close(out, expected, **REORDERED)
    probe = torch.randn(out.shape, generator=gen)
    (out * probe).sum().backward()
    (expected * probe).sum().backward()
    for got, want in zip(leaves, ref, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)


def test_operator_registration_is_consistent() -> None:
    """The compiler relies on the shape rule and the autograd formula matching the kernel."""
    x = torch.randn(32, 128, requires_grad=True)
    weight = torch.randn(64, 128, requires_grad=True)
    bias = torch.randn(64, requires_grad=True)
    torch.library.opcheck(onednn_linear, (x, weight, bias))
    torch.library.opcheck(onednn_linear, (x, weight, None))


def test_small_products_and_autocast_stay_on_aten(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []

    def spy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return torch.nn.functional.linear(x, weight, bias)

    monkeypatch.setattr(linear_kernels, "onednn_linear", spy)
    weight = torch.randn(256, 256)
    big_rows = MIN_MACS // (256 * 256)
    linear(torch.randn(big_rows - 1, 256), weight, None, "onednn")
    assert calls == [], "a product under MIN_MACS went to oneDNN"
    linear(torch.randn(big_rows, 256), weight, None, "onednn")
    assert calls == [(big_rows, 256)]
    linear(torch.randn(big_rows, 256), weight, None, "aten")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear(torch.randn(big_rows, 256), weight, None, "onednn")
    linear(torch.randn(big_rows, 256, dtype=torch.float64), weight.double(), None, "onednn")
    assert len(calls) == 1, "aten, autocast or fp64 took the oneDNN path"


def test_model_on_onednn_matches_aten_path_and_says_so() -> None:
    aten = _model("aten")
    onednn = copy.deepcopy(_model("onednn"))
    onednn.load_state_dict(aten.state_dict())
    assert resolve_kernels(aten, "cpu")["matmul"] == "aten"
    assert resolve_kernels(onednn, "cpu")["matmul"] == "onednn"
    projections = [m for m in onednn.modules() if isinstance(m, torch.nn.Linear)]
    assert projections and all(isinstance(m, PathLinear) and m.matmul_path == "onednn"
                               for m in projections)
    assert onednn.state_dict().keys() == aten.state_dict().keys()
    seq = torch.randint(0, VOCAB, (2, 65), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (aten, onednn):
        loss = lm_loss(model(seq[:, :-1], ctx=ForwardContext()), seq[:, 1:])
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], **REORDERED)
    grads = dict(aten.named_parameters())
    for name, param in onednn.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_auto_takes_onednn_on_cpu_and_aten_elsewhere() -> None:
    assert resolve_kernels(_model("auto", ("attention",)), "cpu")["matmul"] == "onednn"
    assert resolve_kernels(_model("auto", ("attention",)), "cuda")["matmul"] == "aten"


def test_onednn_where_it_cannot_run_is_an_error() -> None:
    with pytest.raises(RuntimeError, match=r"arch.matmul='onednn' cannot run: .*CPU path"):
        resolve_kernels(_model("onednn", ("attention",)), "cuda")


def test_unknown_matmul_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"arch.matmul='mkl' is not allowed.*onednn.*aten"):
        _model("mkl")


def test_compiled_training_keeps_the_operator_without_breaks_and_matches_eager() -> None:
    """AOTAutograd traces the operator's shape rule and gradients (aot_eager: no code generation,
    the inductor run is the benchmark's). Attention only: aot_eager fails on Mamba's softplus
    gradient with or without this operator (torch 2.13; a stride the fake tensor mispredicts)."""
    model = _model("onednn", ("attention",))
    resolve_kernels(model, "cpu")
    seq = torch.randint(0, VOCAB, (2, 65), generator=torch.Generator().manual_seed(2))
    explained = torch._dynamo.explain(model)(seq[:, :-1])
    assert explained.graph_break_count == 0, explained.break_reasons
    assert "onednn_linear" in explained.graphs[0].code, "the graph lost the oneDNN operator"
    compiled = copy.deepcopy(model)
    forward = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    for fn in (model, forward):
        lm_loss(fn(seq[:, :-1]), seq[:, 1:]).backward()
    grads = dict(model.named_parameters())
    for name, param in compiled.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=0.0, atol=1e-6)


def test_frozen_graphs_leave_the_projections_to_inductor() -> None:
    """Traced for a frozen decode step (inductor's `freezing` flag, no grad), a product above
    MIN_MACS is F.linear, which inductor autotunes on a prepacked weight; traced without the flag
    (compiled prefill, training) and run eagerly it stays on the oneDNN operator."""
    weight = torch.randn(1024, 256)
    x = torch.randn(8, 256)
    assert x.numel() * weight.shape[0] >= MIN_MACS

    def product(inputs: torch.Tensor) -> torch.Tensor:
        return linear(inputs, weight, None, "onednn")

    codes = {}
    for frozen in (False, True):
        torch._dynamo.reset()
        with torch.no_grad(), torch._inductor.config.patch(freezing=frozen):
            explained = torch._dynamo.explain(product)(x)
        codes[frozen] = explained.graphs[0].code
    torch._dynamo.reset()
    assert "onednn_linear" in codes[False] and "onednn_linear" not in codes[True]
    assert "linear" in codes[True]
    assert not linear_kernels.tracing_frozen_weights()  # eagerly, outside the flag
