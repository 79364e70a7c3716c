"""``make kaggle-kit RUN=<run dir> OUT=<dir>`` (``python -m cervspine.kaggle.kit RUN OUT``): a folder to
upload as a Kaggle dataset, for the competition's notebooks that run without internet.

::

    OUT/kaggle_predict.py   writes /kaggle/working/submission.csv (installs cervspine from wheels/ first)
    OUT/wheels/             cervspine + every dependency but the excluded (torch, torchvision: Kaggle has
                            them), pinned to the versions installed here, for pip install --no-index;
                            also torch's own small dependencies (not its CUDA runtime), used only where
                            the image's are missing or too old
    OUT/wheels/requirements.txt  every wheel pinned with its SHA-256: the script installs with pip
                            --require-hashes (a changed wheel is refused; the exact versions packed)
    OUT/models/             the run's evaluated checkpoints (training state stripped), its
                            operating_point.json, metrics.json and model card
    OUT/kit.json            what is where: models, pins, python, checksums, the source run
    OUT/README.md           the notebook cell

The wheels are those of this interpreter's platform (``--python-version``/``--platform`` fetch binary
wheels for another, e.g. Kaggle's Python where it differs). Building them needs the package index (or a
pip cache / mirror); ``--no-wheels`` writes the rest (for a Kaggle image that already has the packages).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
DEFAULT_EXCLUDE = (
    "torch",
    "torchvision",
)  # in every Kaggle image (CUDA builds); a wheel of ours would not do
PROJECT_DIR = Path(__file__).resolve().parents[2]
KEEP_KEYS = ("state_dict", "hyper_parameters", "hparams_name", "datamodule_hyper_parameters",
             "datamodule_hparams_name", "model_class", "pytorch-lightning_version", "epoch",
             "global_step")  # fmt: skip
RUN_FILES = ("operating_point.json", "metrics.json", "MODEL_CARD.md")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(
    dist: str = "cervspine",
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    python_version: str | None = None,
    companions: bool = True,
) -> list[str]:
    """``name==version`` of every distribution ``dist`` needs (its core requirements, transitively,
    markers evaluated for ``python_version``), as installed here, the excluded ones left out. With
    ``companions``, also what the excluded ones need but the GPU runtime (nvidia-*, cuda-*, triton): small
    wheels pip takes only where the image's own are missing or too old (torch's setuptools>=77, say)."""
    pins = _closure(dist, exclude, python_version)
    if companions:
        for name in exclude:
            try:
                metadata.distribution(name)
            except metadata.PackageNotFoundError:
                continue
            extra = _closure(name, exclude, python_version)
            pins.update({n: v for n, v in extra.items() if not n.startswith(GPU_RUNTIME)})
    return [f"{n}=={v}" for n, v in sorted(pins.items())]


GPU_RUNTIME = ("nvidia-", "cuda-", "triton")  # the image's CUDA stack: never packed


def _closure(dist: str, exclude: tuple[str, ...], python_version: str | None) -> dict[str, str]:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = default_environment()
    if python_version:
        env.update(python_version=python_version, python_full_version=f"{python_version}.0")
    skip = {canonical(n) for n in exclude}
    pins: dict[str, str] = {}
    todo, seen = [(canonical(dist), "")], set()  # (distribution, one of the extras asked of it)
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        for text in _requires(name):
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
                continue
            if extra and (req.marker is None or "extra" not in str(req.marker)):
                continue  # an extra's pass adds only what that extra asks for
            dep = canonical(req.name)
            if dep in skip or dep == canonical(dist):
                continue
            if dep not in pins:
                try:
                    pins[dep] = metadata.version(dep)
                except metadata.PackageNotFoundError:
                    raise RuntimeError(f"{name} needs {req}, which is not installed here") from None
            todo += [(dep, ""), *((dep, canonical(e)) for e in req.extras)]
    return pins


def _requires(name: str) -> list[str]:
    """A distribution's requirements: cervspine's from the pyproject.toml it is packed from (the metadata
    of an editable install can be older), the others' from their installed metadata."""
    if name == "cervspine" and (PROJECT_DIR / "pyproject.toml").is_file():
        try:
            import tomllib  # Python 3.11+
        except ImportError:
            tomllib = None
        if tomllib is not None:
            project = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())["project"]
            return list(project["dependencies"])
    try:
        return list(metadata.distribution(name).requires or [])
    except metadata.PackageNotFoundError:
        raise RuntimeError(f"{name} is needed but not installed here: install it, or --exclude it") from None


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args]


