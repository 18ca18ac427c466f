"""Sampling and generation through every backbone's cache: prefill in parallel, then step.

Sampling (docs/design.md section 5): temperature divides the logits (0 = greedy argmax), then top-k,
then top-p (the smallest set of most likely tokens whose mass reaches p), then min-p (tokens at
least min_p times as likely as the most likely one), each on the distribution left by the one
before. Stops at EOS, at a stop string (the text is cut before it), or after max_new_tokens.
Returned log-probabilities are the model's own (log-softmax of the raw logits), so they rank
samples independently of the sampling settings: best-of-N keeps the sample with the highest mean.

Padding never changes an answer. Prompts of different lengths are batched without masks inside
any mixer: the common prefix (the length of the shortest prompt) is prefilled in parallel, then
all rows step together, each fed its own remaining prompt tokens until they run out and then its
own samples, so every row's state only ever saw its own real tokens. Each row samples from its
own generator, seeded by (seed + sample index): a prompt gets the same text alone or in a batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from archbench.archs.compiling import bucketed
from archbench.config import ConfigError
from archbench.train.tasks.base import position_limit


class SamplingError(ConfigError):
    """An invalid sampling setting, named with its value and what is allowed."""


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    stop: tuple[str, ...] = ()
    stop_on_eos: bool = True
    seed: int = 0
    num_samples: int = 1

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop or ())
        self.check()

    def check(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens={self.max_new_tokens!r} must be an int >= 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise SamplingError(f"temperature={self.temperature!r} must be >= 0 (0 = greedy)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise SamplingError(f"top_k={self.top_k!r} must be an int >= 1 (or None: off)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p={self.top_p!r} must be in (0, 1] (or None: off)")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise SamplingError(f"min_p={self.min_p!r} must be in [0, 1] (or None: off)")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise SamplingError(f"num_samples={self.num_samples!r} must be an int >= 1")
        if self.num_samples > 1 and self.temperature == 0:
            raise SamplingError(f"num_samples={self.num_samples} (best-of-N) with temperature=0 "
                                "draws N identical greedy samples; set temperature > 0")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError(f"stop={list(self.stop)!r}: stop strings must be non-empty")

    @classmethod
    def from_config(cls, g: Any) -> Sampling:
        return cls(max_new_tokens=int(g.max_new_tokens), temperature=float(g.temperature),
                   top_k=None if g.top_k is None else int(g.top_k),
                   top_p=None if g.top_p is None else float(g.top_p),
                   min_p=None if g.min_p is None else float(g.min_p),
                   stop=tuple(g.stop or ()), stop_on_eos=bool(g.get("stop_on_eos", True)),
                   seed=int(g.seed), num_samples=int(g.num_samples))


@dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "eos" | "stop" | "length"
    sample_index: int = 0
    candidates: list[Generation] = field(default_factory=list)

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else float("-inf")


def filter_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Log-probabilities of the sampling distribution, -inf outside what may be drawn (B, V)."""
    if s.temperature == 0:
        out = torch.full_like(logits, float("-inf"))
        return out.scatter(-1, logits.argmax(-1, keepdim=True), 0.0)
    logp = torch.log_softmax(logits.float() / s.temperature, dim=-1)
    if s.top_k is not None and s.top_k < logp.shape[-1]:
        kth = logp.topk(s.top_k, dim=-1).indices
        keep = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, kth, True)
        logp = torch.log_softmax(logp.masked_fill(~keep, float("-inf")), dim=-1)
    if s.top_p is not None and s.top_p < 1:
        sorted_lp, idx = logp.sort(-1, descending=True)
        mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
        keep_sorted = mass_before < s.top_p  # the most likely token is always kept
        keep = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
        logp = torch.log_softmax(logp.masked_fill(~keep, float("-inf")), dim=-1)
    if s.min_p is not None and s.min_p > 0:
        floor = logp.max(-1, keepdim=True).values + math.log(s.min_p)
        logp = torch.log_softmax(logp.masked_fill(logp < floor, float("-inf")), dim=-1)
    return logp


