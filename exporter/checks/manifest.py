"""manifest.json: the record of an artifact folder's contents (written, read, listed, extended by record_files).

report.json is the record of checks; the manifest is the record of contents: every file in the folder
(whatever other stages wrote, not a fixed list) with bytes and sha256, the resolved recipe and its
hash, the base model's identity, the mask, each ONNX graph's I/O signature, tool versions and the
creation time. The pipeline writes it last, after report.json / report.md. `check_files` compares the folder's
files with it; `verify` (checks/verify.py) adds the recipe and ONNX checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from exporter.errors import CheckFailed, UserError
from exporter.files import describe_file, json_digest, sha256_file
from exporter.onnx.contract import onnx_signature
from exporter.report import Report
from exporter.versions import tool_versions

MANIFEST = "manifest.json"
RECIPE_COPY = "recipe.yaml"
FORMAT = "export-skip-manifest/1"


def resolved_recipe(recipe) -> dict:
    """The recipe after validation and defaults, as plain JSON data (paths absolute)."""
    return recipe.model_dump(mode="json", by_alias=True)


def write_recipe_copy(recipe, folder: Path) -> Path:
    """recipe.yaml in the artifact: the resolved recipe, runnable as is (`export-skip DIR/recipe.yaml`)."""
    import yaml

    path = folder / RECIPE_COPY
    header = (f"# The resolved recipe this artifact was built from (source: {recipe.source_path}).\n"
              f"# Re-run: export-skip {RECIPE_COPY}. Its sha256 (canonical JSON) is in manifest.json.\n")
    path.write_text(header + yaml.safe_dump(resolved_recipe(recipe), sort_keys=False, allow_unicode=True),
                    encoding="utf-8")
    return path


def _kind(rel: str, known: dict[str, dict]) -> tuple[str, str | None]:
    """A file's kind: what the stage that wrote it said in report.json, else a guess from its name."""
    if rel in known:
        return known[rel]["kind"], known[rel].get("precision")
    name = rel.rsplit("/", 1)[-1]
    guesses = [(".onnx", "onnx"), (".onnx.data", "onnx-external-data"), (".engine", "engine"),
               (".plan", "engine"), (".safetensors", "weights"), ("genai_config.json", "genai-config"),
               (RECIPE_COPY, "recipe"), ("report.json", "report"), ("report.md", "report")]
    for suffix, kind in guesses:
        if name.endswith(suffix):
            return kind, None
    if name.startswith(("tokenizer", "special_tokens_map", "vocab", "merges", "chat_template")):
        return "tokenizer", None
    return "other", None


def _walk(folder: Path) -> list[Path]:
    return sorted((p for p in folder.rglob("*") if p.is_file() or p.is_symlink()),
                  key=lambda p: p.relative_to(folder).as_posix())


def list_files(folder: Path, known: dict[str, dict] | None = None) -> list[dict]:
    """Every file under `folder` except the manifest itself, with kind, bytes and sha256."""
    files = []
    for path in _walk(folder):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        if path.is_symlink():  # a link would let the content change without the folder changing
            raise UserError(f"{path}: artifact folders hold plain files, not symbolic links")
        kind, precision = _kind(rel, known or {})
        entry = describe_file(path, folder, kind, precision)
        entry["path"] = rel
        files.append(entry)
    return files


def build_manifest(folder: Path, recipe, report: Report) -> dict:
    resolved = resolved_recipe(recipe)
    known = {a["path"]: a for a in report.artifacts}
    files = list_files(folder, known)
    onnx = {f["path"]: {"signature": onnx_signature(folder / f["path"])} for f in files if f["path"].endswith(".onnx")}
    return {
        "format": FORMAT,
        "name": report.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "passed": report.passed,
        "recipe": {"source": str(recipe.source_path) if recipe.source_path else None, "copy": RECIPE_COPY
                   if (folder / RECIPE_COPY).is_file() else None, "sha256": json_digest(resolved),
                   "resolved": resolved},
        "model": report.model,  # hub id + revision + commit, or file hashes
        "architecture": report.architecture,
        "num_layers": report.num_layers,
        "mask": report.mask,
        "kept_attention_layers": report.kept_attention_layers,
        "onnx": onnx,
        "files": files,
        "versions": tool_versions(),  # every package that reads or writes the files
    }


def write_manifest(folder: Path, recipe, report: Report) -> Path:
    """Write manifest.json; call it last, when every other file in the folder is final."""
    path = folder / MANIFEST
    path.write_text(json.dumps(build_manifest(folder, recipe, report), indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (give an artifact folder, e.g. artifacts/smollm2-135m)")
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder}: no {MANIFEST} here; is it an artifact folder written by export-skip "
                        f"(a failed run's folder or one from an older version has none)?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not an export-skip manifest (format {FORMAT!r} expected)")
    return manifest


@dataclass
class Problem:
    path: str  # the file (or "recipe") the problem is about
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def check_files(folder: Path, manifest: dict) -> list[Problem]:
    """Files missing, resized, re-hashed to other content, or added since the manifest listed them (what `verify`
    checks first, and what `record_files` requires of every file it is not recording)."""
    problems = []
    listed = {f["path"]: f for f in manifest["files"]}
    for rel, entry in listed.items():
        path = folder / rel
        if not path.is_file():
            problems.append(Problem(rel, "missing"))
        elif path.stat().st_size != entry["bytes"]:
            problems.append(Problem(rel, f"size changed: {path.stat().st_size:,} bytes, manifest says {entry['bytes']:,}"))
        elif sha256_file(path) != entry["sha256"]:
            problems.append(Problem(rel, f"content changed: sha256 differs from the manifest's {entry['sha256'][:16]}…"))
    for path in _walk(folder):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST and rel not in listed:
            problems.append(Problem(rel, "not in the manifest (added after the artifact was written)"))
    return problems


def record_files(folder: Path, paths: list[str]) -> Path:
    """After publishing, a later command (eval, bench) that adds or rewrites `paths` records them.

    Every other file must still match the manifest first: this records a known change, it never
    launders an unknown one.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    changed = {Path(p).as_posix() for p in paths}
    problems = [p for p in check_files(folder, manifest) if p.path not in changed]
    if problems:
        raise CheckFailed(f"{folder}: not recording {', '.join(sorted(changed))}: the folder already differs "
                          f"from its manifest ({problems[0]})")
    known = {f["path"]: f for f in manifest["files"]}
    fresh = {f["path"]: f for f in list_files(folder, known) if f["path"] in changed or f["path"] in known}
    manifest["files"] = sorted(fresh.values(), key=lambda f: f["path"])
    manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path