def fetch_wheels(
    pins: list[str], dest: Path, python_version: str | None = None, plat: str | None = None
) -> None:
    """A wheel of each pin in ``dest``: this platform's (built from the sdist where there is no wheel), or
    the binary wheels of ``python_version``/``plat``; a pin without one is built here only where that
    gives a pure-Python wheel (portable), else it is an error naming it (build the kit with that Python)."""
    dest.mkdir(parents=True, exist_ok=True)
    if not (python_version or plat):
        subprocess.run(_pip("wheel", "--no-deps", "-q", "-w", str(dest), *pins), check=True)
        return
    target = [*(["--python-version", python_version] if python_version else []),
              *(["--platform", plat] if plat else []), "--implementation", "cp"]  # fmt: skip
    for pin in pins:
        got = subprocess.run(
            _pip("download", "--no-deps", "-q", "--only-binary=:all:", "-d", str(dest), *target, pin)
        )
        if got.returncode == 0:
            continue
        with tempfile.TemporaryDirectory(prefix="cervspine-kit-") as tmp:
            subprocess.run(_pip("wheel", "--no-deps", "-q", "-w", tmp, pin), check=True)
            (built,) = Path(tmp).glob("*.whl")
            if not built.name.endswith(("-py3-none-any.whl", "-py2.py3-none-any.whl")):
                raise RuntimeError(
                    f"{pin} has no wheel for Python {python_version or 'here'} on {plat or 'this platform'} "
                    f"and builds only for this interpreter ({built.name}): build the kit with that Python "
                    "(its venv: make kaggle-kit PYTHON=… or VENV=…), or pin another version"
                )
            log.warning("%s: no binary wheel for the target; built %s here", pin, built.name)
            shutil.move(str(built), dest / built.name)


def project_wheel(dest: Path, project: Path = PROJECT_DIR) -> Path:
    """cervspine's own wheel, built from a copy of the source tree this module runs from (the build leaves
    nothing in the tree)."""
    if not (project / "pyproject.toml").is_file():
        raise RuntimeError(f"{project}: no pyproject.toml (cervspine packs itself from its source tree)")
    for old in dest.glob("cervspine-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="cervspine-wheel-") as tmp:
        src = Path(tmp) / "src"
        skip = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(project / "cervspine", src / "cervspine", ignore=skip)
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (project / name).is_file():
                shutil.copy2(project / name, src / name)
        isolation = ["--no-build-isolation"] if _has_setuptools() else []  # this setuptools: no index needed
        subprocess.run(_pip("wheel", "--no-deps", "-q", *isolation, "-w", str(dest), str(src)), check=True)
    (wheel,) = dest.glob("cervspine-*.whl")
    return wheel


def _has_setuptools() -> bool:
    try:
        import setuptools  # noqa: F401
    except ImportError:
        return False
    return True


def run_models(run_dir: Path) -> tuple[Path, list[Path]]:
    """The checkpoints a run's evaluation used (metrics.json: the operating point is theirs), else the
    best of its stage folders."""
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        s1, s2 = m.get("stage1_ckpt"), m.get("stage2_ckpt")
        s2 = [s2] if isinstance(s2, str) else s2
        if s1 and s2 and all(Path(p).is_file() for p in [s1, *s2]):
            return Path(s1), [Path(p) for p in s2]
    from cervspine.runs.layout import stage_checkpoints

    s1, s2 = stage_checkpoints(run_dir)
    return s1, s2 if isinstance(s2, list) else [s2]


def strip_checkpoint(src: Path, dst: Path) -> None:
    """``src`` without its training state (optimizer, schedulers, loops, callbacks): what inference reads."""
    import torch

    from cervspine.models.safe_load import load_checkpoint

    ckpt = load_checkpoint(src)
    torch.save({k: ckpt[k] for k in KEEP_KEYS if k in ckpt}, dst)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Kit:
    folder: Path
    manifest: dict[str, Any]

    @property
    def size_mb(self) -> float:
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file()) / 1e6


