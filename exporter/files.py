"""Files on disk and content digests: sha256 (the one home of hashing), the record of one file, atomic
publishing of finished folders and files, and file locks.

Digests: `sha256_file` (a file's bytes, hex: what manifests, reports and engine sidecars record), `digest` (bytes
or text, in order), `json_digest` (canonical JSON: sorted keys, no whitespace; the manifest's recipe hash and the
stage-cache keys) and `files_digest` (named files' contents: code fingerprints).

Everything export-skip writes that another process may read (artifact folders, cache entries, sweep summaries) is
built under a temporary sibling name (`.NAME.TAG-PID`, `temporary_sibling`) and renamed into place whole; a lock
file serialises writers of the same name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from exporter.errors import UserError


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 hex of a file's bytes (read in chunks: weights are gigabytes)."""
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            hasher.update(block)
    return hasher.hexdigest()


def digest(*parts: bytes | str, length: int | None = None) -> str:
    """sha256 hex of `parts` fed in order (text as UTF-8); `length`: only its first `length` hex digits."""
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part.encode("utf-8") if isinstance(part, str) else part)
    return hasher.hexdigest()[:length]


def canonical_json(data) -> str:
    """JSON with sorted keys and no whitespace (values JSON has no type for, as str): the same data, the same text."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def json_digest(data, length: int | None = None) -> str:
    """sha256 of `data`'s canonical JSON: the same data always hashes the same."""
    return digest(canonical_json(data), length=length)


def files_digest(named: dict[str, Path], length: int | None = None) -> str:
    """sha256 of each file in order: its name, then its bytes (a code fingerprint: same sources, same digest)."""
    return digest(*(part for name, path in named.items() for part in (name, Path(path).read_bytes())), length=length)


def optional_sha256(path: Path | None) -> str | None:
    """sha256 of an input file a stage reads (a TensorRT timing cache), None when absent."""
    if path is None or not Path(path).is_file():
        return None
    return sha256_file(Path(path))


def describe_file(path: Path, root: Path, kind: str, precision: str | None = None) -> dict:
    """One artifact as report.json lists it: kind, precision, path relative to `root`, bytes, sha256."""
    return {"kind": kind, "precision": precision, "path": str(path.relative_to(root)),
            "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """`.NAME.TAG-PID` beside `path`: where this process builds what it then renames to `path` (hidden, and the
    pid keeps two processes apart; `.NAME.TAG-*` finds the ones a killed process left)."""
    return path.parent / f".{path.name}.{tag}-{os.getpid()}"


def publish_folder(tmp: Path, folder: Path, replace: bool = False) -> None:
    """Rename a finished folder into place: atomic, so a half-written folder is never mistaken for a finished one.

    When `folder` exists: by default another process published the same entry first (a cache entry), so keep
    theirs; `replace`: the new one replaces it (an artifact), the old one moved aside to `.NAME.old-PID` first and
    removed after (a process killed between the two renames leaves it there to be put back)."""
    old = None
    if replace and folder.exists():
        old = temporary_sibling(folder, "old")
        folder.rename(old)
    try:
        tmp.rename(folder)
    except OSError:
        if replace or not folder.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file whole or not at all: readers see the old file or the new one, never half of one."""
    tmp = temporary_sibling(path)
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


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
