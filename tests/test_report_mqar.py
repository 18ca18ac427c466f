"""The MQAR table's "best learning rate per cell" pools seeds: the best single seed is luck."""

from archbench.evaluate.reporting.quality import _pooled_best
from archbench.evaluate.stats import wilson


def _rec(value: float, lr: float, seed: int, n: int = 100) -> dict:
    return {"value": value, "n": n, "train": {"lr": lr, "seed": seed, "d_model": 64},
            "params": {"num_kv_pairs": 8, "seq_len": 64}}


def test_the_best_rate_is_chosen_on_pooled_seeds_not_the_luckiest_run() -> None:
    recs = [_rec(0.90, 1e-3, 0), _rec(0.50, 1e-3, 1), _rec(0.80, 3e-3, 0), _rec(0.80, 3e-3, 1)]
    best = _pooled_best(recs, lambda r: r["params"]["num_kv_pairs"])
    cell = best[8]
    assert cell["lr"] == 3e-3
    assert cell["n"] == 200 and cell["runs"] == 2
    assert cell["value"] == 0.8
    assert cell["interval"] == wilson(160, 200)


def test_pooled_accuracy_weights_runs_by_answers_scored() -> None:
    recs = [_rec(1.0, 1e-3, 0, n=300), _rec(0.0, 1e-3, 1, n=100)]
    cell = _pooled_best(recs, lambda r: "cell")["cell"]
    assert cell["value"] == 0.75
    assert cell["interval"].low < 0.75 < cell["interval"].high


def test_runs_without_scored_answers_are_left_out() -> None:
    recs = [_rec(1.0, 1e-3, 0, n=0), _rec(0.5, 1e-3, 1, n=10)]
    assert _pooled_best(recs, lambda r: "cell")["cell"]["n"] == 10
