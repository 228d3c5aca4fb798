"""`export-skip verify DIR`: re-hash every file against manifest.json and check the ONNX graphs; with --parity,
every graph's parity in ONNX Runtime against the folder's recorded reference."""

from __future__ import annotations

import argparse
from pathlib import Path

from exporter.checks.manifest import read_manifest
from exporter.checks.verify import verify
from exporter.commands.options import add_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_folder(parser)
    parser.add_argument("--recipe", type=Path, metavar="RECIPE", help="also check the artifact was built from this recipe")
    parser.add_argument("--ort", action="store_true", help="also open every ONNX graph in ONNX Runtime")
    parser.add_argument("--parity", action="store_true", help="also check every graph's parity in ONNX Runtime "
                                                               "against the folder's recorded reference")


def run(args: argparse.Namespace, console) -> int:
    problems = verify(args.folder, args.recipe, with_ort=args.ort)
    for problem in problems:
        console.print(f"[red]MISMATCH[/] {problem}", soft_wrap=True, highlight=False)
    if args.parity and not problems:
        problems += _parity(args.folder, console)
    verdict = (f"[red bold]FAILED[/] {args.folder}: {len(problems)} problem(s)" if problems else
               f"[green bold]OK[/] {args.folder}: every file matches manifest.json")
    console.print(verdict)
    return 1 if problems else 0


def _parity(folder: Path, console) -> list[str]:
    """Print each graph's parity rows against the recorded reference; return the failures."""
    from exporter.pipeline.validate import verify_parity  # torch, onnxruntime: only with --parity

    checked = verify_parity(folder, read_manifest(folder))
    failures = []
    for p in checked["parity"]:
        ok = "ok" if p["passed"] else "[red]FAILED[/]"
        console.print(f"parity {p['artifact']} {p['phase']} batch {p['batch']}: max|Δlogit| {p['max_abs_diff']:.2e} "
                      f"(atol {p['atol']:.0e}), greedy {'match' if p['greedy_match'] else 'MISMATCH'} {ok}", soft_wrap=True)
        if not p["passed"]:
            failures.append(f"{p['artifact']} {p['phase']} batch {p['batch']}")
    for n in checked["not_run"]:
        console.print(f"not run: {n['check']}: {n['reason']}", soft_wrap=True)
    return failures