def _draw(logits: torch.Tensor, s: Sampling, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row; each row draws from its own generator (on the CPU, so a seed gives
    the same text on every device)."""
    if s.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, s).exp().cpu()
    out = [torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)]
    return torch.cat(out).to(logits.device)


def encode_prompt(tokenizer: Any, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a prompt; an empty prompt starts from EOS (the document boundary)."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    return ids or [int(tokenizer.eos_id)]


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str | Sequence[int]],
             sampling: Sampling, device: torch.device | str | None = None,
             on_token: Callable[[int, int], None] | None = None,
             compile: bool = False) -> list[Generation]:
    """Generate for every prompt; with num_samples = N > 1, each result is the best of its N
    samples (highest mean log-probability) and lists all of them in `candidates`.

    Every token after the prompt prefix is one `model.decode_step` (all layers in one function,
    states updated in place). With `compile`, that step is compiled once (archs/compiling.py)
    and the cache length rounded up to a multiple of CACHE_BUCKET, so later calls with prompts of
    other lengths reuse the same graph."""
    if not prompts:
        raise SamplingError("no prompt given")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    n = sampling.num_samples
    rows = [(p, j) for p in range(len(encoded)) for j in range(n)]
    seqs = [list(encoded[p]) for p, _ in rows]
    lengths = [len(s) for s in seqs]
    max_len = max(lengths) + sampling.max_new_tokens
    limit = position_limit(model)
    if limit is not None and max_len - 1 > limit:
        raise SamplingError(f"prompt ({max(lengths)} tokens) plus max_new_tokens="
                            f"{sampling.max_new_tokens} exceeds the model's {limit} positions")
    vocab = getattr(model, "vocab_size", None)
    if vocab is not None and max(max(s) for s in seqs) >= vocab:
        raise SamplingError(f"prompt token ids must be < the model's vocab_size={vocab}")
    gens = [torch.Generator().manual_seed(sampling.seed + j) for _, j in rows]
    new: list[list[int]] = [[] for _ in rows]
    logps: list[list[float]] = [[] for _ in rows]
    texts = [""] * len(rows)
    done: list[str | None] = [None] * len(rows)
    was_training = model.training
    model.eval()
    if compile and model._compiled_step is None:
        model.compile_decoding()
    cache = model.init_cache(len(rows), bucketed(max_len) if compile else max_len, device=device)
    common = min(lengths)
    prefix = torch.tensor([s[:common] for s in seqs], dtype=torch.long, device=device)
    logits = model(prefix, cache=cache)[:, -1].float()
    eos = int(tokenizer.eos_id)
    while True:
        pos = cache.pos  # the position just consumed is pos - 1
        active = [r for r in range(len(rows)) if done[r] is None and pos >= lengths[r]]
        if active:
            picked = _draw(logits[active], sampling, [gens[r] for r in active])
            lp = torch.log_softmax(logits[active], dim=-1)
            for k, r in enumerate(active):
                token = int(picked[k])
                new[r].append(token)
                seqs[r].append(token)
                logps[r].append(float(lp[k, token]))
                if on_token is not None:
                    on_token(r, token)
                done[r] = _finished(tokenizer, sampling, new[r], texts, r, eos)
        if all(d is not None for d in done):
            break
        step = torch.tensor([s[pos] if pos < len(s) else eos for s in seqs],
                            dtype=torch.long, device=device)
        logits = model.decode_step(step, cache).float()
    model.train(was_training)
    results = [Generation(list(encoded[p]), new[r], logps[r], texts[r], done[r] or "length", j)
               for r, (p, j) in enumerate(rows)]
    if n == 1:
        return results
    out = []
    for p in range(len(encoded)):
        group = results[p * n:(p + 1) * n]
        best = max(group, key=lambda g: g.mean_logprob)
        out.append(Generation(best.prompt_tokens, best.tokens, best.logprobs, best.text,
                              best.finish_reason, best.sample_index, candidates=group))
    return out


def _finished(tokenizer: Any, s: Sampling, tokens: list[int], texts: list[str], row: int,
              eos: int) -> str | None:
    """Update the row's text; say why it stops, or None to go on."""
    if s.stop_on_eos and tokens[-1] == eos:
        texts[row] = tokenizer.decode(tokens[:-1])
        return "eos"
    text = tokenizer.decode(tokens)
    hits = [text.find(stop) for stop in s.stop if stop in text]
    if hits:
        texts[row] = text[:min(hits)]
        return "stop"
    texts[row] = text
    return "length" if len(tokens) >= s.max_new_tokens else None


def run_generate(cfg: Any) -> list[str]:
    """`archbench generate ckpt=... prompt=...`: print and return the completions."""
    from archbench.train.checkpoint import load_model

    if not cfg.get("ckpt"):
        raise SamplingError("generate needs ckpt=<run dir or checkpoint folder>")
    g = cfg.generate
    name = g.get("device", "auto")
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                          "cpu" if name == "auto" else name)
    model, tokenizer, _ = load_model(cfg.ckpt, device)
    prompts = list(g.get("prompts") or []) or [cfg.get("prompt") or ""]
    results = generate(model, tokenizer, prompts, Sampling.from_config(g), device,
                       compile=bool(g.get("compile", False)))
    texts = []
    for prompt, result in zip(prompts, results):
        print(f"{prompt}{result.text}")
        print(f"--- [{result.finish_reason}, {len(result.tokens)} tokens, "
              f"mean log-prob {result.mean_logprob:.3f}]")
        texts.append(result.text)
    return texts
