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

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from exporter.files import copy_file, files_digest, json_digest, publish_folder, temporary_sibling
from exporter.pipeline.results import StageResult

_DONE = "stage.json"
R = TypeVar("R", bound=StageResult)


def code_fingerprint(*modules: str) -> str:
    """Hash of the source of the named exporter modules a stage runs ("surgery", "onnx.export"): changing
    them redoes the stage."""
    package = Path(__file__).parents[1]
    return files_digest({name: package.joinpath(*name.split(".")).with_suffix(".py") for name in sorted(modules)},
                        length=16)


def stage_key(inputs: dict) -> str:
    return json_digest(inputs, length=20)


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
        tmp = temporary_sibling(self.root / f"{stage}-{key}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in files:
            copy_file(src / name, tmp / name)
        (tmp / _DONE).write_text(json.dumps({"files": files, "results": results}, indent=1))
        for old in self.root.glob(f"{stage}-*"):
            shutil.rmtree(old, ignore_errors=True)
        publish_folder(tmp, self.root / f"{stage}-{key}")

    def restore_or_run(self, stage: str, key: str, folder: Path, compute: Callable[[], R],
                       result_type: type[R]) -> tuple[R, bool]:
        """(result, cached): a finished stage's result (its files copied into `folder`) from the cache, or
        `compute()` run now and stored (the files it lists under `artifacts`)."""
        results = self.restore(stage, key, folder)
        if results is not None:
            return result_type.from_json(results), True
        result = compute()
        self.store(stage, key, folder, [a["path"] for a in result.artifacts], result.to_json())
        return result, False
