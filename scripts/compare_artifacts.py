"""Two artifact folders of the same recipe, side by side: whether they hold the same files, which files' bytes differ
(and for ONNX graphs whether they differ only in torch.onnx's source-location metadata), whether every parity row
is identical to the last digit, and whether the samples, checks and checks not run are the same.

    .venv/bin/python scripts/compare_artifacts.py BEFORE_DIR AFTER_DIR

Exit 0 when the files, parity rows and samples agree (ONNX graphs may differ in metadata only), else 1. A refactor
that must not change behaviour is checked this way on the default recipe (two runs that tuned the same variant).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def graph_without_metadata(path: Path) -> bytes:
    """The graph with node metadata and doc strings dropped: torch.onnx records the exporting module's dotted path
    there, which moves with the code."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def clean(graph) -> None:
        del graph.metadata_props[:]
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attribute in node.attribute:
                for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    clean(sub)
        for value in graph.value_info:
            del value.metadata_props[:]

    clean(model.graph)
    del model.metadata_props[:]
    return model.SerializeToString()


def compare(before: Path, after: Path) -> list[str]:
    problems = []
    files = [{f["path"]: f for f in json.loads((d / "manifest.json").read_text())["files"]} for d in (before, after)]
    if set(files[0]) != set(files[1]):
        problems.append(f"files differ: {sorted(set(files[0]) ^ set(files[1]))}")
    for path in sorted(set(files[0]) & set(files[1])):
        if files[0][path]["sha256"] == files[1][path]["sha256"] or path in ("report.json", "report.md"):
            continue
        if path.endswith(".onnx") and graph_without_metadata(before / path) == graph_without_metadata(after / path):
            print(f"{path}: differs in torch.onnx's source-location metadata only")
        else:
            problems.append(f"{path}: contents differ")
    reports = [json.loads((d / "report.json").read_text()) for d in (before, after)]
    rows = [{(r["artifact"], r["phase"], r["batch"]): r for r in report["parity"]} for report in reports]
    if rows[0] != rows[1]:
        problems.append("parity rows differ")
    for section in ("samples", "checks", "not_run", "mask", "parameters", "kv_cache", "onnx", "optimized_graph"):
        if reports[0].get(section) != reports[1].get(section):
            problems.append(f"report section {section!r} differs")
    worst = max(rows[1].values(), key=lambda r: r["max_abs_diff"] / r["atol"])
    print(f"{len(rows[1])} parity rows; worst max|Δlogit| {worst['max_abs_diff']!r} (atol {worst['atol']}) in "
          f"{worst['artifact']} {worst['phase']} batch {worst['batch']}; {len(reports[1]['samples'])} samples")
    return problems


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    found = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    print("\n".join(found) if found else "same files, same parity rows to the last digit, same samples and checks")
    sys.exit(1 if found else 0)
