"""Which algorithm made a result: name, version (package + git commit), the checkpoints' SHA-256, and a
device UID derived from them (the same models give the same observer device UID)."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import generate_uid

from cervspine import __version__

NAME = "cervspine"
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE (research software, not a medical device)"
SYNTHETIC_NOTE = "SYNTHETIC: made with models trained on generated data; says nothing about real CT"


def series_description(kind: str, synthetic: bool) -> str:
    """A result series' description (LO, ≤ 64 characters) with the notices a study browser shows."""
    text = f"{'SYNTHETIC ' if synthetic else ''}cervspine {kind} - NOT FOR DIAGNOSTIC USE"
    if len(text) > 64:
        raise ValueError(f"series description longer than 64 characters: {text!r}")
    return text


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    from cervspine.runs.info import git_commit

    return git_commit()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (cached per path, size and mtime)."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Algorithm:
    """The algorithm identification every result carries (TID 4019 in the SR, attributes elsewhere)."""

    version: str
    checkpoints: dict[str, str]  # role ("stage1", "stage2", "stage2[1]" …) → SHA-256
    name: str = NAME
    synthetic: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, predictor, *, synthetic: bool = False, notes: tuple[str, ...] = ()) -> Algorithm:
        """The identification of a :class:`cervspine.inference.Predictor`'s models."""
        commit = _git_commit()
        version = __version__ + (
            f" (git {commit[:12]}{'-dirty' if commit.endswith('-dirty') else ''})" if commit else ""
        )
        ckpts = {"stage1": file_sha256(predictor.stage1.checkpoint)}
        for i, member in enumerate(predictor.stage2):
            ckpts["stage2" if i == 0 else f"stage2[{i}]"] = file_sha256(member.checkpoint)
        return cls(version, ckpts, synthetic=synthetic, notes=tuple(notes))

    @property
    def device_uid(self) -> str:
        """A UID that names these models (stable across runs and machines)."""
        return str(generate_uid(entropy_srcs=[self.name, self.version, *sorted(self.checkpoints.values())]))

    def parameters(self) -> list[str]:
        """The SR's Algorithm Parameters: checkpoint hashes, the use notice, SYNTHETIC where it holds."""
        out = [f"{role} checkpoint sha256 {digest}" for role, digest in self.checkpoints.items()]
        out += [*self.notes, NOT_FOR_DIAGNOSIS]
        if self.synthetic:
            out.append(SYNTHETIC_NOTE)
        return out


def trained_on_synthetic(predictor) -> bool:
    """Whether any of the predictor's models was trained on a generated folder (the flag its checkpoint
    recorded; for older checkpoints, as far as the folder it names still exists here)."""
    from cervspine.io.rsna import trained_on_synthetic_data

    stages = [predictor.stage1, *predictor.stage2]
    return any(trained_on_synthetic_data(s.data_hp or {}) for s in stages)
