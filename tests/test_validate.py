"""`archbench validate`: every reproduction composes (CPU and GPU presets), each verdict rule
says "reproduced" on results that meet the published claim and "not reproduced" on results that
do not, and two reproductions run end to end on tiny budgets with their metric computed from what
the runs wrote (and a second invocation redoes nothing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from archbench.compare import compose
from archbench.config import ConfigError, validate
from archbench.evaluate.reporting.data import Run
from archbench.evaluate.reporting.validation import (
    METRICS,
    NOT_REPRODUCED,
    NOT_RUN,
    REPRODUCED,
    decoding_memory,
    length_extrapolation,
    loss_target,
    mqar_width,
    scaling_fit,
    task_pair,
)
from archbench.validate import GROUPS, main, reproduction_names, selected, split_args

CPU_SET = {"mqar_width", "h3_synthetics", "induction_extrapolation", "decoding_memory",
           "shakespeare_char", "scaling"}


@pytest.mark.parametrize("group", sorted(GROUPS.values()))
def test_every_reproduction_composes_with_its_claim_and_rule(group: str) -> None:
    names = reproduction_names(group)
    assert set(names) == CPU_SET
    for name in names:
        cfg = compose(name, [], group)
        validate(cfg)
        meta = cfg.validate
        assert meta.name == name and meta.metric in METRICS
        for key in ("claim", "source", "scaling", "rule"):
            assert len(str(meta[key])) > 20, f"{group}/{name}: validate.{key} is empty"
        assert cfg.compare.sweep_dir.endswith(name)


def test_scaling_sizes_each_have_their_own_learning_rate() -> None:
    """One fixed rate favours one size (the fit then fails for the optimizer's reason, not the
    model's): the CPU study trains each width at its own rate, lower for wider models; the GPU
    preset sizes its models by parameter target, not the CPU's fixed width."""
    studies = compose("scaling", [], "validate").compare.studies
    rate = {}
    for spec in studies.values():
        found = dict(o.split("=", 1) for o in spec.train)
        rate[int(found["arch.d_model"])] = float(found["train.lr"])
    assert len(rate) >= 3 and sorted(rate.values(), reverse=True) == [rate[w] for w in sorted(rate)]
    gpu = compose("scaling", [], "validate/gpu")
    assert gpu.arch.d_model == 0 and gpu.arch.n_layers == 0
    assert all(any(o.startswith("size.target=") for o in s.train)
               for s in gpu.compare.studies.values())


def test_mqar_cpu_grid_gives_each_backbone_one_tuned_rate() -> None:
    cfg = compose("mqar_width", [], "validate")
    assert set(cfg.compare.arch_overrides) == set(cfg.compare.backbones)
    assert cfg.train.stop_when.metric == "val_accuracy"
    gpu = compose("mqar_width", [], "validate/gpu")
    assert not any(gpu.compare.arch_overrides.values())  # every GPU cell sweeps the rates
    assert "train.lr=" in " ".join(gpu.compare.studies.mqar.train)


def test_command_line_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"validate.only=\['mqar'\] names \['mqar'\]"):
        selected(sorted(CPU_SET), ["mqar"], [])
    with pytest.raises(ConfigError, match="validate.claim is set by each"):
        split_args(["validate.claim=x"])
    with pytest.raises(ConfigError, match=r"\+preset=tpu"):
        split_args(["+preset=tpu"])
    preset, own, rest = split_args(["+preset=gpu", "validate.skip=[scaling]", "train.lr=1e-3"])
    assert (preset, own, rest) == ("gpu", {"skip": ["scaling"]}, ["train.lr=1e-3"])
    assert selected(sorted(CPU_SET), [], ["scaling"]) == sorted(CPU_SET - {"scaling"})


# ---- verdict rules on synthetic results --------------------------------------------------------

def _acc(task: str, arch: str, value: float, n: int = 1000, **train: Any) -> dict[str, Any]:
    params = {"seq_len": train.pop("test_len")} if "test_len" in train else {}
    return {"kind": "eval", "eval": task, "metric": "accuracy", "value": value, "n": n,
            "status": "ok", "arch": arch, "params": params, "train": train}


def _mqar(accs: dict[str, tuple[float, float]]) -> list[dict[str, Any]]:
    """accuracy at widths 64 and 128, at the better of two learning rates (the other: 0.1)."""
    out = []
    for arch, (small, large) in accs.items():
        for width, value in ((64, small), (128, large)):
            out.append(_acc("mqar", arch, value, d_model=width, lr=1e-3))
            out.append(_acc("mqar", arch, 0.1, d_model=width, lr=3e-3))
    return out


MQAR_PARAMS = {"solve": 0.9, "attention": ["transformer"], "gated": ["h3", "hyena"],
               "between": ["mamba", "rwkv7"]}


