"""Mixture of experts (archs/mlp.py MoE): routing, dropless combination, aux losses, accounting.

References are written here independently of the layer: a per-token loop that sends each token
through its own top-k experts, closed forms of the losses on hand-built routings, and parameter
counts by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from archbench.archs.base import ForwardContext
from archbench.archs.mlp import DenseMLP, MoE, _grouped_mm_fn
from archbench.archs.model import LanguageModel, arch_config

D = 32


def make_arch(**moe: object) -> object:
    """A resolved arch for building a lone MoE layer (d=32, expert hidden 64)."""
    cfg = {"n_experts": 4, "top_k": 2, "hidden_mult": 2.0, **moe}
    return arch_config({
        "d_model": D, "n_layers": 2, "pattern": {"mixers": ["attention"], "mlps": ["moe"]},
        "attention": {"head_dim": 16}, "mlp": {"multiple_of": 8, "hidden_mult": 2.0}, "moe": cfg,
    })


def make_moe(seed: int = 0, dtype: torch.dtype = torch.float64, **moe: object) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(make_arch(**moe), 0)
    with torch.no_grad():  # larger router logits than the 0.02 init, so routing is decisive
        layer.router.weight.normal_(std=0.5)
    return layer.to(dtype)


def per_token_reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Each token alone: softmax router, top-k, optional renormalisation, weighted expert sum."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        xt = flat[t]
        probs = torch.softmax(layer.router.weight @ xt, dim=-1)
        top = torch.topk(probs, layer.top_k)
        weights = top.values / top.values.sum() if layer.renormalize else top.values
        for w, e in zip(weights, top.indices.tolist()):
            up = layer.w_up[e] @ xt
            if layer.w_gate is not None:
                h = F.silu(layer.w_gate[e] @ xt) * up
            else:
                h = F.gelu(up, approximate="tanh")
            out[t] += w * (layer.w_down[e] @ h)
    return out.view(x.shape)


def available_paths() -> list[str]:
    paths = ["expert-loop"]
    if _grouped_mm_fn() is not None:
        paths.append("grouped_mm")
    return paths


@pytest.mark.parametrize("path", available_paths())
@pytest.mark.parametrize("expert_kind", ["swiglu", "gelu"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_equals_per_token_reference(path: str, expert_kind: str, renormalize: bool) -> None:
    # grouped_mm runs in fp32/bf16 only; the reference loop is checked in fp64 as well.
    dtype = torch.float32 if path == "grouped_mm" else torch.float64
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    layer = make_moe(expert_kind=expert_kind, renormalize=renormalize, dtype=dtype)
    layer.kernel_path = path
    x = torch.randn(3, 5, D, dtype=dtype)
    torch.testing.assert_close(layer(x), per_token_reference(layer, x), **tol)


@pytest.mark.parametrize("path", available_paths())
def test_dropless_when_every_token_picks_the_same_experts(path: str) -> None:
    """No capacity limit: experts 0 and 1 take all tokens, the idle ones get zero gradient."""
    layer = make_moe(dtype=torch.float32, n_experts=6, top_k=2)
    x = torch.randn(2, 9, D) * 0.1 + 1.0  # every token near the all-ones direction
    with torch.no_grad():
        layer.router.weight.normal_(std=0.01)
        layer.router.weight[:2] += 0.2  # experts 0 and 1 far ahead for every token
    layer.kernel_path = path
    ctx = ForwardContext()
    out = layer(x, ctx=ctx)
    fractions = ctx.stats_by_name()["expert_fraction"]
    torch.testing.assert_close(fractions[0], torch.tensor([0.5, 0.5, 0, 0, 0, 0]))
    torch.testing.assert_close(out, per_token_reference(layer, x), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert layer.w_up.grad[2:].abs().max() == 0
    assert layer.w_up.grad[0].abs().sum() > 0 and layer.w_up.grad[1].abs().sum() > 0


def test_grouped_mm_matches_expert_loop_with_gradients() -> None:
    """The fast path and the reference share parameters: outputs and every gradient agree."""
    if _grouped_mm_fn() is None:
        pytest.skip(f"torch {torch.__version__} has no grouped_mm")
    torch.manual_seed(1)
    layer = MoE(make_arch(n_experts=5, top_k=2), 0)  # fp32, the dtype training uses on CPU
    x = torch.randn(4, 9, D, requires_grad=True)
    grads = {}
    for path in ("expert-loop", "grouped_mm"):
        layer.kernel_path = path
        layer.zero_grad()
        x.grad = None
        ctx = ForwardContext()
        out = layer(x, ctx=ctx)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        loss = loss + ctx.aux_loss()
        loss.backward()
        grads[path] = {"out": out.detach(), "x": x.grad.clone()}
        grads[path].update({n: p.grad.clone() for n, p in layer.named_parameters()})
    assert set(grads["grouped_mm"]) == {"out", "x", "router.weight", "w_gate", "w_up", "w_down"}
    for name, ref in grads["expert-loop"].items():
        torch.testing.assert_close(grads["grouped_mm"][name], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("expert_kind", ["swiglu", "gelu"])
def test_one_expert_top1_is_the_dense_mlp(expert_kind: str) -> None:
    arch = make_arch(n_experts=1, top_k=1, expert_kind=expert_kind)
    torch.manual_seed(2)
    moe = MoE(arch, 0)
    dense = DenseMLP(arch, 0, kind=expert_kind, hidden_mult=2.0)
    with torch.no_grad():
        if expert_kind == "swiglu":
            moe.w_gate.copy_(dense.gate_proj.weight[None])
        moe.w_up.copy_(dense.up_proj.weight[None])
        moe.w_down.copy_(dense.down_proj.weight[None])
    x = torch.randn(2, 6, D)
    for path in available_paths():
        moe.kernel_path = path
        torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-6)


def routed_layer(
    probs: list[list[float]], shifts: list[float], top_k: int
) -> tuple[MoE, torch.Tensor]:
    """A layer whose router gives token t the logits log(probs[t]) + shifts[t] exactly."""
    n_tokens, n_experts = len(probs), len(probs[0])
    arch = make_arch(n_experts=n_experts, top_k=top_k, aux_loss_coef=1.0, z_loss_coef=1.0,
                     kernels="torch")
    layer = MoE(arch, 0).double()
    logits = torch.log(torch.tensor(probs, dtype=torch.float64)) + torch.tensor(shifts)[:, None]
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :n_tokens] = logits.t()  # x_t is the t-th unit vector
    x = torch.eye(D, dtype=torch.float64)[:n_tokens].view(1, n_tokens, D)
    return layer, x


def test_aux_losses_closed_form_on_hand_built_routing() -> None:
    probs = [[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.35, 0.05]]
    layer, x = routed_layer(probs, shifts=[1.0, -2.0, 0.5], top_k=2)
    # Top-2 choices: {0, 1}, {3, 2}, {0, 2} -> counts (2, 1, 2, 1) of 6 assignments.
    fractions = [2 / 6, 1 / 6, 2 / 6, 1 / 6]
    mean_prob = [(0.4 + 0.1 + 0.5) / 3, (0.3 + 0.2 + 0.1) / 3, (0.2 + 0.3 + 0.35) / 3,
                 (0.1 + 0.4 + 0.05) / 3]
    balance = 4 * sum(f * p for f, p in zip(fractions, mean_prob))
    z_loss = (1.0**2 + 2.0**2 + 0.5**2) / 3  # logsumexp(log p + c) = c since sum p = 1
    ctx = ForwardContext()
    layer(x, ctx=ctx)
    assert ctx.aux_loss_terms()["moe_load_balance"].item() == pytest.approx(balance, rel=1e-12)
    assert ctx.aux_loss_terms()["moe_z_loss"].item() == pytest.approx(z_loss, rel=1e-12)
    torch.testing.assert_close(ctx.stats_by_name()["expert_fraction"][0], torch.tensor(fractions))
    # A second layer in the same forward adds to the same terms, and records its own fractions.
    twin = MoE(layer_arch(layer), 1).double()
    twin.load_state_dict(layer.state_dict())
    twin(x, ctx=ctx)
    assert ctx.aux_loss_terms()["moe_load_balance"].item() == pytest.approx(2 * balance, rel=1e-12)
    assert ctx.aux_loss_terms()["moe_z_loss"].item() == pytest.approx(2 * z_loss, rel=1e-12)
    fractions_now = ctx.stats_by_name()["expert_fraction"]
    assert len(fractions_now) == 2 and not fractions_now[1].requires_grad
    # The same layer again in the same forward (activation checkpointing's recompute) replaces its
    # own entries: the totals do not change.
    layer(x, ctx=ctx)
    assert ctx.aux_loss_terms()["moe_load_balance"].item() == pytest.approx(2 * balance, rel=1e-12)
    assert len(ctx.stats_by_name()["expert_fraction"]) == 2


def layer_arch(layer: MoE) -> object:
    return make_arch(n_experts=layer.n_experts, top_k=layer.top_k, aux_loss_coef=1.0,
                     z_loss_coef=1.0, kernels="torch")


def test_aux_losses_are_scaled_by_their_coefficients() -> None:
    layer = make_moe(aux_loss_coef=0.25, z_loss_coef=0.5, kernels="torch")
    ref = make_moe(aux_loss_coef=1.0, z_loss_coef=1.0, kernels="torch")
    x = torch.randn(2, 7, D, dtype=torch.float64)
    ctx, ctx_ref = ForwardContext(), ForwardContext()
    layer(x, ctx=ctx)
    ref(x, ctx=ctx_ref)
    for key, coef in (("moe_load_balance", 0.25), ("moe_z_loss", 0.5)):
        assert ctx_ref.aux_loss_terms()[key].item() > 0
        expected = coef * ctx_ref.aux_loss_terms()[key].item()
        assert ctx.aux_loss_terms()[key].item() == pytest.approx(expected)


@pytest.mark.parametrize("n_experts,top_k", [(4, 1), (4, 2), (16, 2)])
def test_balance_loss_is_one_for_uniform_routing_and_larger_when_collapsed(
    n_experts: int, top_k: int
) -> None:
    uniform = [[1.0 / n_experts] * n_experts for _ in range(n_experts)]
    layer, x = routed_layer(uniform, shifts=[0.0] * n_experts, top_k=top_k)
    ctx = ForwardContext()
    layer(x, ctx=ctx)
    assert ctx.aux_loss_terms()["moe_load_balance"].item() == pytest.approx(1.0, rel=1e-12)
    assert ctx.aux_loss_terms()["moe_z_loss"].item() == pytest.approx(0.0, abs=1e-12)
    # Collapse: every token puts 0.9 / top_k on the same top_k experts -> E * 0.9 / top_k.
    rest = 0.1 / (n_experts - top_k)
    collapsed = [[0.9 / top_k] * top_k + [rest] * (n_experts - top_k) for _ in range(n_experts)]
    layer, x = routed_layer(collapsed, shifts=[0.0] * n_experts, top_k=top_k)
    ctx = ForwardContext()
    layer(x, ctx=ctx)
    expected = n_experts * 0.9 / top_k
    assert ctx.aux_loss_terms()["moe_load_balance"].item() == pytest.approx(expected, rel=1e-9)
    assert expected > 1.5


def test_balance_loss_gradient_spreads_a_collapsed_router() -> None:
    """Minimising only the balance loss moves routing from one favourite towards uniform."""
    torch.manual_seed(3)
    layer = MoE(make_arch(n_experts=4, top_k=1, aux_loss_coef=1.0, z_loss_coef=0.0), 0)
    common = torch.randn(D)
    x = torch.randn(256, D) * 0.3 + common
    with torch.no_grad():
        layer.router.weight.normal_(std=0.05)
        layer.router.weight[0] += common / common.norm()  # expert 0 wins for nearly every token
    opt = torch.optim.Adam(layer.router.parameters(), lr=0.05)

    def step() -> tuple[float, float]:
        ctx = ForwardContext()
        layer(x[None], ctx=ctx)
        loss = ctx.aux_loss_terms()["moe_load_balance"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item(), ctx.stats_by_name()["expert_fraction"][0].max().item()

    first_loss, first_max = step()
    for _ in range(60):
        last_loss, last_max = step()
    assert first_max > 0.9 and first_loss > 3.0
    assert last_max < 0.5 and last_loss < 1.5


def test_kernel_choice_is_explicit() -> None:
    assert MoE(make_arch(kernels="torch"), 0).kernel_path == "expert-loop"
    if _grouped_mm_fn() is not None:
        assert MoE(make_arch(kernels="auto"), 0).kernel_path == "grouped_mm"
        assert MoE(make_arch(kernels="grouped_mm"), 0).resolve_kernels(
            torch.device("cpu")) == "grouped_mm"
    # d_model = 36 is not a multiple of 8: auto records the loop, an explicit request fails.
    odd = {"d_model": 36, "n_layers": 1, "attention": {"head_dim": 12},
           "pattern": {"mixers": ["attention"], "mlps": ["moe"]},
           "moe": {"n_experts": 2, "top_k": 1, "kernels": "auto"}}
    assert MoE(arch_config(odd), 0).kernel_path == "expert-loop"
    odd["moe"]["kernels"] = "grouped_mm"
    with pytest.raises(RuntimeError, match="arch.moe.kernels"):
        MoE(arch_config(odd), 0)
    odd["moe"]["kernels"] = "cuda"
    with pytest.raises(ValueError, match="arch.moe.kernels"):
        arch_config(odd)


def test_active_parameters_and_flops_by_hand() -> None:
    d, vocab, hidden, experts, k = 32, 50, 64, 4, 1
    model = LanguageModel({
        "d_model": d, "n_layers": 2, "attention": {"head_dim": 16},
        "pattern": {"mixers": ["attention"], "mlps": ["dense", "moe"]},
        "mlp": {"hidden_mult": 2.0, "multiple_of": 8},
        "moe": {"n_experts": experts, "top_k": k, "hidden_mult": 2.0},
    }, vocab)
    attention = 4 * d * d
    norms = 2 * d  # mixer_norm and mlp_norm of one block
    expert = 3 * d * hidden  # gate, up, down
    layer0 = norms + attention + expert  # dense SwiGLU
    layer1 = norms + attention + d * experts + experts * expert  # router + experts
    non_embedding = layer0 + layer1 + d  # + final norm
    inactive = (experts - k) * expert
    counts = model.param_counts()
    assert counts["embedding"] == vocab * d  # tied head
    assert counts["non_embedding"] == non_embedding
    assert counts["total"] == non_embedding + vocab * d
    assert counts["active_non_embedding"] == non_embedding - inactive
    assert counts["active"] == non_embedding - inactive + vocab * d
    assert model.blocks[1].mlp.inactive_params() == round((1 - k / experts) * experts * expert)
    context = 128
    flops = model.flops_per_token(context)["forward"]
    assert flops == 2 * (non_embedding - inactive + d * vocab) + 2 * 4 * d * context


def test_moe_layer_in_a_model_reports_every_layer() -> None:
    torch.manual_seed(4)
    model = LanguageModel({
        "d_model": D, "n_layers": 4, "attention": {"head_dim": 16},
        "pattern": {"mixers": ["attention"], "mlps": ["moe", "dense"]},
        "moe": {"n_experts": 4, "top_k": 2},
    }, 40)
    ctx = ForwardContext()
    model(torch.randint(0, 40, (2, 8)), ctx=ctx)
    assert len(ctx.stats_by_name()["expert_fraction"]) == 2  # layers 0 and 2
    for fractions in ctx.stats_by_name()["expert_fraction"]:
        assert fractions.shape == (4,) and math.isclose(fractions.sum().item(), 1.0, rel_tol=1e-6)
    balance = ctx.aux_loss_terms()["moe_load_balance"]
    assert balance.requires_grad and 0 < balance.item() <= 2 * 0.01 * 4  # each layer <= E


def test_activation_checkpointing_reports_each_layer_once() -> None:
    """The recompute in backward must not double the logged aux losses or the fractions."""
    torch.manual_seed(7)
    model = LanguageModel({
        "d_model": D, "n_layers": 2, "attention": {"head_dim": 16},
        "pattern": {"mixers": ["attention"], "mlps": ["moe"]},
        "moe": {"n_experts": 4, "top_k": 2},
    }, 40).train()
    tokens = torch.randint(0, 40, (2, 8))
    results = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        model.zero_grad()
        ctx = ForwardContext()
        logits = model(tokens, ctx=ctx)
        (logits.square().mean() + ctx.aux_loss()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((ctx, grads))
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    n_ckpt = len(ckpt.stats_by_name()["expert_fraction"])
    assert n_ckpt == len(plain.stats_by_name()["expert_fraction"]) == 2
    for key in ("moe_load_balance", "moe_z_loss"):
        expected = plain.aux_loss_terms()[key].item()
        assert ckpt.aux_loss_terms()[key].item() == pytest.approx(expected)
    torch.testing.assert_close(ckpt_grads, plain_grads)


def test_bf16_autocast_runs_both_paths_alike() -> None:
    """Training on CPU may autocast to bf16: the grouped path casts its operands itself."""
    if _grouped_mm_fn() is None:
        pytest.skip(f"torch {torch.__version__} has no grouped_mm")
    torch.manual_seed(8)
    layer = MoE(make_arch(), 0)
    x = torch.randn(2, 8, D)
    with torch.no_grad():
        layer.kernel_path = "expert-loop"
        full_precision = layer(x)
        results = {}
        for path in ("grouped_mm", "expert-loop"):
            layer.kernel_path = path
            with torch.autocast("cpu", dtype=torch.bfloat16):
                results[path] = layer(x)
    torch.testing.assert_close(results["grouped_mm"], results["expert-loop"], rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(results["grouped_mm"], full_precision, rtol=5e-2, atol=5e-4)
    assert not torch.equal(results["grouped_mm"], full_precision)  # bf16 did the matmuls
