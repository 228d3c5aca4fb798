"""exporter/files.py: the one home of content digests and of atomic publishing."""

from __future__ import annotations

import hashlib
import json
import os

from exporter.files import (digest, files_digest, json_digest, publish_folder, sha256_file, temporary_sibling,
                            write_text_atomic)


def test_json_digest_is_the_manifests_canonical_hash():
    # manifests record this value (recipe.sha256) and `verify` compares it: it must never change
    data = {"b": [1, 2.5, None], "a": {"z": "é", "y": True}}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert json_digest(data) == hashlib.sha256(blob.encode("utf-8")).hexdigest()
    assert json_digest(data, length=20) == json_digest(data)[:20]


def test_file_and_part_digests(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_bytes(b"x = 1\n")
    b.write_bytes(b"y = 2\n")
    assert sha256_file(a) == hashlib.sha256(b"x = 1\n").hexdigest() == digest(b"x = ", "1\n")
    assert files_digest({"a": a, "b": b}, length=16) == hashlib.sha256(b"ax = 1\nby = 2\n").hexdigest()[:16]


def test_publish_folder(tmp_path):
    dest = tmp_path / "entry"
    tmp = temporary_sibling(dest)
    assert tmp.name == f".entry.tmp-{os.getpid()}"
    tmp.mkdir()
    (tmp / "f").write_text("first")
    publish_folder(tmp, dest)
    second = temporary_sibling(dest, "partial")
    second.mkdir()
    (second / "f").write_text("second")
    publish_folder(second, dest)  # someone published first: theirs is kept, ours removed
    assert (dest / "f").read_text() == "first" and not second.exists()
    second.mkdir()
    (second / "f").write_text("second")
    publish_folder(second, dest, replace=True)  # an artifact: the new one replaces the old one
    assert (dest / "f").read_text() == "second" and sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_write_text_atomic(tmp_path):
    path = tmp_path / "summary.json"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two")
    assert path.read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
