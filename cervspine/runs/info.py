"""What a run records about itself: resolved config, git commit, data fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree

from cervspine.io.atomic import write_json_atomic


def git_commit() -> str | None:
    """HEAD of the cervspine checkout (with -dirty when modified), or None outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def data_fingerprint(root: str | Path) -> str | None:
    """Hash of the folder's CSV contents and the names/sizes of its study folders and segmentations."""
    root = Path(root)
    if not root.is_dir():
        return None
    h = hashlib.sha1()
    for csv in sorted(root.glob("*.csv")):
        h.update(csv.name.encode())
        h.update(csv.read_bytes())
    for sub in ("train_images", "test_images", "segmentations"):
        d = root / sub
        if d.is_dir():
            for p in sorted(d.iterdir()):
                n = sum(1 for _ in p.iterdir()) if p.is_dir() else p.stat().st_size
                h.update(f"{sub}/{p.name}:{n}\n".encode())
    return h.hexdigest()


def config_tree(cfg: DictConfig) -> Tree:
    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        branch = tree.add(str(key), style="bold")
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(Syntax(text, "yaml"))
    return tree


def save_run_info(
    cfg: DictConfig, output_dir: str | Path, extra: dict[str, Any] | None = None, print_config: bool = True
) -> dict[str, Any]:
    """Write config_tree.log, resolved_config.yaml and run_info.json into ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tree = config_tree(cfg)
    with open(out / "config_tree.log", "w") as f:
        Console(file=f, width=120).print(tree)
    if print_config:
        Console().print(tree)
    (out / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    info = {
        "git_commit": git_commit(),
        "data_root": str(cfg.data.root),
        "data_fingerprint": data_fingerprint(cfg.data.root),
        "pid": os.getpid(),
        **(extra or {}),
    }
    prev = out / "run_info.json"
    if prev.is_file():  # keep what earlier attempts of this run recorded (e.g. the W&B run id)
        info = {**json.loads(prev.read_text()), **info}
    write_json_atomic(prev, info)
    return info
