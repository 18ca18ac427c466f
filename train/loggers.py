"""Experiment tracking: none (default), MLflow or TensorBoard, behind one small interface.

The run directory stays the source of truth (metrics.jsonl, summary.json, records.jsonl); a
tracker is a view of it for browsing and comparing runs. Only rank 0 of a distributed run makes a
real logger (the trainer gives the other ranks a NullLogger).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

# MLflow limits (mlflow.utils.validation): values of at most 6000 characters, 100 params and
# 1000 metrics per batch call.
_PARAM_VALUE_LIMIT = 6000
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000


class NullLogger:
    def log_params(self, params: dict[str, Any]) -> None:
        del params

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        del step, metrics

    def log_artifact(self, path: str | Path) -> None:
        del path

    def close(self, status: str = "FINISHED") -> None:
        del status


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}: trackers take flat key/value params."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """Trackers store numbers only; a None (a metric that does not apply) is left out."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))
            and not isinstance(v, bool)}


def default_tracking_uri(folder: Path) -> str:
    """A local MLflow file store in `folder`/mlruns. MLflow 3 keeps the file backend in
    maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE is set; it needs no server
    and no database, so it is what a run directory gets unless logger.tracking_uri names another
    store (sqlite:///..., http://...)."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (folder / "mlruns").resolve().as_uri()


def _mlflow_client(uri: str, experiment: str) -> tuple[Any, str]:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return client, found.experiment_id
    try:
        return client, client.create_experiment(experiment)
    except MlflowException:  # another job of the sweep created it first: use that one
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return client, found.experiment_id


class MLflowLogger(NullLogger):
    """One MLflow run per training attempt: params from the resolved config, metrics per step,
    the run's summary, metrics and records as artifacts. Talks to the store through an explicit
    client, so no global "active run" leaks between runs of one process (the basic launcher)."""

    def __init__(self, cfg: Any, run_dir: Path, run_name: str) -> None:
        self.tracking_uri = cfg.tracking_uri or default_tracking_uri(run_dir)
        self.client, self.experiment_id = _mlflow_client(self.tracking_uri, cfg.experiment)
        tags = {"archbench.run_dir": str(run_dir.resolve())}
        self.run_id = self.client.create_run(self.experiment_id, run_name=run_name,
                                             tags=tags).info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:_PARAM_VALUE_LIMIT]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=flat[i : i + _PARAMS_PER_BATCH])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in _numeric(metrics).items()]
        for i in range(0, len(batch), _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i : i + _METRICS_PER_BATCH])

    def log_artifact(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
        else:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


class TensorBoardLogger(NullLogger):
    """Scalars per step under run_dir/tensorboard; the config and JSON artifacts as text."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = run_dir / "tensorboard"
        self.writer = SummaryWriter(str(self.log_dir))

    def log_params(self, params: dict[str, Any]) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in flatten(params).items())  # markdown code
        self.writer.add_text("config", text)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in _numeric(metrics).items():
            self.writer.add_scalar(key, value, step)

    def log_artifact(self, path: str | Path) -> None:
        """TensorBoard has no artifact store: a JSON file (the summary) is shown as text; other
        files stay in the run directory next to the event files."""
        path = Path(path)
        if path.suffix == ".json" and path.is_file():
            body = json.dumps(json.loads(path.read_text()), indent=2, default=str)
            self.writer.add_text(path.stem, "\n".join("    " + line for line in body.splitlines()))

    def close(self, status: str = "FINISHED") -> None:
        del status
        self.writer.close()


def make_logger(cfg: Any, run_dir: Path, run_name: str) -> NullLogger:
    if cfg.kind == "mlflow":
        return MLflowLogger(cfg, run_dir, run_name)
    if cfg.kind == "tensorboard":
        return TensorBoardLogger(run_dir)
    if cfg.kind == "none":
        return NullLogger()
    raise ValueError(f"logger.kind={cfg.kind!r} is not one of none, mlflow, tensorboard")


def log_report(cfg: Any, report_dir: str | Path) -> str | None:
    """Attach a built report (Markdown, plots, CSV) to the tracker as the artifacts of one run
    named after the report folder; returns the MLflow run id (None for other loggers).

    With no logger.tracking_uri the store is `report_dir`/mlruns, next to the report."""
    if cfg.kind != "mlflow":
        return None
    report_dir = Path(report_dir)
    logger = MLflowLogger(cfg, report_dir, f"report:{report_dir.name}")
    try:
        for path in sorted(report_dir.iterdir()):
            if path.name != "mlruns":
                logger.log_artifact(path)
    except Exception:
        logger.close("FAILED")
        raise
    logger.close("FINISHED")
    return logger.run_id
