"""CPU benchmark: our pure-PyTorch Mamba-1 / Mamba-2 against Hugging Face's MambaForCausalLM /
Mamba2ForCausalLM of the same config with the same weights, in the same process.

Measures training throughput (forward + backward of the LM loss, tokens/s) and decoding
throughput (generated tokens/s; each timed call prefills a short prompt, then steps one token at
a time). Warm-up runs, then the median and
the spread (min..max) of the repeats; ratios are ours / theirs (> 1: ours is faster). Before timing,
the two models' logits are compared so a speed-up can never come from computing something else.

Run from outside the repo root (so the local `evaluate/` folder does not shadow HF's):
    REPO=$PWD; cd /tmp && $REPO/.venv/bin/python $REPO/scripts/bench_mamba_cpu.py
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from archbench.archs.mamba import hf_mamba_config, to_hf_mamba_state_dict
from archbench.archs.model import LanguageModel, resolve_kernels

CONF = Path(__file__).resolve().parents[1] / "conf" / "arch"


def timed_pair(
    fns: dict[str, Callable[[], object]], args: argparse.Namespace
) -> dict[str, list[float]]:
    """Warm up each, then alternate the timed calls so load from other processes hits both alike.

    Protocol (docs/design.md 3): at least `warmup` warm-up calls and `repeats` timed calls each,
    except that a side whose single call exceeds `slow_s` seconds stops warming up after one call
    and stops timing once its timed calls add up to `budget_s` (HF's Mamba-1 training step takes
    minutes at seq 512, where the protocol's 10 repeats would take an hour).
    """
    for fn in fns.values():
        for _ in range(args.warmup):
            start = time.perf_counter()
            fn()
            if time.perf_counter() - start > args.slow_s:
                break
    times: dict[str, list[float]] = {name: [] for name in fns}

    def done(name: str) -> bool:
        t = times[name]
        return len(t) >= args.repeats or (len(t) >= 1 and sum(t) >= args.budget_s)

    while not all(done(name) for name in fns):
        for name, fn in fns.items():
            if not done(name):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def summary(tokens: int, times: list[float]) -> tuple[float, str]:
    """Median tokens/s, and the text with the spread (slowest..fastest call)."""
    med = statistics.median(times)
    spread = f"({tokens / max(times):.0f}..{tokens / min(times):.0f})"
    return tokens / med, f"{tokens / med:10.0f} tok/s  {spread}"


def build_pair(kind: str, args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import Mamba2ForCausalLM, MambaForCausalLM

    arch = OmegaConf.load(CONF / f"{kind}.yaml")
    arch.d_model, arch.n_layers = args.d_model, args.n_layers
    ours = LanguageModel(arch, args.vocab)
    resolve_kernels(ours, "cpu")
    hf_cls = MambaForCausalLM if kind == "mamba" else Mamba2ForCausalLM
    theirs = hf_cls(hf_mamba_config(ours))
    theirs.load_state_dict(to_hf_mamba_state_dict(ours))
    return ours, theirs


def bench_kind(kind: str, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    ours, theirs = build_pair(kind, args)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    with torch.no_grad():
        diff = (ours.eval()(tokens) - theirs.eval()(tokens).logits).abs().max().item()
    print(f"\n== {kind}: {ours.kernel_paths()}, max |logit diff| vs HF = {diff:.2e}, "
          f"{ours.param_counts()['non_embedding'] / 1e6:.2f}M non-embedding params")

    def train_ours() -> None:
        logits = ours(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()

    def train_theirs() -> None:
        logits = theirs(tokens[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()

    prompt = tokens[:, : args.prompt_len]
    steps = torch.randint(0, args.vocab, (args.batch, args.decode_tokens))

    def decode_ours() -> None:
        cache = ours.init_cache(args.batch, args.prompt_len + args.decode_tokens)
        ours(prompt, cache)
        for t in range(args.decode_tokens):
            ours(steps[:, t : t + 1], cache)

    def decode_theirs() -> None:
        cache = theirs(prompt, use_cache=True).cache
        for t in range(args.decode_tokens):
            cache = theirs(steps[:, t : t + 1], cache=cache, use_cache=True).cache

    results = {}
    n_train = args.batch * (args.seq_len - 1)
    n_decode = args.batch * args.decode_tokens
    for label, fns, n_tok, training in (
        ("train fwd+bwd", {"ours": train_ours, "hf": train_theirs}, n_train, True),
        ("decode", {"ours": decode_ours, "hf": decode_theirs}, n_decode, False),
    ):
        ours.train(training)
        theirs.train(training)
        with torch.enable_grad() if training else torch.no_grad():
            times = timed_pair(fns, args)
        ours.zero_grad(set_to_none=True)
        theirs.zero_grad(set_to_none=True)
        rate = {}
        for who, t in times.items():
            rate[who], text = summary(n_tok, t)
            print(f"  {label:14s} {who:4s} {text}  [{len(t)} timed]")
        results[f"{kind} {label}"] = rate["ours"] / rate["hf"]
        print(f"  {label:14s} ratio ours/hf = {rate['ours'] / rate['hf']:.2f}x")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["mamba", "mamba2"])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--slow-s", type=float, default=20.0)
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; d_model {args.d_model}, "
          f"{args.n_layers} layers, batch {args.batch}, seq {args.seq_len}, "
          f"decode {args.decode_tokens} tokens after a {args.prompt_len}-token prompt, fp32; "
          f"load average {os.getloadavg()[0]:.2f}")
    ratios: dict[str, float] = {}
    for kind in args.kinds:
        ratios.update(bench_kind(kind, args))
    print("\nratios ours / HF (tokens/s, > 1 means ours is faster):")
    for key, value in ratios.items():
        print(f"  {key:28s} {value:6.2f}x")


if __name__ == "__main__":
    main()
