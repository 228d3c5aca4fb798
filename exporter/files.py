"""Files on disk: sha256, the record of one file, atomic publishing of finished folders, and file locks.

Everything export-skip writes that another process may read (artifact folders, cache entries) is built
under a temporary name and renamed into place whole; a lock file serialises writers of the same name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
import subprocess
from pathlib import Path

from exporter.errors import UserError


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def optional_sha256(path: Path | None) -> str | None:
    """sha256 of an input file a stage reads (a TensorRT timing cache), None when absent."""
    if path is None or not Path(path).is_file():
        return None
    return sha256_file(Path(path))


def describe_file(path: Path, root: Path, kind: str, precision: str | None = None) -> dict:
    """One artifact as report.json lists it: kind, precision, path relative to `root`, bytes, sha256."""
    return {"kind": kind, "precision": precision, "path": str(path.relative_to(root)),
            "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def publish_folder(tmp: Path, folder: Path) -> None:
    """Rename a finished cache folder into place: atomic, so a half-written folder is never mistaken
    for a finished one; when another process published the same entry first, keep theirs."""
    try:
        tmp.rename(folder)
    except OSError:
        if not folder.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def copy_file(src: Path, dst: Path) -> None:
    """A real copy (reflinked where the file system shares blocks): onnx refuses hard-linked external data."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if shutil.which("cp") and subprocess.run(["cp", "--reflink=auto", "--", str(src), str(dst)],
                                             capture_output=True).returncode == 0:
        return
    shutil.copy2(src, dst)


@contextlib.contextmanager
def locked(lock_path: Path, wait: bool = True, on_wait=None, busy_message: str = ""):
    """Hold an exclusive lock on `lock_path` for the block. When another process holds it: wait (telling
    `on_wait` once), or with `wait=False` raise UserError(busy_message)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise UserError(busy_message or f"{lock_path} is held by another process") from None
            if on_wait:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