def test_mqar_rule() -> None:
    zoology = {"transformer": (0.99, 1.0), "h3": (0.3, 0.7), "hyena": (0.25, 0.6),
               "mamba": (0.8, 0.95), "rwkv7": (0.7, 0.9)}
    out = mqar_width(_mqar(zoology), [], MQAR_PARAMS)
    assert out.verdict == REPRODUCED, out.why
    assert "transformer 0.99 -> 1.00" in out.ours
    flat_hyena = {**zoology, "hyena": (0.3, 0.31)}  # no gain from width
    out = mqar_width(_mqar(flat_hyena), [], MQAR_PARAMS)
    assert out.verdict == NOT_REPRODUCED and "hyena improves with width" in out.why
    weak_attention = {**zoology, "transformer": (0.5, 1.0)}
    assert mqar_width(_mqar(weak_attention), [], MQAR_PARAMS).verdict == NOT_REPRODUCED
    assert mqar_width([], [], MQAR_PARAMS).verdict == NOT_RUN


def test_mqar_rule_recurrent_backbones_against_the_gated_convolutions() -> None:
    """Mamba and RWKV must not fall below the best gated convolution at the smallest width;
    matching attention there (RWKV-7) is allowed, and their larger width is not judged."""
    base = {"transformer": (0.95, 1.0), "hyena": (0.26, 0.85), "mamba": (0.27, 0.42),
            "rwkv7": (1.0, 1.0)}
    params = {**MQAR_PARAMS, "gated": ["hyena"]}
    out = mqar_width(_mqar(base), [], params)
    assert out.verdict == REPRODUCED, out.why
    weak_mamba = {**base, "mamba": (0.1, 0.9)}  # below hyena at width 64, beyond the noise
    out = mqar_width(_mqar(weak_mamba), [], params)
    assert out.verdict == NOT_REPRODUCED
    assert "mamba not below the gated convolutions at width 64" in out.why
    no_rwkv = {k: v for k, v in base.items() if k != "rwkv7"}
    out = mqar_width(_mqar(no_rwkv), [], params)
    assert out.verdict == NOT_REPRODUCED and "rwkv7 not below" in out.why


def test_task_pair_rule_uses_intervals() -> None:
    params = {"solver": "h3", "other": "s4d", "tasks": ["induction", "mqar"], "solve": 0.9}
    recs = [_acc(t, "h3", 0.98, lr=3e-3) for t in ("induction", "mqar")]
    good = recs + [_acc(t, "s4d", 0.4, lr=3e-3) for t in ("induction", "mqar")]
    assert task_pair(good, [], params).verdict == REPRODUCED
    # s4d just under the bar but within h3's interval on 30 answers: not a clear gap
    close = ([_acc(t, "h3", 0.93, n=30, lr=3e-3) for t in ("induction", "mqar")]
             + [_acc(t, "s4d", 0.87, n=30, lr=3e-3) for t in ("induction", "mqar")])
    out = task_pair(close, [], params)
    assert out.verdict == NOT_REPRODUCED and "below h3" in out.why


def test_length_extrapolation_rule() -> None:
    params = {"solver": "mamba", "fails": ["transformer", "gpt2"], "solve": 0.9,
              "fail_below": 0.5, "multiple": 16}
    recs = []
    for length in (32, 64, 128, 256, 512):
        recs.append(_acc("induction", "mamba", 1.0, seq_len=32, lr=1e-3, test_len=length))
        recs.append(_acc("induction", "transformer", 1.0 if length == 32 else 0.1, seq_len=32,
                         lr=1e-3, test_len=length))
    recs.append(_acc("induction", "gpt2", 1.0, seq_len=32, lr=1e-3, test_len=32))
    recs.append({"kind": "eval", "eval": "induction", "metric": "accuracy", "value": None,
                 "status": "not_supported", "reason": "learned absolute positions end at 64",
                 "arch": "gpt2", "params": {"seq_len": 512}, "train": {"seq_len": 32}})
    out = length_extrapolation(recs, [], params)
    assert out.verdict == REPRODUCED, out.why
    assert any("cannot read it" in c.evidence for c in out.checks)
    worse = [r for r in recs if not (r["arch"] == "mamba" and r["params"]["seq_len"] == 512)]
    worse.append(_acc("induction", "mamba", 0.3, seq_len=32, lr=1e-3, test_len=512))
    assert length_extrapolation(worse, [], params).verdict == NOT_REPRODUCED


def _mem(arch: str, context: int, nbytes: float, mixers: list[str]) -> dict[str, Any]:
    return {"kind": "bench", "mode": "memory", "arch": arch, "context": context,
            "status": "ok", "state_bytes_measured": nbytes,
            "config": {"arch": {"pattern": {"mixers": mixers}}}}


