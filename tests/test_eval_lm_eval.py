"""The lm-eval adapter: loglikelihood is the model's own log-softmax sum, rolling perplexity
predicts every token once, generate_until cuts at its stop strings, and an offline lm-eval run of
the local tasks gives the numbers archbench's own evaluators give on the same documents."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from archbench.archs.model import LanguageModel
from archbench.evaluate.generation.generate import Sampling, generate
from archbench.evaluate.quality.lm_eval_adapter import (
    TASKS_DIR,
    ArchbenchLM,
    encode_pair,
    result_rows,
    run_lm_eval,
    write_local_tasks,
)
from archbench.evaluate.quality.perplexity import score_continuations, text_bpb
from archbench.train.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def lm() -> ArchbenchLM:
    torch.manual_seed(0)
    model = LanguageModel({"d_model": 32, "n_layers": 2, "attention": {"head_dim": 16},
                           "init_std": 0.2}, 258).eval()
    return ArchbenchLM(model=model, tokenizer=ByteTokenizer(), batch_size=3)


def request(kind: str, *args: object) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def direct_logprob(model: LanguageModel, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    tokens = ctx + cont
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([tokens[:-1]]))[0], -1)
    rows = logp[len(ctx) - 1:]
    gold = torch.tensor(cont)
    return float(rows.gather(-1, gold[:, None]).sum()), bool((rows.argmax(-1) == gold).all())


def test_loglikelihood_is_the_sum_of_the_log_softmax(lm: ArchbenchLM) -> None:
    tok = lm.tokenizer
    greedy = generate(lm.model, tok, ["Pairs: a"], Sampling(max_new_tokens=3,
                                                             stop_on_eos=False))[0].text
    pairs = [("The pass key is", " 12345"), ("", "hello"), ("Pairs: a", greedy),
             ("x = 1 ", "+ 2"), ("a", "b")]
    out = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    for (context, cont), (lp, is_greedy) in zip(pairs, out):
        if context.endswith(" "):  # the trailing space moves to the continuation
            context, cont = context[:-1], " " + cont
        ctx_ids = tok.encode(context) or [tok.eos_id]
        want_lp, want_greedy = direct_logprob(lm.model, ctx_ids, tok.encode(cont))
        assert lp == pytest.approx(want_lp, abs=1e-4) and is_greedy == want_greedy
    assert out[2][1] is True  # the model's own greedy continuation is greedy
    alone = [lm.loglikelihood([request("loglikelihood", c, x)])[0] for c, x in pairs]
    assert [a[0] for a in alone] == pytest.approx([o[0] for o in out], abs=1e-4)


def test_loglikelihood_rolling_scores_every_token_once_from_eos(lm: ArchbenchLM) -> None:
    tok = lm.tokenizer
    text = "def f(x):\n    return x + 1\n" * 3
    full = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])[0]
    ids = tok.encode(text)
    want, _ = direct_logprob(lm.model, [tok.eos_id], ids)
    assert full == pytest.approx(want, abs=1e-3)
    short = ArchbenchLM(model=lm.model, tokenizer=tok, batch_size=2, max_length=16)
    windowed = short.loglikelihood_rolling([request("loglikelihood_rolling", text)])[0]
    assert windowed != pytest.approx(full, abs=1e-3)  # less context per prediction
    expected = 0.0
    for start in range(0, len(ids), 16):  # each window: the previous 16 tokens, at most
        end = min(start + 16, len(ids))
        context = ([tok.eos_id] + ids)[max(0, end - 16):start + 1]
        lp, _ = direct_logprob(lm.model, context, ids[start:end])
        expected += lp
    assert windowed == pytest.approx(expected, abs=1e-3)


def test_generate_until_stops_at_until_and_matches_generate(lm: ArchbenchLM) -> None:
    tok = lm.tokenizer
    free = generate(lm.model, tok, ["abc"], Sampling(max_new_tokens=12, stop_on_eos=False))[0]
    until = free.text[5:7]
    reqs = [request("generate_until", "abc", {"until": [until], "max_gen_toks": 12}),
            request("generate_until", "hello there", {"until": [], "max_gen_toks": 4})]
    texts = lm.generate_until(reqs)
    assert texts[0] == free.text[:free.text.index(until)]
    alone = generate(lm.model, tok, ["hello there"], Sampling(max_new_tokens=4))[0].text
    assert texts[1] == alone
    with pytest.raises(ValueError, match="batch_size"):
        ArchbenchLM(model=lm.model, tokenizer=tok, batch_size="auto")


def docs(name: str, n: int) -> list[dict]:
    lines = (TASKS_DIR / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


def test_an_offline_lm_eval_run_equals_our_own_evaluators(lm: ArchbenchLM,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # lm-eval aggregates only where LOCAL_RANK is 0; a rank left in the environment by an
    # earlier test of a distributed launch must not decide this one
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    results = run_lm_eval(lm.model, lm.tokenizer, ["archbench_passkey", "archbench_heldout"],
                          batch_size=4, limit=3)
    got = {(r["task"], r["metric"]): r for r in result_rows(results)}
    tok = lm.tokenizer
    passkey = docs("passkey.jsonl", 3)
    items = []
    for d in passkey:
        ctx, cont = tok.encode(d["context"]), tok.encode(d["answer"])
        items.append((ctx + cont, len(cont)))
    scores = score_continuations(lm.model, items, batch_size=1)
    assert got[("archbench_passkey", "acc")]["value"] == pytest.approx(
        sum(g for _, g, _ in scores) / 3)
    assert got[("archbench_passkey", "perplexity")]["value"] == pytest.approx(
        math.exp(-sum(lp for lp, _, _ in scores) / 3), rel=1e-4)
    assert got[("archbench_passkey", "acc")]["n"] == 3
    texts = [d["text"] for d in docs("heldout.jsonl", 3)]
    ours = text_bpb(lm.model, tok, texts, batch_size=2)
    assert got[("archbench_heldout", "bits_per_byte")]["value"] == pytest.approx(
        ours["bpb"], rel=1e-5)
    assert got[("archbench_heldout", "byte_perplexity")]["value"] == pytest.approx(
        2 ** ours["bpb"], rel=1e-4)


def test_local_task_files_are_what_archbench_writes(tmp_path: Path) -> None:
    counts = write_local_tasks(tmp_path, seed=0)
    assert counts["kv_recall.jsonl"] == 100 and counts["passkey.jsonl"] == 60
    # kv_recall draws from the seeded generator only: the shipped file is reproduced exactly
    shipped = (TASKS_DIR / "kv_recall.jsonl").read_text(encoding="utf-8")
    assert (tmp_path / "kv_recall.jsonl").read_text(encoding="utf-8") == shipped
    for d in docs("passkey.jsonl", 60) + docs("passkey_multikey.jsonl", 60):
        assert len(d["context"]) == d["chars"]
        assert d["answer"].strip() in d["context"]
    for d in docs("kv_recall.jsonl", 100):
        key = d["context"].rsplit("Query: ", 1)[1][:-1]
        assert f"{key}={d['answer']}," in d["context"] or f"{key}={d['answer']}." in d["context"]
    for yaml in TASKS_DIR.glob("archbench_*.yaml"):
        assert f"task: {yaml.stem}" in yaml.read_text()


def test_encode_pair_moves_trailing_space_and_keeps_bpe_merges() -> None:
    tok = ByteTokenizer()
    assert encode_pair(tok, "ab ", "c") == (tok.encode("ab"), tok.encode(" c"))
    assert encode_pair(tok, "", "c") == ([tok.eos_id], tok.encode("c"))
