"""Stage cache: a finished stage's files and results, keyed by everything that stage depends on.

A rerun (after a kill, or with an unchanged recipe) restores finished stages instead of redoing them;
a changed input changes the key of exactly the stages that read it. Entries live beside the
artifacts in `.stages/<name>/<stage>-<key>/`, hold copies of the artifact files, and only the newest entry
per stage is kept. Copies, not hard links: onnx refuses external data with more than one link ("potential
hardlink attack"), so a linked model.onnx.data would not load with `onnx.load` for users. `cp --reflink=auto`
makes the copy free on file systems that share blocks (btrfs, XFS); elsewhere the cache costs one more copy
of the weights, which the disk guard counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

_DONE = "stage.json"


def code_fingerprint(*modules: str) -> str:
    """Hash of the source of the named exporter modules a stage runs: changing them redoes the stage."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        path = Path(__file__).parent / f"{name}.py"
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def stage_key(inputs: dict) -> str:
    blob = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if shutil.which("cp") and subprocess.run(["cp", "--reflink=auto", "--", str(src), str(dst)],
                                             capture_output=True).returncode == 0:
        return
    shutil.copy2(src, dst)


class StageCache:
    def __init__(self, root: Path, enabled: bool = True):
        self.root = root
        self.enabled = enabled

    def restore(self, stage: str, key: str, dest: Path) -> dict | None:
        """Copy a finished entry's files into `dest` and return its results, or None on a miss."""
        entry = self.root / f"{stage}-{key}"
        if not self.enabled or not (entry / _DONE).is_file():
            return None
        record = json.loads((entry / _DONE).read_text())
        for name in record["files"]:
            _copy(entry / name, dest / name)
        return record["results"]

    def store(self, stage: str, key: str, src: Path, files: list[str], results: dict) -> None:
        """Record a finished stage (files relative to `src`); written whole or not at all."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{stage}-{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in files:
            _copy(src / name, tmp / name)
        (tmp / _DONE).write_text(json.dumps({"files": files, "results": results}, indent=1))
        for old in self.root.glob(f"{stage}-*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(self.root / f"{stage}-{key}")
