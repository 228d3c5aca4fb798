"""`export-skip verify`: every way an artifact folder differs from its manifest.json (checks/manifest.py).

Re-hashes every file and checks that nothing was added or removed (manifest.check_files), that the recorded
recipe still hashes to its hash (and so do recipe.yaml and a recipe given to compare), and that every ONNX graph
loads, matches its recorded signature and finds its external data (and, `with_ort`, opens in ONNX Runtime).
"""

from __future__ import annotations

from pathlib import Path

from exporter.checks.manifest import MANIFEST, RECIPE_COPY, Problem, check_files, read_manifest, resolved_recipe
from exporter.files import json_digest
from exporter.onnx.contract import onnx_signature
from exporter.onnx.session import open_session
from exporter.recipe import load_recipe


def _diff_keys(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like dicts (for a readable recipe mismatch)."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [prefix or "(root)"] if a != b else []
    keys = []
    for key in sorted(set(a) | set(b)):
        keys += _diff_keys(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
    return keys


def _check_recipe(folder: Path, manifest: dict, recipe_path: Path | None) -> list[Problem]:
    import yaml

    problems = []
    rec = manifest["recipe"]
    if json_digest(rec["resolved"]) != rec["sha256"]:
        problems.append(Problem(MANIFEST, "recipe.resolved no longer hashes to recipe.sha256 (the manifest was edited)"))
    copy = folder / RECIPE_COPY
    if rec.get("copy") and copy.is_file():
        try:
            data = yaml.safe_load(copy.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            data = None
        if data is None or json_digest(data) != rec["sha256"]:
            changed = ", ".join(_diff_keys(rec["resolved"], data)) if isinstance(data, dict) else "unreadable"
            problems.append(Problem(RECIPE_COPY, f"differs from the recipe the artifact was built from ({changed})"))
    if recipe_path is not None:
        given = resolved_recipe(load_recipe(recipe_path))
        if json_digest(given) != rec["sha256"]:
            changed = ", ".join(_diff_keys(rec["resolved"], given))
            problems.append(Problem(str(recipe_path), f"is not the recipe this artifact was built from (differs in: {changed})"))
    return problems


def _check_onnx(folder: Path, manifest: dict, with_ort: bool) -> list[Problem]:
    """Each graph loads (protobuf), matches its recorded signature, and its external data is in place."""
    import onnx

    problems = []
    listed = {f["path"] for f in manifest["files"]}
    for rel, recorded in manifest.get("onnx", {}).items():
        path = folder / rel
        if not path.is_file():
            continue  # reported as missing by the file check
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf raises several types for a damaged file
            problems.append(Problem(rel, f"does not load as ONNX: {str(exc).splitlines()[0][:200]}"))
            continue
        signature = onnx_signature(path)
        if signature != recorded["signature"]:
            changed = ", ".join(_diff_keys(recorded["signature"], signature)) or "order"
            problems.append(Problem(rel, f"I/O signature differs from the manifest ({changed})"))
        before = len(problems)
        base = Path(rel).parent
        for init in proto.graph.initializer:
            if init.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in init.external_data}
            data = (base / info.get("location", "")).as_posix()
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
            if data not in listed:
                problems.append(Problem(rel, f"initializer {init.name} points at {data}, which is not in the manifest"))
                break
            if not (folder / data).is_file() or end > (folder / data).stat().st_size:  # what ORT would read
                problems.append(Problem(rel, f"initializer {init.name} reads past the end of {data}"))
                break
        if with_ort and len(problems) == before:
            try:
                open_session(path)
            except Exception as exc:
                problems.append(Problem(rel, f"ONNX Runtime cannot open it: {str(exc).splitlines()[0][:200]}"))
    return problems


def verify(folder: Path, recipe_path: Path | None = None, with_ort: bool = False) -> list[Problem]:
    """Every way the folder differs from its manifest; an empty list means it is intact."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    return check_files(folder, manifest) + _check_recipe(folder, manifest, recipe_path) + _check_onnx(folder, manifest, with_ort)
