"""Command line: argument parsing and exit codes only.

Exit codes: 0 every check passed; 1 a check failed or an internal error (log path printed);
2 a user error (one line, no traceback; --debug shows it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from pathlib import Path

from exporter.errors import UserError

USAGE = """export-skip RECIPE [--out DIR]        export, validate and report (the main job)
       export-skip check RECIPE             validate a recipe (and its mask against the model config)
       export-skip plan RECIPE [--config JSON] [--json]
                                            the cost model's predicted speedup, from the config alone
       export-skip inspect DIR              what an artifact folder holds: mask as a layer map, sizes, checks
       export-skip verify DIR [--recipe RECIPE] [--ort]
                                            re-hash every file against manifest.json, check the ONNX graphs
       export-skip generate DIR --prompt TEXT [--max-new-tokens N] [--runtime ort|genai]
                                            stream greedy text from an artifact"""


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, usage=USAGE)
    parser.add_argument("recipe", type=Path, help="recipe YAML file")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser


def _run(argv: list[str], console) -> int:
    from exporter.pipeline import run
    from exporter.recipe import load_recipe

    parser = _parser("export-skip")
    parser.add_argument("--out", type=Path, help="artifact folder (default: artifacts/<recipe file stem>)")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe)
    out = args.out or Path("artifacts") / (recipe.name or args.recipe.stem)
    console.print(f"[bold]export-skip[/] {args.recipe} -> {out}")
    report = run(recipe, out, console)
    if report["passed"]:
        console.print(f"[green bold]PASSED[/] {report['published_to']}/ (report.md, report.json) "
                      f"in {report['wall_seconds']:.1f} s")
        return 0
    failed = [f"{p['artifact']} {p['phase']} batch {p['batch']}: max|Δ| {p['max_abs_diff']:.2e} vs atol {p['atol']:.0e}, "
              f"greedy {'match' if p['greedy_match'] else 'MISMATCH'}" for p in report["parity"] if not p["passed"]]
    failed += [f"{c['name']}: {c['value']} (limit {c['limit']})" for c in report["checks"] if not c["passed"]]
    console.print("[red bold]FAILED[/] " + "; ".join(failed))
    console.print(f"the failed run is kept in {report['published_to']}/ (not published)")
    return 1


def _check(argv: list[str], console) -> int:
    from exporter.models import load_config
    from exporter.recipe import load_recipe, resolve_mask

    args = _parser("export-skip check").parse_args(argv)
    recipe = load_recipe(args.recipe)
    config = load_config(recipe.model)
    mask = resolve_mask(recipe, config.num_hidden_layers)
    console.print(f"{args.recipe}: ok ({config.model_type}, {config.num_hidden_layers} layers; "
                  f"attention skipped {list(mask.attention) or 'none'}, MLP skipped {list(mask.mlp) or 'none'})")
    return 0


def _plan(argv: list[str], console) -> int:
    import json

    from exporter.cost import plan, render_prediction
    from exporter.recipe import load_recipe

    parser = _parser("export-skip plan")
    parser.add_argument("--config", type=Path, help="a config.json to plan from (default: the recipe's model)")
    parser.add_argument("--json", action="store_true", help="print the prediction as JSON")
    args = parser.parse_args(argv)
    result = plan(load_recipe(args.recipe), args.config)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    console.print(f"{args.recipe}: {result['architecture']}, config from {result['config_from']}; "
                  f"attention skipped {result['mask']['attention'] or 'none'}, MLP skipped {result['mask']['mlp'] or 'none'}")
    print("\n".join(render_prediction(result["prediction"])))
    return 0


def _folder_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, usage=USAGE)
    parser.add_argument("folder", type=Path, help="artifact folder (e.g. artifacts/smollm2-135m)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser


def _inspect(argv: list[str], console) -> int:
    from rich.console import Console

    from exporter.inspect import render

    args = _folder_parser("export-skip inspect").parse_args(argv)
    render(args.folder, Console(highlight=False))
    return 0


def _verify(argv: list[str], console) -> int:
    from exporter.manifest import verify

    parser = _folder_parser("export-skip verify")
    parser.add_argument("--recipe", type=Path, help="also check the artifact was built from this recipe")
    parser.add_argument("--ort", action="store_true", help="also open every ONNX graph in ONNX Runtime")
    args = parser.parse_args(argv)
    problems = verify(args.folder, args.recipe, with_ort=args.ort)
    for problem in problems:
        console.print(f"[red]MISMATCH[/] {problem}", soft_wrap=True, highlight=False)
    if problems:
        console.print(f"[red bold]FAILED[/] {args.folder}: {len(problems)} problem(s)")
        return 1
    console.print(f"[green bold]OK[/] {args.folder}: every file matches manifest.json")
    return 0


def _generate(argv: list[str], console) -> int:
    from exporter.generate import generate

    parser = _folder_parser("export-skip generate")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap the prompt in the chat template (default: what the recipe validated with)")
    parser.add_argument("--runtime", choices=("ort", "genai"), default="ort",
                        help="ONNX Runtime via export-skip's runner, or onnxruntime-genai (extra [genai])")
    parser.add_argument("--onnx", help="graph file inside the folder (default: model.onnx)")
    args = parser.parse_args(argv)
    generate(args.folder, args.prompt, args.max_new_tokens, args.chat, args.runtime, args.onnx)
    return 0


COMMANDS = {"check": _check, "plan": _plan, "inspect": _inspect, "verify": _verify,
            "generate": _generate}


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console(stderr=True, highlight=False)
    debug = "--debug" in argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: " + USAGE)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    try:
        return command(argv[1:], console) if command else _run(argv, console)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        for line in str(exc).splitlines():
            console.print(f"[red]error:[/] {line}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]: nothing was published")
        return 130
    except Exception:  # an internal error: keep the traceback in a log, print one line
        log = Path(tempfile.mkstemp(prefix="export-skip-", suffix=".log")[1])
        log.write_text(traceback.format_exc(), encoding="utf-8")
        if debug:
            traceback.print_exc()
        console.print(f"[red]internal error:[/] {sys.exc_info()[1]!s:.300} (traceback in {log})", soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
