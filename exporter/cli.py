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
                                            the cost model's predicted speedup, from the config alone"""


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


COMMANDS = {"check": _check, "plan": _plan}


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
