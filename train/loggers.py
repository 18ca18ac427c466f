"""Experiment tracking: none (default), MLflow or TensorBoard, behind one small interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class NullLogger:
    def log_params(self, params: dict[str, Any]) -> None:
        del params

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        del step, metrics

    def log_artifact(self, path: str | Path) -> None:
        del path

    def close(self, status: str = "FINISHED") -> None:
        del status


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


class MLflowLogger(NullLogger):
    """A local file store under the run directory unless logger.tracking_uri says otherwise."""

    def __init__(self, cfg: Any, run_dir: Path, run_name: str) -> None:
        import mlflow

        self.mlflow = mlflow
        uri = cfg.tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(cfg.experiment)
        self.run = mlflow.start_run(run_name=run_name)
        self.run_id = self.run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        flat = {k: str(v)[:500] for k, v in _flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            self.mlflow.log_params(dict(items[i : i + 100]))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path) -> None:
        self.mlflow.log_artifact(str(path))

    def close(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


class TensorBoardLogger(NullLogger):
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log_params(self, params: dict[str, Any]) -> None:
        text = "\n".join(f"{k}: {v}" for k, v in _flatten(params).items())
        self.writer.add_text("config", text)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), step)

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()


def make_logger(cfg: Any, run_dir: Path, run_name: str) -> NullLogger:
    if cfg.kind == "mlflow":
        return MLflowLogger(cfg, run_dir, run_name)
    if cfg.kind == "tensorboard":
        return TensorBoardLogger(run_dir)
    return NullLogger()
