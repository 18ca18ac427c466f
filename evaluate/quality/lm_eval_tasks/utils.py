"""Loaders for the local lm-eval tasks: data files next to this file, no network, no cache.

The data files are written by `archbench-lm-eval write-tasks`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load_docs(file: str, **_: Any) -> dict[str, Any]:
    """{"test": Dataset} from a JSONL file of this folder (model_args arrive as extra kwargs)."""
    import datasets

    path = HERE / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; write it with "
                                "`archbench-lm-eval write-tasks`")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def doc_text(doc: dict[str, Any]) -> str:
    return doc["text"]


def doc_context(doc: dict[str, Any]) -> str:
    return doc["context"]


def doc_answer(doc: dict[str, Any]) -> str:
    return doc["answer"]
