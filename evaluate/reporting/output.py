"""The report's output folder: written only where the builder owns it, cleaned of its own files.

`archbench report -o DIR` used to delete every `*.png` in DIR and overwrite `report.md`, whoever
had put them there. Now the builder writes only into a new or empty folder, or one that holds its
marker (`.archbench-report.json`, created with the first report there). The marker lists the
files the last build wrote; a rebuild removes those (a plot whose data is gone must not linger)
and nothing else.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from archbench.io import write_json_atomic

MARKER = ".archbench-report.json"


class ReportOutputError(ValueError):
    """The report cannot be written where it was asked to (a folder it does not own, no input)."""

    one_line = True


def claim(out: Path) -> list[str]:
    """Make sure the builder owns `out` (creating it or its marker); return the files the last
    build there wrote. Raises ReportOutputError for a folder with files it did not write."""
    out = Path(out)
    marker = out / MARKER
    if marker.is_file():
        try:
            return list(json.loads(marker.read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ReportOutputError(f"{marker} is unreadable; remove it only if every file in "
                                    f"{out} may be replaced by a report") from None
    if out.exists() and not out.is_dir():
        raise ReportOutputError(f"-o {out}: is a file, not a folder")
    if (earlier := _report_before_markers(out)) is not None:
        write_json_atomic(marker, {"files": earlier, "adopted": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return earlier
    if out.is_dir() and any(out.iterdir()):
        foreign = sorted(p.name for p in out.iterdir())[:5]
        raise ReportOutputError(
            f"-o {out}: the folder holds files archbench report did not write ({', '.join(foreign)}"
            f"{', ...' if len(list(out.iterdir())) > 5 else ''}); give a new or empty folder, or "
            "one an earlier `archbench report` wrote")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {"files": [], "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return []


def _report_before_markers(out: Path) -> list[str] | None:
    """A folder an archbench report wrote before markers existed (its report.md says so): its
    files are report.md, records.csv and the plots report.md shows, nothing else."""
    report = out / "report.md"
    if not report.is_file():
        return None
    text = report.read_text(errors="replace")
    if not any(line.startswith("Generated ") and "`archbench " in line
               for line in text.splitlines()[:6]):
        return None
    plots = re.findall(r"!\[[^\]]*\]\(([^)/]+\.png)\)", text)
    return sorted({"report.md", "records.csv", *plots})


def remove_previous(out: Path, previous: list[str]) -> None:
    """Delete what the last build wrote (only plain file names, only inside `out`)."""
    for name in previous:
        path = Path(out) / name
        if "/" not in name and name != MARKER and path.is_file():
            path.unlink()


def record(out: Path, written: list[Path]) -> None:
    write_json_atomic(Path(out) / MARKER, {
        "files": sorted({p.name for p in written}),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})


def check_inputs(paths: list[str | Path]) -> None:
    """Every input must exist: a typo would otherwise give an empty report and exit 0."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise ReportOutputError(f"no such file or folder: {', '.join(missing)}")