def test_decoding_memory_rule() -> None:
    params = {"linear": ["transformer", "hyena"], "flat": ["mamba"], "hybrid": "jamba",
              "reference": "transformer", "tolerance": 0.15}
    recs = []
    for ctx in (128, 2048):
        recs += [_mem("transformer", ctx, 1000.0 * ctx, ["attention"]),
                 _mem("hyena", ctx, 400.0 * ctx + 50, ["hyena"]),
                 _mem("mamba", ctx, 7777.0, ["mamba"]),
                 _mem("jamba", ctx, 125.0 * ctx + 3000, ["mamba*4", "attention", "mamba*3"])]
    out = decoding_memory(recs, [], params)
    assert out.verdict == REPRODUCED, out.why
    grown = [r if r["arch"] != "mamba" else {**r, "state_bytes_measured": float(r["context"])}
             for r in recs]
    out = decoding_memory(grown, [], params)
    assert out.verdict == NOT_REPRODUCED and "mamba state flat" in out.why


def test_loss_target_rule_and_a_failed_run() -> None:
    params = {"arch": "gpt2", "target": 1.88, "tolerance": 0.1}
    rec = {"kind": "eval", "eval": "bpb", "metric": "bpb", "arch": "gpt2", "value": 2.7,
           "windows": {"nats": [1.9 * 64] * 32, "tokens": [64] * 32}}
    assert loss_target([rec], [], params).verdict == REPRODUCED
    far = {**rec, "windows": {"nats": [2.3 * 64] * 32, "tokens": [64] * 32}}
    assert loss_target([far], [], params).verdict == NOT_REPRODUCED
    failed = Run(Path("x"), {"arch": "gpt2", "status": "failed",
                             "error": "could not download tinyshakespeare"})
    out = loss_target([], [failed], params)
    assert out.verdict == NOT_RUN and "could not download" in out.why


def test_scaling_rule() -> None:
    def run(arch: str, params: float, loss: float) -> Run:
        return Run(Path(f"{arch}{params:g}"), {
            "arch": arch, "status": "finished", "param_counts": {"active_non_embedding": params},
            "flops_per_token": {"train": 6 * params}, "tokens_seen": 1e5, "seed": 0,
            "final": {"loss": loss}, "config": {"data": {"source": "stdlib"}}})

    falls = [run("transformer", n, 3 * (n / 1e4) ** -0.3 + 1) for n in (1e4, 1e5, 1e6)]
    out = scaling_fit([], falls, {"reference": "transformer"})
    # no windows and one seed: the exponent is fitted but has no interval, so not claimed
    assert out.verdict == NOT_REPRODUCED and "no interval" in out.why
    recs = []
    for r in falls:
        loss = r.summary["final"]["loss"]
        recs.append({"kind": "eval", "eval": "bpb", "metric": "bpb", "ckpt": str(r.path),
                     "windows": {"nats": [loss * 100 * (1 + 0.01 * (i % 5 - 2))
                                          for i in range(40)], "tokens": [100] * 40}})
    assert scaling_fit(recs, falls, {"reference": "transformer"}).verdict == REPRODUCED
    out = scaling_fit(recs, falls, {"reference": "transformer",
                                    "backbones": ["transformer", "mamba"]})
    assert out.verdict == NOT_REPRODUCED and "mamba: finished runs at >= 3 sizes" in out.why


# ---- end to end, tiny ----------------------------------------------------------------------------

def test_validate_runs_and_resumes_tiny_reproductions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ARCHBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    argv = ["validate.only=[decoding_memory,h3_synthetics]",
            f"validate.sweep_root={tmp_path / 'sweeps'}", f"validate.out={tmp_path / 'out'}",
            "compare.backbones=[transformer,mamba,h3,s4d]", "arch.d_model=64",
            "bench.contexts=[16,64]", "train.tokens=512", "train.eval_every=8",
            "eval.n_examples=16"]
    main(argv)
    assert "report: " in capsys.readouterr().out
    rows = {r["name"]: r for r in json.loads((tmp_path / "out" / "validation.json").read_text())}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| claim | source | ours (95% interval) | verdict |" in report
    memory = rows["decoding_memory"]
    assert memory["verdict"] in (REPRODUCED, NOT_REPRODUCED)
    assert "transformer x4 " in memory["ours"]  # KV cache: 4x the bytes for 4x the context
    assert "mamba x1," in memory["ours"]  # a recurrent state: the same bytes at any context
    assert (tmp_path / "out" / "decoding_memory.png").is_file()
    synth = rows["h3_synthetics"]
    assert synth["verdict"] in (REPRODUCED, NOT_REPRODUCED)
    assert "induction: h3 0." in synth["ours"] and "assoc_recall: h3 " in synth["ours"]
    assert rows["mqar_width"]["verdict"] == NOT_RUN
    assert "validate.only" in rows["mqar_width"]["why"]
    main(argv)  # again: everything is done, nothing is run a second time
    capsys.readouterr()
    for name in ("decoding_memory", "h3_synthetics"):
        stages = [json.loads(x) for x in
                  (tmp_path / "sweeps" / name / "stages.jsonl").read_text().splitlines()]
        assert stages and all(s["status"] == "skipped" for s in stages), stages
