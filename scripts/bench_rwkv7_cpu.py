"""Benchmark (not a test): CPU training throughput of RWKV-7's chunked form against the naive
recurrent form.

Times forward + backward of one RWKV-7 time-mix layer (projections, LoRAs, WKV, group norm) at
batch 1 and small width, once with the chunked WKV (`torch:chunked`, what training uses) and
once with the step-by-step definition (`torch:recurrent`), over a range of lengths. Protocol of
docs/design.md 3: warm-up iterations, then at least `--repeats` iterations and `--min-seconds`
seconds; the median and the spread (min..max) are quoted. `--op wkv` times the WKV operator alone.

Run it from outside the repository root (the local evaluate/ folder shadows Hugging Face's), e.g.
`REPO=$PWD; cd /tmp && $REPO/.venv/bin/python $REPO/scripts/bench_rwkv7_cpu.py`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from archbench.archs.kernels.rwkv7 import LOG_DECAY_MIN, wkv7
from archbench.archs.rwkv import RWKV7TimeMix


def time_it(fn: Callable[[], None], warmup: int, repeats: int, min_seconds: float) -> list[float]:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def layer_step(d_model: int, head_size: int, length: int, path: str, chunk: int) -> Callable:
    arch = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "arch" / "rwkv7.yaml")
    arch.d_model, arch.n_layers = d_model, 2
    arch.rwkv7.head_size, arch.rwkv7.chunk_size = head_size, chunk
    torch.manual_seed(0)
    layer = RWKV7TimeMix(arch, 1)  # layer 1: with the value residual
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(0.05 * torch.randn_like(param))
    layer.kernel_path = path
    x = torch.randn(1, length, d_model, requires_grad=True)
    v_first = torch.randn(1, length, d_model)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x, None, {"v_first": v_first}).square().mean().backward()

    return step


def op_step(d_model: int, head_size: int, length: int, path: str, chunk: int) -> Callable:
    heads = d_model // head_size
    shape = (1, length, heads, head_size)
    gen = torch.Generator().manual_seed(0)
    kk = F.normalize(torch.randn(*shape, generator=gen), dim=-1)
    inputs = [
        torch.randn(*shape, generator=gen),
        LOG_DECAY_MIN * torch.sigmoid(torch.randn(*shape, generator=gen)),
        torch.randn(*shape, generator=gen),
        torch.randn(*shape, generator=gen),
        -kk,
        kk * torch.rand(*shape, generator=gen),
    ]
    inputs = [t.requires_grad_() for t in inputs]

    def step() -> None:
        y, s = wkv7(path, *inputs, None, chunk)
        torch.autograd.grad(y.square().mean() + s.square().mean(), inputs)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--op", choices=["layer", "wkv"], default="layer")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    make = layer_step if args.op == "layer" else op_step
    print(
        f"RWKV-7 {args.op} forward+backward on CPU ({platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {args.threads} thread(s)), batch 1, d_model {args.d_model}, "
        f"head size {args.head_size}, chunk {args.chunk_size}; median (min..max) over >= "
        f"{args.repeats} iterations after {args.warmup} warm-up"
    )
    print()
    print("| length | recurrent ms | chunked ms | recurrent tok/s | chunked tok/s | speedup |")
    print("|---:|---:|---:|---:|---:|---:|")
    medians: dict[str, dict[int, float]] = {"torch:recurrent": {}, "torch:chunked": {}}
    cells: dict[str, str] = {}
    for length in args.lengths:
        for path in medians:
            step = make(args.d_model, args.head_size, length, path, args.chunk_size)
            times = time_it(step, args.warmup, args.repeats, args.min_seconds)
            medians[path][length] = statistics.median(times)
            spread = f"{1e3 * min(times):.1f}..{1e3 * max(times):.1f}"
            cells[path] = f"{1e3 * medians[path][length]:.1f} ({spread})"
        rec, chk = medians["torch:recurrent"][length], medians["torch:chunked"][length]
        print(
            f"| {length} | {cells['torch:recurrent']} | {cells['torch:chunked']} | "
            f"{length / rec:,.0f} | {length / chk:,.0f} | {rec / chk:.1f}x |",
            flush=True,
        )
    first, last = args.lengths[0], args.lengths[-1]
    print()
    print(f"time growth from {first} to {last} tokens (linear = {last / first:.0f}x):")
    for path, by_len in medians.items():
        print(f"  {path}: {by_len[last] / by_len[first]:.1f}x")


if __name__ == "__main__":
    main()
