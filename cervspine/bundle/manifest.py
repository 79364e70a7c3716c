"""A bundle's manifest (``manifest.json``): what inference needs besides the graphs, versioned, with the
SHA-256 of every file. A bundle whose manifest is of another version, or whose files are missing or do not
match their checksums, is refused with a :class:`BundleError` naming the file or the versions; so is a
bundle holding a file the manifest does not list with its checksum, and a manifest naming a file outside
the bundle (an absolute path, ``..``, a link out of it) or one it does not list (:func:`member`).

Schema (version 1)::

    format, version, created, cervspine {version, git_commit}, exported_with {torch, onnx, opset}
    export_check           per graph file: max_abs_diff of ONNX Runtime vs the torch module on the
                           export's example inputs (uniform noise), its tolerance: 1e-4, or where the
                           module is ill-conditioned there, 10× its sensitivity (the change of its
                           outputs when the inputs move by ~2 float32 ulps), recorded under sensitivity
    image_size             the cache size studies are read at (the stages' training caches)
    synthetic              the models were trained on generated data
    stage1                 a stage (below), kind "slice" | "column"
    stage2                 [stage, …], kind "slice" | "sequence"; several: an ensemble
    ensemble               {members, rule}
    operating_point        the run's operating point (OperatingPoint.as_dict()) or null
    model_card             "MODEL_CARD.md"
    checkpoints            {stage1, stage2: [...]} file names inside the bundle, or null (not included)
    files                  {name: {sha256, bytes}} for every other file of the bundle

    stage: kind, model_class, backbone, source {checkpoint, sha256}, graphs {role: {file, inputs, outputs}},
           inputs {spec name: the resolved input settings (windows in HU, 2.5D offsets, sizes, crops)},
           slice stage 2 also aggregation, calibration {applies, params, shrink}, prior;
           sequence stage 2 also prior (its logit shift is inside the graph)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

FORMAT = "cervspine-bundle"
VERSION = 1
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A bundle that cannot be used as it is (its message names the file or the version)."""


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256(path), "bytes": path.stat().st_size}


def jsonable(value: Any) -> Any:
    """Tuples → lists, numpy scalars/arrays → Python values (what json.dumps takes)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def spec_record(spec: Any, **derived: Any) -> dict[str, Any]:
    """A frozen input-settings dataclass as JSON (its fields, plus ``derived`` values for the reader)."""
    return jsonable({**asdict(spec), **derived})


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def spec_from(cls: type, record: dict[str, Any]) -> Any:
    """The dataclass ``cls`` back from :func:`spec_record`'s JSON (derived values ignored)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: _tuples(v) for k, v in record.items() if k in names})


def write_manifest(bundle: Path, manifest: dict[str, Any]) -> Path:
    """``manifest.json`` with the checksum of every file already in ``bundle`` (but itself)."""
    files = sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {**manifest, "files": {p.relative_to(bundle).as_posix(): file_entry(p) for p in files}}
    path = bundle / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(jsonable(manifest), indent=2) + "\n")
    tmp.replace(path)
    return path


def read_manifest(bundle: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """The manifest of ``bundle``, refused (:class:`BundleError`) when it is not a bundle of this version or
    (``verify``) when a file it lists is missing or differs from its checksum."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(
            f"{bundle}: not a model bundle (no {MANIFEST}; python -m cervspine.export writes one)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a {FORMAT} manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise BundleError(
            f"{path}: bundle manifest version {manifest.get('version')!r}, but this cervspine "
            f"{_own_version()} reads version {VERSION} only: export the run again with this version "
            "(python -m cervspine.export run_dir=R out=DIR) or use the cervspine that wrote it "
            f"({manifest.get('cervspine', {}).get('version', '?')})"
        )
    if verify:
        verify_files(bundle, manifest)
    return manifest


def _confined(bundle: Path, name: Any) -> Path:
    """``bundle/name`` if ``name`` is a relative path that stays inside the bundle (links resolved)."""
    text = str(name)
    parts = Path(text).parts
    if not text or Path(text).is_absolute() or ".." in parts or "\\" in text:
        raise BundleError(f"{bundle}: the manifest names {text!r}, a path outside the bundle: refused")
    path = bundle / text
    try:
        path.resolve().relative_to(bundle.resolve())
    except ValueError:
        raise BundleError(f"{path}: leads outside the bundle (a link?): refused") from None
    return path


def member(bundle: str | Path, manifest: dict[str, Any], name: Any) -> Path:
    """The bundle's file ``name`` as the manifest names it (a graph, a checkpoint, the model card): a
    relative path inside the bundle that the manifest lists with its checksum, else :class:`BundleError`."""
    bundle = Path(bundle)
    path = _confined(bundle, name)
    if str(name) not in (manifest.get("files") or {}):
        raise BundleError(f"{path}: named by the manifest but not listed with its checksum: refused")
    return path


def referenced(manifest: dict[str, Any]) -> list[str]:
    """Every file name the manifest refers to outside ``files``: graphs, checkpoints, the model card."""
    names = []
    for stage in [manifest.get("stage1") or {}, *(manifest.get("stage2") or [])]:
        names += [g["file"] for g in (stage.get("graphs") or {}).values()]
    ckpts = manifest.get("checkpoints") or {}
    names += [ckpts["stage1"]] if ckpts.get("stage1") else []
    names += list(ckpts.get("stage2") or [])
    names += [manifest["model_card"]] if manifest.get("model_card") else []
    return names


def verify_files(bundle: Path, manifest: dict[str, Any]) -> None:
    """Every listed file inside the bundle, present and matching its checksum; no file the manifest does
    not list; every file it refers to listed."""
    listed = manifest.get("files") or {}
    for name in referenced(manifest):
        member(bundle, manifest, name)
    extra = sorted(
        p.relative_to(bundle).as_posix()
        for p in bundle.rglob("*")
        if (p.is_file() or p.is_symlink())
        and p.name != MANIFEST
        and p.relative_to(bundle).as_posix() not in listed
    )
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise BundleError(
            f"{bundle}: holds {', '.join(extra[:3])}{more}, not listed in the manifest with a checksum: "
            "refused (export the bundle again, or remove what was added to it)"
        )
    for name, entry in listed.items():
        f = _confined(bundle, name)
        if not f.is_file():
            raise BundleError(f"{f}: listed in the bundle's manifest but missing")
        got = sha256(f)
        if got != entry.get("sha256"):
            raise BundleError(
                f"{f}: sha256 {got[:16]}… does not match the manifest's {str(entry.get('sha256'))[:16]}… "
                "(the file was changed or damaged after export): refused"
            )


def _own_version() -> str:
    from cervspine import __version__

    return __version__
