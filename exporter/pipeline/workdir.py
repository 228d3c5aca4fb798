"""Build an artifact folder beside its target and move it into place only when every check passed.

A rerun replaces an existing folder only when it succeeds; a failed run is kept as `<name>.failed`
(its report says why) and never looks like a finished artifact. Work happens in a hidden
`.<name>.partial-<pid>` folder; one killed by SIGKILL is removed by the next run. Two runs on the same
name never interleave: a lock file `.<name>.lock` is held for the whole run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
from pathlib import Path

from exporter.errors import UserError
from exporter.files import publish_folder, temporary_sibling


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkDir:
    def __init__(self, target: Path, wait: bool = True, on_wait=None):
        self.target = target
        self.path = temporary_sibling(target, "partial")
        self.lock_path = target.parent / f".{target.name}.lock"
        self.wait = wait
        self.on_wait = on_wait
        self._lock = None

    def __enter__(self) -> WorkDir:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._acquire()
        try:
            self._recover()
            self.path.mkdir()
        except BaseException:
            self._release()
            raise
        return self

    def _acquire(self) -> None:
        self._lock = open(self.lock_path, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not self.wait:
                self._lock.close()
                raise UserError(f"another export-skip run is writing {self.target} (lock {self.lock_path}); "
                                "wait for it, or run without --no-wait to queue behind it") from None
            if self.on_wait:
                self.on_wait(f"another run is writing {self.target}; waiting for it to finish ...")
            fcntl.flock(self._lock, fcntl.LOCK_EX)

    def _release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _recover(self) -> None:
        """Clean up after runs that were killed (we hold the lock, so none of them is still running)."""
        parent, name = self.target.parent, self.target.name
        olds = sorted(parent.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime)
        if olds and not self.target.exists():
            olds.pop().rename(self.target)  # killed mid-publish: put the previous artifact back
        for stale in olds + list(parent.glob(f".{name}.partial-*")):
            shutil.rmtree(stale, ignore_errors=True)

    def publish(self) -> Path:
        """Swap the finished folder into place; signals are held off so both renames happen."""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            if _interrupted:  # a signal came and its KeyboardInterrupt was dropped on the way: do not publish
                raise KeyboardInterrupt(f"signal {_interrupted[0]}")
            publish_folder(self.path, self.target, replace=True)  # the old one aside as .NAME.old-PID, then removed
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
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
        try:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.path)
        finally:
            self._release()


def check_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Refuse before writing when the file system holding `folder` has less than `needed_bytes` free."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise UserError(f"not enough disk space for {what}: about {needed_bytes / 2**30:.2f} GiB needed in "
                        f"{probe}, {free / 2**30:.2f} GiB free")


_interrupted: list[int] = []  # the signals received (raise_on_sigterm's handler): publish() refuses after one


def raise_on_sigterm() -> None:
    """Turn SIGTERM (and SIGINT) into KeyboardInterrupt so `with WorkDir` cleans up as for Ctrl-C, and remember it:
    a run sent SIGTERM during its ONNX export went on to publish, twice in five tries (tests/test_reliability.py;
    an interrupt raised while Python runs a finaliser is printed and dropped, which fits); publish() checks."""

    def handler(signum, frame):
        _interrupted.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
