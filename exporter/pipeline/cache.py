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
from pathlib import Path

from exporter.files import copy_file

_DONE = "stage.json"


def code_fingerprint(*modules: str) -> str:
    """Hash of the source of the named exporter modules a stage runs ("surgery", "onnx.export"): changing
    them redoes the stage."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        path = Path(__file__).parents[1].joinpath(*name.split(".")).with_suffix(".py")
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def stage_key(inputs: dict) -> str:
    blob = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


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
            copy_file(entry / name, dest / name)
        return record["results"]

    def store(self, stage: str, key: str, src: Path, files: list[str], results: dict) -> None:
        """Record a finished stage (files relative to `src`); written whole or not at all."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{stage}-{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in files:
            copy_file(src / name, tmp / name)
        (tmp / _DONE).write_text(json.dumps({"files": files, "results": results}, indent=1))
        for old in self.root.glob(f"{stage}-*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(self.root / f"{stage}-{key}")

    def restore_or_run(self, stage: str, key: str, folder: Path, compute) -> tuple[dict, bool]:
        """(results, cached): a finished stage's results (its files copied into `folder`) from the cache, or
        `compute()` run now and stored (the files it lists under "artifacts")."""
        results = self.restore(stage, key, folder)
        if results is not None:
            return results, True
        results = compute()
        self.store(stage, key, folder, [a["path"] for a in results.get("artifacts", [])], results)
        return results, False
