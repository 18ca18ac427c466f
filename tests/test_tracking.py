"""Experiment tracking, read back with each tracker's own reader: MLflow's client over a real local
file store, TensorBoard's event reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_config
from omegaconf import OmegaConf

from archbench.train.loggers import default_tracking_uri, log_report
from archbench.train.trainer import run_training

TINY = ("data.max_bytes=300000", "data.val_fraction=0.1", "arch.d_model=32", "arch.n_layers=2",
        "arch.attention.head_dim=16", "train.batch_size=4", "train.seq_len=16",
        "train.max_steps=3", "train.log_every=1", "train.eval_every=3", "train.eval_batches=1",
        "train.progress=false", "train.device=cpu")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _only_run(uri: str, experiment: str = "archbench"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_mlflow_run_params_metrics_and_artifacts_read_back(cache_env: Path,
                                                           tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_training(make_config(*TINY, "logger=mlflow"), run_dir)
    assert (run_dir / "mlruns").is_dir()  # the default store lives in the run directory
    client, run = _only_run(default_tracking_uri(run_dir))
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["train.seq_len"] == "16" and params["arch.name"] == "transformer"
    assert params["arch.pattern.mixers"] == "['attention']" and params["logger.kind"] == "mlflow"

    logged = _metrics(run_dir)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [r["step"] for r in logged if "loss" in r] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in logged if "loss" in r])
    [val] = client.get_metric_history(run.info.run_id, "val_bpb")
    assert val.step == 3 and val.value == pytest.approx(logged[-1]["val_bpb"])

    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.jsonl", "records.jsonl"} <= names
    local = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == json.loads((run_dir / "summary.json").read_text())


def test_mlflow_any_tracking_uri_and_failed_runs(cache_env: Path, tmp_path: Path) -> None:
    store = (tmp_path / "shared_store").as_uri()
    run_dir = tmp_path / "broken"
    with pytest.raises(ValueError, match="max_position"):
        run_training(make_config(*TINY, "logger=mlflow", f"logger.tracking_uri={store}",
                                 "logger.experiment=sweep", "arch.attention.position=learned",
                                 "arch.attention.max_position=8"), run_dir)
    assert not (run_dir / "mlruns").exists()  # the configured store was used instead
    client, run = _only_run(store, "sweep")
    assert run.info.status == "FAILED"
    local = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    summary = json.loads(Path(local).read_text())
    assert summary["status"] == "failed" and "max_position=8" in summary["error"]


def test_mlflow_report_artifacts(tmp_path: Path) -> None:
    report = tmp_path / "report"
    (report / "plots").mkdir(parents=True)
    (report / "report.md").write_text("# results\n")
    (report / "plots" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    cfg = OmegaConf.create({"kind": "mlflow", "tracking_uri": None, "experiment": "reports"})
    run_id = log_report(cfg, report)
    client, run = _only_run(default_tracking_uri(report), "reports")
    assert run.info.run_id == run_id and run.info.run_name == "report:report"
    assert {a.path for a in client.list_artifacts(run_id)} == {"report.md", "plots"}
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/loss.png"]
    assert log_report(OmegaConf.create({"kind": "none"}), report) is None


def test_tensorboard_scalars_read_back(cache_env: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run_training(make_config(*TINY, "logger=tensorboard"), run_dir)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    logged = [(r["step"], r["loss"]) for r in _metrics(run_dir) if "loss" in r]
    assert [s for s, _ in losses] == [s for s, _ in logged] == [1, 2, 3]
    assert [v for _, v in losses] == pytest.approx([v for _, v in logged], rel=1e-6)
    assert [e.step for e in events.Scalars("val_loss")] == [3]
    assert {"config/text_summary", "summary/text_summary"} <= set(events.Tags()["tensors"])


def test_no_logger_by_default(cache_env: Path, tmp_path: Path) -> None:
    cfg = make_config(*TINY, "train.max_steps=1")
    assert cfg.logger.kind == "none"
    run_training(cfg, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoints", "metrics.jsonl", "records.jsonl", "summary.json"]
