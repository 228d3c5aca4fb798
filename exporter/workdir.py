"""Build an artifact folder beside its target and move it into place only when every check passed.

A rerun replaces an existing folder only when it succeeds; a failed run is kept as `<name>.failed`
(its report says why) and never looks like a finished artifact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


class WorkDir:
    def __init__(self, target: Path):
        self.target = target
        self.path = target.parent / f".{target.name}.partial-{os.getpid()}"

    def __enter__(self) -> WorkDir:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()
        return self

    def publish(self) -> Path:
        old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
        if self.target.exists():
            self.target.rename(old)
        self.path.rename(self.target)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.failed_path, ignore_errors=True)
        return self.target

    @property
    def failed_path(self) -> Path:
        return self.target.parent / f"{self.target.name}.failed"

    def keep_failed(self) -> Path:
        """Keep a run whose checks failed (its report explains) under a name that is not the target."""
        shutil.rmtree(self.failed_path, ignore_errors=True)
        self.path.rename(self.failed_path)
        return self.failed_path

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.path)
