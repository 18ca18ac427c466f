"""Sampling and generation: greedy is argmax, top-k / top-p / min-p keep exactly their sets, a
seed fixes the text, stop conditions, best-of-N, clear errors, and prompts of different lengths
batched together give every backbone the tokens and log-probabilities they give alone."""

from __future__ import annotations

import math
from math import lcm
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import archbench.conf
from archbench.archs.model import LanguageModel
from archbench.archs.registry import mixer_names, mlp_names
from archbench.config import RootConfig, expand_period
from archbench.evaluate.generation.generate import (
    Sampling,
    SamplingError,
    filter_logits,
    generate,
    run_generate,
)
from archbench.train.checkpoint import save_checkpoint
from archbench.train.tokenizer import ByteTokenizer

CONF = Path(archbench.conf.__file__).parent
ARCHS = sorted(p.stem for p in (CONF / "arch").glob("*.yaml"))
PROMPTS = ["ab", "hello", "the fox jumps"]


def tiny(name: str, vocab: int = 258) -> LanguageModel:
    arch = OmegaConf.load(CONF / "arch" / f"{name}.yaml")
    period = lcm(len(expand_period(list(arch.pattern.mixers), "m", mixer_names())),
                 len(expand_period(list(arch.pattern.mlps), "m", mlp_names())))
    small = {"d_model": 32, "n_layers": max(2, period), "init_std": 0.3,
             "attention": {"head_dim": 16}, "rwkv7": {"head_size": 16},
             "mamba": {"chunk_size": 8}, "mamba2": {"head_dim": 16, "d_state": 16,
                                                    "chunk_size": 8},
             "moe": {"n_experts": 4, "top_k": 2}}
    torch.manual_seed(0)
    return LanguageModel(OmegaConf.merge(arch, small), vocab).eval()


@pytest.fixture(scope="module")
def model() -> LanguageModel:
    return tiny("transformer")


def full_logprobs(model: LanguageModel, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([tokens]))[0].float(), -1)


# ---- the sampling distribution -------------------------------------------------------------------
def test_temperature_zero_is_the_argmax_of_a_full_forward(model: LanguageModel) -> None:
    tok = ByteTokenizer()
    out = generate(model, tok, ["hello"], Sampling(max_new_tokens=12, stop_on_eos=False))[0]
    tokens = tok.encode("hello")
    for step in range(12):  # no cache: the whole sequence each time
        logp = full_logprobs(model, tokens)[-1]
        assert out.tokens[step] == int(logp.argmax())
        assert out.logprobs[step] == pytest.approx(float(logp[out.tokens[step]]), abs=1e-5)
        tokens.append(out.tokens[step])
    assert out.finish_reason == "length" and len(out.tokens) == 12


def test_top_k_never_draws_outside_the_k_most_likely(model: LanguageModel) -> None:
    tok = ByteTokenizer()
    s = Sampling(max_new_tokens=10, temperature=2.0, top_k=3, stop_on_eos=False)
    for seed in range(4):
        s.seed = seed
        out = generate(model, tok, ["the fox"], s)[0]
        tokens = tok.encode("the fox")
        for t in out.tokens:
            top = full_logprobs(model, tokens)[-1].topk(3).indices.tolist()
            assert t in top
            tokens.append(t)
    logits = torch.randn(5, 50)
    kept = torch.isfinite(filter_logits(logits, Sampling(temperature=1.0, top_k=7)))
    assert kept.sum(-1).tolist() == [7] * 5
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(7).indices, True))


@pytest.mark.parametrize("p", [0.3, 0.75, 0.95])
def test_top_p_keeps_the_smallest_nucleus(p: float) -> None:
    logits = torch.randn(6, 40) * 2
    probs = torch.softmax(logits, -1)
    kept = torch.isfinite(filter_logits(logits, Sampling(temperature=1.0, top_p=p)))
    for row in range(6):
        mass = probs[row][kept[row]]
        assert mass.sum() >= p - 1e-6  # the nucleus holds at least p
        assert mass.sum() - mass.min() < p  # and none of it can go
        dropped = probs[row][~kept[row]]
        assert dropped.numel() == 0 or dropped.max() <= mass.min()  # the most likely ones


def test_min_p_keeps_tokens_near_the_top() -> None:
    logits = torch.randn(4, 30) * 3
    probs = torch.softmax(logits, -1)
    kept = torch.isfinite(filter_logits(logits, Sampling(temperature=1.0, min_p=0.2)))
    assert torch.equal(kept, probs >= 0.2 * probs.max(-1, keepdim=True).values)


def test_temperature_divides_the_logits() -> None:
    logits = torch.randn(3, 20)
    out = filter_logits(logits, Sampling(temperature=0.5))
    assert torch.allclose(out, torch.log_softmax(logits / 0.5, -1), atol=1e-6)


def test_the_same_seed_gives_the_same_text(model: LanguageModel) -> None:
    tok = ByteTokenizer()
    s = Sampling(max_new_tokens=16, temperature=1.5, top_p=0.95, seed=11, stop_on_eos=False)
    a = generate(model, tok, PROMPTS, s)
    b = generate(model, tok, PROMPTS, s)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    s.seed = 12
    c = generate(model, tok, PROMPTS, s)
    assert [g.tokens for g in a] != [g.tokens for g in c]


