"""Resumable steps of a job: each step records a key of its inputs in ``steps.json`` and is skipped when
its outputs exist and the key is unchanged."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cervspine.io.atomic import write_json_atomic

log = logging.getLogger(__name__)


def input_key(*parts: Any) -> str:
    """A short hash of JSON-able ``parts`` (configs, file keys, uid lists)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_key(path: Path) -> str:
    """A file's identity for a step key: path, size, modification time."""
    st = Path(path).stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


class Steps:
    """steps.json: the input key each finished step was computed from."""

    def __init__(self, run_dir: Path, force: bool = False):
        self.path = run_dir / "steps.json"
        self.force = force
        self.keys: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, key: str, outputs: list[Path], fn: Callable[[], Any]) -> bool:
        """Run ``fn`` unless ``outputs`` exist and ``key`` matches; True when it ran."""
        if not self.force and self.keys.get(name) == key and all(p.exists() for p in outputs):
            log.info("[pipeline] %s: current, skipped", name)
            return False
        log.info("[pipeline] %s: running", name)
        fn()
        self.keys[name] = key
        write_json_atomic(self.path, self.keys)
        return True