def build_kit(
    run_dir: str | Path,
    out: str | Path,
    *,
    wheels: bool = True,
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    python_version: str | None = None,
    plat: str | None = None,
) -> Kit:
    """Write the kit of ``run_dir`` (a pipeline run folder) into ``out`` (emptied first if it is a kit)."""
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"RUN={run_dir}: no such run folder")
    if out.exists() and any(out.iterdir()) and not (out / "kit.json").is_file():
        raise FileExistsError(f"OUT={out} exists and is not a kit: give an empty or new folder")
    shutil.rmtree(out, ignore_errors=True)
    (out / "models").mkdir(parents=True)
    stage1, stage2 = run_models(run_dir)
    models: dict[str, Any] = {"stage1": "models/stage1.ckpt", "stage2": []}
    strip_checkpoint(stage1, out / models["stage1"])
    for k, ckpt in enumerate(stage2):
        name = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else f"stage2_{k}"
        rel = (
            f"models/{name}.ckpt"
            if f"models/{name}.ckpt" not in models["stage2"]
            else f"models/{name}_{k}.ckpt"
        )
        strip_checkpoint(ckpt, out / rel)
        models["stage2"].append(rel)
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out / "models" / name)
    shutil.copy2(Path(__file__).with_name("kaggle_predict.py"), out / "kaggle_predict.py")

    pins = requirements(exclude=exclude, python_version=python_version)
    version = metadata.version("cervspine")
    if wheels:
        fetch_wheels(pins, out / "wheels", python_version, plat)
        project_wheel(out / "wheels")
        write_hashed_requirements(out / "wheels", {p.split("==")[0] for p in pins} | {"cervspine"})
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    manifest = {
        "format": 1,
        "cervspine": version,
        "git_commit": _git_commit(),
        "source_run": str(run_dir.resolve()),
        "source_checkpoints": {"stage1": str(stage1), "stage2": [str(p) for p in stage2]},
        "models": models,
        "python": python_version or f"{sys.version_info.major}.{sys.version_info.minor}",
        "platform": plat or platform.machine(),
        "excluded": list(exclude),
        "requirements": pins,
        "install": "pip install --no-index --find-links wheels --require-hashes -r wheels/requirements.txt"
        if wheels
        else None,
        "sha256": {f: _sha256(out / f) for f in files if f.startswith("models/")},
    }
    (out / "kit.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "README.md").write_text(_readme(manifest))
    return Kit(out, manifest)


HASHED_REQUIREMENTS = "requirements.txt"


def write_hashed_requirements(wheels: Path, names: set[str]) -> Path:
    """``wheels/requirements.txt``: ``name==version --hash=sha256:…`` for each wheel in ``wheels`` whose
    distribution is in ``names`` — for the kit, every wheel it packs: pip's --require-hashes mode needs a
    hash for whatever it installs, torch's own small dependencies included, so the kit installs exactly the
    versions it was built and tested with."""
    wanted = {canonical(n) for n in names}
    lines = []
    for whl in sorted(wheels.glob("*.whl")):
        dist, version = whl.name.split("-")[:2]
        if canonical(dist) in wanted:
            lines.append(f"{canonical(dist)}=={version} --hash=sha256:{_sha256(whl)}")
    path = wheels / HASHED_REQUIREMENTS
    path.write_text("\n".join(lines) + "\n")
    return path


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(PROJECT_DIR), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _readme(manifest: dict[str, Any]) -> str:
    members = ", ".join(Path(p).stem for p in manifest["models"]["stage2"])
    install = manifest["install"] or "no wheels in this kit: cervspine must be installed"
    return f"""# cervspine {manifest["cervspine"]}: offline inference kit (RSNA 2022 cervical spine fractures)

Upload this folder as a Kaggle dataset, add it and the competition's data to a notebook (internet off), and
run one cell:

    !python /kaggle/input/<this dataset>/kaggle_predict.py

It installs cervspine from `wheels/` (`{install}`; the image's own torch and torchvision are
used) and writes `/kaggle/working/submission.csv` from
`/kaggle/input/rsna-2022-cervical-spine-fracture-detection/test.csv` (`--data`, `--out`, `--device`,
`--limit`: `--help`). Models: stage 1 and stage 2 {members} (`models/`, from {manifest["source_run"]}).
Wheels for Python {manifest["python"]} on {manifest["platform"]}.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cervspine.kaggle.kit", description=__doc__.splitlines()[0]
    )
    parser.add_argument("run_dir", type=Path, help="a pipeline run folder (outputs/pipeline/<job>)")
    parser.add_argument("out", type=Path, help="the kit folder to write")
    parser.add_argument("--no-wheels", action="store_true", help="models and script only")
    parser.add_argument(
        "--exclude", nargs="*", default=list(DEFAULT_EXCLUDE), help="packages Kaggle's image has"
    )
    parser.add_argument("--python-version", default=None, help="wheels for another Python, e.g. 3.10")
    parser.add_argument(
        "--platform", default=None, help="wheels for another platform, e.g. manylinux2014_x86_64"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    kit = build_kit(args.run_dir, args.out, wheels=not args.no_wheels, exclude=tuple(args.exclude),
                    python_version=args.python_version, plat=args.platform)  # fmt: skip
    n = len(list((kit.folder / "wheels").glob("*.whl")))
    print(
        f"kaggle kit: {kit.folder} ({kit.size_mb:.0f} MB, {n} wheels, "
        f"{len(kit.manifest['models']['stage2'])} stage-2 member(s)); upload it as a Kaggle dataset, then: "
        "!python /kaggle/input/<dataset>/kaggle_predict.py"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
