"""Checks on a received series before any pixel is decoded: every instance of one patient, one study and
one series (a series that mixes patients or studies is refused as a whole — its results would go into
someone's record). Reasons name counts and UIDs, never a PatientID."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pydicom

IDENTITY = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")


def identity_problem(files: list[Path]) -> str | None:
    """Why the instances in ``files`` are not one patient's one series of one study (None: they are)."""
    seen: dict[str, Counter[str]] = {k: Counter() for k in IDENTITY}
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=list(IDENTITY))
        except Exception as e:
            return f"{f.name}: cannot read the DICOM header ({type(e).__name__})"
        for k in IDENTITY:
            seen[k][str(ds.get(k, "") or "")] += 1
    problems = []
    for k in IDENTITY:
        if len(seen[k]) > 1:
            counts = sorted(seen[k].values(), reverse=True)
            which = "" if k == "PatientID" else f" {sorted(seen[k])}"
            problems.append(
                f"{k} differs between its instances ({len(seen[k])} values{which}: {counts} instances)"
            )
    if not problems:
        return None
    return "mixed identity: " + "; ".join(problems) + ": the whole series is refused"
