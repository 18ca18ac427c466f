"""CPU throughput of the MoE layer: grouped path vs expert loop vs a per-token loop vs a dense MLP
with the same active parameters. A benchmark, not a test: it prints, it asserts nothing.

    .venv/bin/python scripts/bench_moe_cpu.py --d-model 256 --tokens 2048 --threads 2

Protocol (docs/design.md 3): warm-up iterations, then at least `--repeats` timed rounds and at
least `--min-seconds`, the cases interleaved round by round (shared cores change load); the median
and the min..max spread are quoted. The dense baseline is a
SwiGLU of hidden top_k * expert_hidden, i.e. the expert weights a token touches; the router
(d * E weights) is the only active weight the dense MLP lacks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from archbench.archs.base import ForwardContext
from archbench.archs.mlp import DenseMLP, MoE, _grouped_mm_fn, route_top_k
from archbench.archs.model import arch_config


def per_token_loop(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The naive dispatch: every token alone through each of its top-k experts."""
    flat = x.reshape(-1, x.shape[-1])
    _, weights, experts = route_top_k(layer.router(flat), layer.top_k, layer.renormalize)
    rows = []
    for t in range(flat.shape[0]):
        xt = flat[t : t + 1]
        acc = torch.zeros_like(xt)
        for w, e in zip(weights[t].tolist(), experts[t].tolist()):
            gate = xt @ layer.w_gate[e].t() if layer.w_gate is not None else None
            up = xt @ layer.w_up[e].t()
            h = F.silu(gate) * up if gate is not None else F.gelu(up, approximate="tanh")
            acc = acc + w * (h @ layer.w_down[e].t())
        rows.append(acc)
    return torch.cat(rows).view(x.shape)


def time_interleaved(
    calls: dict[str, Callable[[], object]], warmup: int, repeats: int, min_seconds: float
) -> dict[str, list[float]]:
    """Round-robin over the cases, so that a load change on shared cores hits them all alike."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or time.perf_counter() - start < min_seconds:
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden-mult", type=float, default=8 / 3)
    p.add_argument("--tokens", type=int, default=2048, help="batch * sequence length per call")
    p.add_argument("--loop-tokens", type=int, default=128,
                   help="tokens per call for the (slow) per-token loop")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--mode", choices=["forward", "train"], default="forward",
                   help="train = forward + backward")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    arch = arch_config({
        "d_model": args.d_model, "n_layers": 1,
        "pattern": {"mixers": ["attention"], "mlps": ["moe"]},
        "moe": {"n_experts": args.experts, "top_k": args.top_k, "hidden_mult": args.hidden_mult},
    })
    moe = MoE(arch, 0)
    dense = DenseMLP(arch, 0, kind="swiglu", hidden_mult=args.top_k * moe.hidden / args.d_model)
    dense_hidden = dense.up_proj.weight.shape[0]
    x = torch.randn(1, args.tokens, args.d_model, requires_grad=args.mode == "train")
    x_loop = x[:, : args.loop_tokens].detach().requires_grad_(args.mode == "train")

    def run(fn: Callable[[torch.Tensor], torch.Tensor], inp: torch.Tensor) -> Callable[[], None]:
        def call() -> None:
            if args.mode == "train":
                fn(inp).square().mean().backward()
            else:
                with torch.no_grad():
                    fn(inp)
        return call

    def with_path(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(inp: torch.Tensor) -> torch.Tensor:
            moe.kernel_path = path
            return moe(inp, ctx=ForwardContext())
        return fn

    cases: list[tuple[str, Callable[[], None], int]] = []
    if _grouped_mm_fn() is not None and moe._grouped_mm_reason(torch.device("cpu")) is None:
        cases.append(("moe grouped_mm", run(with_path("grouped_mm"), x), args.tokens))
    else:
        print(f"grouped_mm unavailable: {moe._grouped_mm_reason(torch.device('cpu'))}")
    cases += [
        ("moe expert-loop", run(with_path("expert-loop"), x), args.tokens),
        ("moe per-token loop", run(lambda inp: per_token_loop(moe, inp), x_loop),
         args.loop_tokens),
        ("dense same active", run(dense, x), args.tokens),
    ]
    all_times = time_interleaved({name: call for name, call, _ in cases}, args.warmup,
                                 args.repeats, args.min_seconds)
    results = {}
    for name, _, n_tokens in cases:
        times = all_times[name]
        med = statistics.median(times)
        results[name] = {"tokens_per_s": n_tokens / med, "median_s": med, "min_s": min(times),
                         "max_s": max(times), "iters": len(times), "tokens": n_tokens}

    active = moe.expert_params() * args.top_k // args.experts + moe.router.weight.numel()
    header = {
        "mode": args.mode, "d_model": args.d_model, "experts": args.experts,
        "top_k": args.top_k, "expert_hidden": moe.hidden, "dense_hidden": dense_hidden,
        "moe_active_params": active, "dense_params": sum(q.numel() for q in dense.parameters()),
        "threads": args.threads, "torch": torch.__version__, "cpu": platform.processor()
        or platform.machine(), "load_avg": os.getloadavg()[0],
    }
    print(json.dumps(header))
    print(f"{'path':<22}{'tokens/s':>12}{'median ms':>12}{'min..max ms':>20}{'iters':>7}")
    for name, r in results.items():
        spread = f"{1e3 * r['min_s']:.2f}..{1e3 * r['max_s']:.2f}"
        print(f"{name:<22}{r['tokens_per_s']:>12.0f}{1e3 * r['median_s']:>12.2f}"
              f"{spread:>20}{r['iters']:>7}")
    base = results["dense same active"]["tokens_per_s"]
    print("ratios of tokens/s:")
    for name, r in results.items():
        if name != "dense same active":
            print(f"  {name} / dense same active = {r['tokens_per_s'] / base:.3f}")
    if "moe grouped_mm" in results:
        grouped = results["moe grouped_mm"]["tokens_per_s"]
        for other in ("moe expert-loop", "moe per-token loop"):
            print(f"  moe grouped_mm / {other} = {grouped / results[other]['tokens_per_s']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": header, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
