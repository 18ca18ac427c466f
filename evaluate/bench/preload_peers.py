"""Imported once by the benchmark's fork server when bench.peers=true, so that every peer
measurement forks with the (slow to import) peer libraries already loaded; nothing here runs."""

from __future__ import annotations

import contextlib

for _module in ("transformers.models.llama.modeling_llama",
                "transformers.models.mamba.modeling_mamba",
                "transformers.models.mamba2.modeling_mamba2"):
    with contextlib.suppress(Exception):
        __import__(_module)