# ---- stop conditions and best-of-N ---------------------------------------------------------------
def test_stop_strings_cut_the_text_and_eos_stops(model: LanguageModel) -> None:
    tok = ByteTokenizer()
    free = generate(model, tok, ["hello"], Sampling(max_new_tokens=20, stop_on_eos=False))[0]
    stop = free.text[6:8]
    assert len(stop) == 2
    cut = generate(model, tok, ["hello"], Sampling(max_new_tokens=20, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.index(stop)]
    assert cut.tokens == free.tokens[:len(cut.tokens)] and len(cut.tokens) < 20
    eos_tok = ByteTokenizer()
    eos_tok.eos_id = free.tokens[4]  # make the fifth greedy token the end of text
    ended = generate(model, eos_tok, ["hello"], Sampling(max_new_tokens=20))[0]
    assert ended.finish_reason == "eos" and ended.tokens == free.tokens[:5]
    assert ended.text == tok.decode(free.tokens[:4])


def test_best_of_n_keeps_the_highest_mean_log_probability(model: LanguageModel) -> None:
    tok = ByteTokenizer()
    s = Sampling(max_new_tokens=8, temperature=1.2, num_samples=4, seed=5, stop_on_eos=False)
    best = generate(model, tok, ["hi", "abc"], s)
    for result, prompt in zip(best, ["hi", "abc"]):
        means = [c.mean_logprob for c in result.candidates]
        assert len(result.candidates) == 4 and result.mean_logprob == max(means)
        assert sorted(c.sample_index for c in result.candidates) == [0, 1, 2, 3]
        for c in result.candidates:  # sample j is the single sample seeded seed + j
            one = Sampling(max_new_tokens=8, temperature=1.2, seed=5 + c.sample_index,
                           stop_on_eos=False)
            assert generate(model, tok, [prompt], one)[0].tokens == c.tokens


@pytest.mark.parametrize("bad", [
    {"temperature": -1.0}, {"temperature": math.inf}, {"top_p": 0.0}, {"top_p": 1.5},
    {"top_k": 0}, {"min_p": 1.5}, {"max_new_tokens": 0}, {"num_samples": 0},
    {"num_samples": 3, "temperature": 0.0}, {"stop": ("",)},
])
def test_invalid_settings_are_clear_errors(bad: dict) -> None:
    with pytest.raises(SamplingError, match=next(iter(bad))):
        Sampling(**bad)


def test_prompts_past_learned_positions_are_refused() -> None:
    gpt2 = tiny("gpt2")
    limit = gpt2.pos_embed.num_embeddings
    with pytest.raises(SamplingError, match=str(limit)):
        generate(gpt2, ByteTokenizer(), ["x" * (limit - 2)], Sampling(max_new_tokens=8))


# ---- padding never changes an answer -------------------------------------------------------------
@pytest.mark.parametrize("name", ARCHS)
def test_batched_prompts_of_different_lengths_equal_one_at_a_time(name: str) -> None:
    model = tiny(name)
    tok = ByteTokenizer()
    for s in (Sampling(max_new_tokens=5, stop_on_eos=False),
              Sampling(max_new_tokens=5, temperature=1.0, top_k=20, seed=3, stop_on_eos=False)):
        batched = generate(model, tok, PROMPTS, s)
        for prompt, b in zip(PROMPTS, batched):
            alone = generate(model, tok, [prompt], s)[0]
            assert b.tokens == alone.tokens
            assert b.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
            # and the cache gives what a full forward over the whole text gives
            full = full_logprobs(model, tok.encode(prompt) + b.tokens[:-1])
            n = len(tok.encode(prompt))
            direct = [float(full[n - 1 + i, t]) for i, t in enumerate(b.tokens)]
            assert b.logprobs == pytest.approx(direct, abs=1e-4)


def test_run_generate_prints_completions_from_a_checkpoint(tmp_path: Path,
                                                           model: LanguageModel,
                                                           capsys: pytest.CaptureFixture) -> None:
    tok = ByteTokenizer()
    save_checkpoint(tmp_path / "run", 1, model, None, tok,
                    {"arch": OmegaConf.to_container(model.arch), "vocab_size": tok.vocab_size,
                     "config": {}, "tokenizer": tok.identity})
    cfg = OmegaConf.merge(OmegaConf.structured(RootConfig), {
        "ckpt": str(tmp_path / "run"), "generate": {"max_new_tokens": 6, "stop_on_eos": False,
                                                    "prompts": ["ab", "hello"]}})
    texts = run_generate(cfg)
    expected = generate(model, tok, ["ab", "hello"], Sampling(max_new_tokens=6, stop_on_eos=False))
    assert texts == [g.text for g in expected]
    printed = capsys.readouterr().out
    assert "hello" + expected[1].text in printed


def test_compiled_generation_gives_the_eager_text_and_reuses_one_graph(model: LanguageModel
                                                                       ) -> None:
    """generate(compile=True): the cache length is bucketed, so prompts of other lengths (and a
    second call) reuse the one decode graph; the tokens equal eager generation's. Traced with
    dynamo's eager backend (the graph plumbing; inductor's numerics are tests/test_compile.py's)."""
    graphs: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(1)
        return gm.forward

    tok = ByteTokenizer()
    s = Sampling(max_new_tokens=6, stop_on_eos=False)
    eager = [generate(model, tok, [p], s) for p in PROMPTS]
    torch._dynamo.reset()
    model._compiled_step = torch.compile(model.decode_body, backend=counting, dynamic=False)
    try:
        compiled = [generate(model, tok, [p], s, compile=True) for p in PROMPTS]
    finally:
        model._compiled_step = None
        torch._dynamo.reset()
    assert [c[0].tokens for c in compiled] == [e[0].tokens for e in eager]
    assert len(graphs) == 1
