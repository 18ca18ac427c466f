"""Peak CPU memory of one training step with and without activation checkpointing per block.
A benchmark, not a test: it prints, it asserts nothing.

    .venv/bin/python scripts/bench_activation_checkpointing.py --arch transformer --size tiny \
        --context 2048 --batch 4

Protocol (docs/design.md 3, memory on CPU): every measurement runs in a fresh process, so the
peak resident set size (ru_maxrss) belongs to that configuration alone. The child builds the
model, runs one warm-up step at a short context (so that lazily allocated kernels and allocator
pools exist), records its resident size, then runs one forward + backward + AdamW step at the
measured context; the step's cost is the peak minus that resident size. Run from /tmp or use
the venv's python: `python -m` from the repository root shadows Hugging Face's `evaluate`.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize()


def child(args: argparse.Namespace) -> dict:
    import torch
    from hydra import compose, initialize_config_module

    from archbench.archs.sizing import build_model
    from archbench.config import register_schema

    torch.set_num_threads(args.threads)
    register_schema()
    with initialize_config_module(config_module="archbench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"arch={args.arch}", f"size={args.size}"])
    torch.manual_seed(0)
    model, _ = build_model(cfg.arch, cfg.size, 256)
    model.train()
    model.activation_checkpointing = args.checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(context: int) -> float:
        tokens = torch.randint(0, 256, (args.batch, context + 1))
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    step(16)
    before = _rss_bytes()
    loss = step(args.context)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"arch": args.arch, "size": args.size, "context": args.context, "batch": args.batch,
            "activation_checkpointing": args.checkpointing, "rss_before_step": before,
            "peak_rss": peak, "step_peak": peak - before, "loss": loss,
            "params": model.param_counts()["total"], "n_layers": len(model.blocks),
            "d_model": model.arch.d_model, "threads": args.threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="transformer")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    results = []
    for on in (False, True):
        cmd = [sys.executable, __file__, "--child", "--arch", args.arch, "--size", args.size,
               "--context", str(args.context), "--batch", str(args.batch),
               "--threads", str(args.threads)] + (["--checkpointing"] if on else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mib = 2**20
    first = results[0]
    print(f"{args.arch} size={args.size} ({first['params'] / 1e6:.2f}M params, "
          f"{first['n_layers']} layers, d_model {first['d_model']}), batch {args.batch} x "
          f"context {args.context}, fp32, {args.threads} threads, {platform.processor() or 'cpu'}")
    print("activation_checkpointing | peak RSS MiB | step peak over resident MiB | loss")
    for r in results:
        print(f"{str(r['activation_checkpointing']):>24} | {r['peak_rss'] / mib:12.0f} | "
              f"{r['step_peak'] / mib:27.0f} | {r['loss']:.6f}")
    off, on_ = results
    print(f"step peak with / without: {on_['step_peak'] / max(off['step_peak'], 1):.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
