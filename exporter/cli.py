"""Command line: argument parsing and exit codes only.

Exit codes: 0 every check passed; 1 a check failed or an internal error (log path printed);
2 a user error (one line, no traceback; --debug shows it).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
import traceback
from pathlib import Path

from exporter.cost import plan, render_prediction
from exporter.quality.data import data_dir
from exporter.errors import UserError
from exporter.commands.inspect import render
from exporter.checks.manifest import read_manifest, verify
from exporter.mask import resolve_mask
from exporter.model.source import load_config
from exporter.recipe import load_recipe
from exporter.pipeline.load import require_supported
from exporter.pipeline.workdir import raise_on_sigterm

# The commands that run models import their modules (and so torch, onnx, onnxruntime) when they run, so
# `check`, `plan`, `inspect` and `verify` start in a fraction of a second.

USAGE = """export-skip RECIPE [--out DIR] [--force] [--no-wait] [--no-tune]
                                            export, validate and report (the main job)
       export-skip check RECIPE             validate a recipe (and its mask against the model config)
       export-skip plan RECIPE [--config JSON] [--json]
                                            the cost model's predicted speedup, from the config alone
       export-skip bench RECIPE [--quick] [--threads N] [--rounds N] [--repeats N] [--peer NAME=ONNX]
                                            ONNX Runtime latency, full vs skipped, interleaved (bench.json)
       export-skip inspect DIR              what an artifact folder holds: mask as a layer map, sizes, checks
       export-skip verify DIR [--recipe RECIPE] [--ort]
                                            re-hash every file against manifest.json, check the ONNX graphs
       export-skip generate DIR --prompt TEXT [--max-new-tokens N] [--runtime ort|genai]
                                            stream greedy text from an artifact
       export-skip eval RECIPE [--artifact DIR [--onnx FILE]] [--data DIR] [--limit N] [--window N] [--out FILE]
                                            perplexity, LAMBADA, KL / top-1 vs the full model (eval.json)
       export-skip search RECIPE [--strategy local|greedy|oneshot] [--kind attention|mlp|block|any]
                      [--max-kl X] [--max-ppl-increase PCT] [--max-lambada-drop POINTS] [--count N]
                      [--match-tokens N] [--metric kl|ppl|lambada] [--budget-evals N]
                      [--calibration-prompts FILE] [--held-out-windows N] [--held-out-passages N]
                      [--out FILE] [--ray [ADDRESS]] [--workers N]
                                            find a mask under a quality budget; writes a recipe
       export-skip sweep RECIPE... --out DIR [--ray [ADDRESS]] [--force]
                                            run many recipes (on Ray with --ray); sweep.json / sweep.md"""


def _parser(prog: str, first: str = "recipe", first_help: str = "recipe YAML file") -> argparse.ArgumentParser:
    """A command's parser: its one positional argument (a recipe, or an artifact folder) and --debug."""
    parser = argparse.ArgumentParser(prog=prog, usage=USAGE)
    parser.add_argument(first, type=Path, help=first_help)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser


def _run(argv: list[str], console) -> int:
    from exporter.pipeline.run import run

    parser = _parser("export-skip")
    parser.add_argument("--out", type=Path, help="artifact folder (default: artifacts/<recipe file stem>)")
    parser.add_argument("--force", action="store_true", help="redo every stage (ignore the stage cache)")
    parser.add_argument("--no-wait", action="store_true",
                        help="fail at once if another run is writing the same artifact folder")
    parser.add_argument("--no-tune", action="store_true",
                        help="build the default optimized graph instead of timing the variants here (export.tune: false)")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe)
    if args.no_tune:  # as the recipe key: the resolved recipe in the report says so
        recipe = recipe.model_copy(update={"export": recipe.export.model_copy(update={"tune": False})})
    out = args.out or Path("artifacts") / (recipe.name or args.recipe.stem)
    console.print(f"[bold]export-skip[/] {args.recipe} -> {out}")
    report = run(recipe, out, console, force=args.force, wait=not args.no_wait)
    if report["passed"]:
        console.print(f"[green bold]PASSED[/] {report['published_to']}/ (report.md, report.json) "
                      f"in {report['wall_seconds']:.1f} s")
        if report["not_run"]:  # a pass says only what ran: name what did not
            console.print(f"[yellow]not run ({len(report['not_run'])}):[/] "
                          + "; ".join(n["reason"] for n in report["not_run"]))
        return 0
    failed = [f"{p['artifact']} {p['phase']} batch {p['batch']}: max|Δ| {p['max_abs_diff']:.2e} vs atol {p['atol']:.0e}, "
              f"greedy {'match' if p['greedy_match'] else 'MISMATCH'}" for p in report["parity"] if not p["passed"]]
    failed += [f"{c['name']}: {c['value']} (limit {c['limit']})" for c in report["checks"] if not c["passed"]]
    console.print("[red bold]FAILED[/] " + "; ".join(failed))
    console.print(f"the failed run is kept in {report['published_to']}/ (not published)")
    return 1


def _check(argv: list[str], console) -> int:
    args = _parser("export-skip check").parse_args(argv)
    recipe = load_recipe(args.recipe)
    config = load_config(recipe.model)
    mask = resolve_mask(recipe, config.num_hidden_layers)
    require_supported(recipe)
    console.print(f"{args.recipe}: ok ({config.model_type}, {config.num_hidden_layers} layers; "
                  f"attention skipped {list(mask.attention) or 'none'}, MLP skipped {list(mask.mlp) or 'none'})")
    return 0


def _plan(argv: list[str], console) -> int:
    import json

    args = _parse(_parser("export-skip plan"), argv,
                  ("--config", dict(type=Path, help="a config.json to plan from (default: the recipe's model)")),
                  ("--json", dict(action="store_true", help="print the prediction as JSON")))
    result = plan(load_recipe(args.recipe), args.config)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    console.print(f"{args.recipe}: {result['architecture']}, config from {result['config_from']}; "
                  f"attention skipped {result['mask']['attention'] or 'none'}, MLP skipped {result['mask']['mlp'] or 'none'}")
    print("\n".join(render_prediction(result["prediction"])))
    return 0


def _bench(argv: list[str], console) -> int:
    from exporter.commands.bench import run_bench

    parser = _parser("export-skip bench")
    parser.add_argument("--out", type=Path, help="artifact folder holding the skipped model.onnx "
                                                 "(default: artifacts/<recipe file stem>)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and cases (a smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: cores)")
    parser.add_argument("--peer", action="append", default=[], metavar="NAME=ONNX",
                        help="another tool's graph of the full model, timed in the same run (repeatable)")
    parser.add_argument("--rounds", type=_positive, help="interleaved decode rounds per case (default 20; "
                        "a 3%% saving on a busy machine needs a few hundred)")
    parser.add_argument("--repeats", type=_positive, help="sets of fresh worker processes, opened in rotated order (default 2)")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe)
    out = args.out or Path("artifacts") / (recipe.name or args.recipe.stem)
    peers = {}
    for item in args.peer:
        name, _, path = item.partition("=")
        if not name or not path or not Path(path).is_file():
            raise UserError(f"--peer {item!r}: expected NAME=PATH to an existing .onnx file")
        peers[name] = Path(path)
    return run_bench(recipe, out, console, quick=args.quick, threads=args.threads, extra=peers,
                     rounds=args.rounds, repeats=args.repeats)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def _parse(parser: argparse.ArgumentParser, argv: list[str], *options: tuple[str, dict]) -> argparse.Namespace:
    """Parse `argv` after adding `options` ((flag, add_argument keywords) pairs) to `parser`."""
    for flag, kwargs in options:
        parser.add_argument(flag, **kwargs)
    return parser.parse_args(argv)


def _folder_parser(prog: str) -> argparse.ArgumentParser:
    return _parser(prog, "folder", "artifact folder (e.g. artifacts/smollm2-135m)")


def _inspect(argv: list[str], console) -> int:
    from rich.console import Console

    args = _folder_parser("export-skip inspect").parse_args(argv)
    render(args.folder, Console(highlight=False))
    return 0


def _verify(argv: list[str], console) -> int:
    args = _parse(_folder_parser("export-skip verify"), argv,
                  ("--recipe", dict(type=Path, help="also check the artifact was built from this recipe")),
                  ("--ort", dict(action="store_true", help="also open every ONNX graph in ONNX Runtime")),
                  ("--parity", dict(action="store_true", help="also check every graph's parity in ONNX Runtime "
                                                              "against the folder's recorded reference")))
    problems = verify(args.folder, args.recipe, with_ort=args.ort)
    for problem in problems:
        console.print(f"[red]MISMATCH[/] {problem}", soft_wrap=True, highlight=False)
    if args.parity and not problems:
        problems += _verify_parity(args.folder, console)
    verdict = (f"[red bold]FAILED[/] {args.folder}: {len(problems)} problem(s)" if problems else
               f"[green bold]OK[/] {args.folder}: every file matches manifest.json")
    console.print(verdict)
    return 1 if problems else 0


def _verify_parity(folder: Path, console) -> list[str]:
    """Print each graph's parity rows against the recorded reference; return the failures."""
    from exporter.pipeline.validate import verify_parity

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


def _generate(argv: list[str], console) -> int:
    from exporter.commands.generate import generate

    parser = _folder_parser("export-skip generate")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap the prompt in the chat template (default: what the recipe validated with)")
    parser.add_argument("--runtime", choices=("ort", "genai"), default="ort",
                        help="ONNX Runtime via export-skip's runner, or onnxruntime-genai (extra [genai])")
    parser.add_argument("--onnx", help="graph file inside the folder (default: model.opt.onnx where the run wrote one, else model.onnx)")
    args = parser.parse_args(argv)
    generate(args.folder, args.prompt, args.max_new_tokens, args.chat, args.runtime, args.onnx)
    return 0


def _data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, help="evaluation data folder (default $EXPORT_SKIP_DATA or ../shared/data)")


def _eval(argv: list[str], console) -> int:
    from exporter.quality.metrics import Settings, run_eval

    parser = _parser("export-skip eval")
    parser.add_argument("--artifact", type=Path, help="also evaluate this exported folder's model.onnx in ONNX Runtime")
    parser.add_argument("--onnx", help="with --artifact: the graph in it to evaluate (e.g. int4/model.onnx)")
    _data_args(parser)
    parser.add_argument("--limit", type=int, help="quick run: first N WikiText windows and first N LAMBADA passages")
    parser.add_argument("--windows", type=int, help="first N WikiText windows (overrides --limit)")
    parser.add_argument("--passages", type=int, help="first N LAMBADA passages (overrides --limit)")
    parser.add_argument("--window", type=int, default=1024, help="perplexity window in tokens (default 1024)")
    parser.add_argument("--tasks", default="wikitext,lambada", help="comma-separated: wikitext, lambada")
    parser.add_argument("--out", type=Path, help="eval.json path (default: DIR/eval.json with --artifact)")
    args = parser.parse_args(argv)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    if not tasks or set(tasks) - {"wikitext", "lambada"}:
        raise UserError(f"--tasks {args.tasks!r}: choose from wikitext, lambada")
    for name in ("limit", "windows", "passages", "window"):
        if getattr(args, name) is not None and getattr(args, name) < (2 if name == "window" else 1):
            raise UserError(f"--{name} must be a positive number{' of at least 2 tokens' if name == 'window' else ''}")
    recipe = load_recipe(args.recipe)
    settings = Settings(data=data_dir(args.data), window=args.window, tasks=tasks,
                        windows=args.windows if args.windows is not None else args.limit,
                        passages=args.passages if args.passages is not None else args.limit)
    if args.onnx and args.artifact is None:
        raise UserError("--onnx names a graph inside --artifact DIR: give --artifact too")
    result, path = run_eval(recipe, settings, args.artifact, args.out, console, onnx_file=args.onnx)
    console.print(f"wrote {path}")
    check = result.get("onnx_vs_pytorch") or result.get("int4_vs_fp32")
    return 1 if check and not check["passed"] else 0


def _search(argv: list[str], console) -> int:
    from exporter.quality.search import Budget, RayOptions, SearchSettings, read_prompts, run_search

    parser = _parser("export-skip search")
    parser.add_argument("--strategy", choices=("local", "greedy", "oneshot"), default="local",
                        help="local (default): greedy, then swaps seeded by greedy and every one-shot ranking; "
                             "greedy: remove the least harmful sub-layer, re-measure, repeat; oneshot: by LLM-Drop cosine")
    parser.add_argument("--kind", choices=("attention", "mlp", "block", "any"), default="attention",
                        help="candidate sub-layers (default attention; any = attention and MLP separately)")
    budget = parser.add_argument_group("budget (any combination; at least one)")
    budget.add_argument("--max-kl", type=float, help="largest mean KL vs the full model on the calibration windows")
    budget.add_argument("--max-ppl-increase", type=float, help="largest calibration perplexity increase, in percent")
    budget.add_argument("--max-lambada-drop", type=float, metavar="POINTS",
                        help="largest LAMBADA last-word accuracy drop on calibration passages (after the first 1,000), in points")
    budget.add_argument("--count", type=int, help="remove exactly this many candidates (default: as many as the rest allows)")
    budget.add_argument("--match-tokens", type=int, metavar="N",
                        help="greedy answers to the recipe's validation prompts must equal the full model's for N tokens")
    parser.add_argument("--metric", choices=("kl", "ppl", "lambada"), default="kl",
                        help="what the search minimises (default kl): KL or perplexity on the calibration windows, "
                             "or the final-word NLL of LAMBADA calibration passages")
    parser.add_argument("--budget-evals", type=_positive, help="stop after this many mask evaluations (best so far wins)")
    _data_args(parser)
    parser.add_argument("--calibration-windows", type=int, default=4, help="WikiText windows to calibrate on (default 4)")
    parser.add_argument("--calibration-length", type=int, default=256, help="tokens per calibration window (default 256)")
    parser.add_argument("--calibration-passages", type=int, default=200,
                        help="LAMBADA passages to calibrate on, drawn after the first 1,000 (default 200)")
    parser.add_argument("--calibration-prompts", type=Path, metavar="FILE",
                        help="one prompt a line: the full model's chat answers to them join the calibration windows")
    parser.add_argument("--calibration-answer-tokens", type=_positive, default=64,
                        help="tokens of each such answer (default 64)")
    parser.add_argument("--held-out-windows", type=int, default=0,
                        help="score the result against the one-shot masks on the first N WikiText-2 windows (default 0: no)")
    parser.add_argument("--held-out-window", type=_positive, default=512, help="tokens per held-out window (default 512)")
    parser.add_argument("--held-out-passages", type=int, default=0,
                        help="... and on the first N LAMBADA passages (at most 1,000; default 0: no)")
    parser.add_argument("--seed", type=int, default=0, help="which calibration windows/passages are drawn (default 0)")
    parser.add_argument("--include-final-layer", action="store_true", help="allow removing from the final layer")
    parser.add_argument("--out", type=Path, help="recipe to write (default: RECIPE's folder, <stem>-searched.yaml)")
    _ray_args(parser)
    parser.add_argument("--workers", type=_positive, help="--ray: search workers (default: the cluster's CPUs / --worker-cpus)")
    parser.add_argument("--worker-cpus", type=float, default=1, help="--ray: CPUs each worker declares (default 1)")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe)
    ray = None if args.ray is None else RayOptions(args.ray, args.workers, args.worker_cpus)
    settings = SearchSettings(
        budget=Budget(max_kl=args.max_kl, max_ppl_increase=args.max_ppl_increase,
                      max_lambada_drop=args.max_lambada_drop, count=args.count, match_tokens=args.match_tokens),
        strategy=args.strategy, kind=args.kind, data=data_dir(args.data), windows=args.calibration_windows,
        length=args.calibration_length, seed=args.seed, keep_final_layer=not args.include_final_layer,
        metric=args.metric, passages=args.calibration_passages, budget_evals=args.budget_evals,
        chat_prompts=read_prompts(args.calibration_prompts) if args.calibration_prompts else (),
        chat_tokens=args.calibration_answer_tokens, source_prompts=str(args.calibration_prompts or "") or None,
        answer_prompts=tuple(recipe.validation.prompts), chat=recipe.validation.chat,
        held_out_windows=args.held_out_windows, held_out_window=args.held_out_window,
        held_out_passages=args.held_out_passages)
    out = args.out or args.recipe.with_name(f"{args.recipe.stem}-searched.yaml")
    # where the candidates were scored does not change the result: the recipe records the search without it
    recorded = _without(argv, {"--ray": args.ray, "--workers": None, "--worker-cpus": None})
    run_search(recipe, args.recipe, settings, out, console, argv=["search", *recorded], ray=ray)
    console.print(f"wrote {out}")
    return 0


def _sweep(argv: list[str], console) -> int:
    from exporter.commands.sweep import run_sweep

    parser = argparse.ArgumentParser(prog="export-skip sweep", usage=USAGE)
    parser.add_argument("recipes", nargs="+", help="recipe files, or glob patterns ('recipes/tiny-*.yaml')")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for every item's artifact folder, sweep.json and sweep.md "
                             "(with --ray: a path every node sees, on a shared filesystem)")
    parser.add_argument("--force", action="store_true", help="redo every item and stage (no reuse, no stage cache)")
    parser.add_argument("--cpus", type=float, default=1, help="--ray: CPUs each item declares (default 1)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    _ray_args(parser)
    args = parser.parse_args(argv)
    summary = run_sweep(args.recipes, args.out, console, ray=args.ray, force=args.force, cpus=args.cpus)
    verdict = "[green bold]PASSED[/]" if not summary["failed"] else "[red bold]FAILED[/]"
    console.print(f"{verdict} {summary['passed']} passed, {summary['failed']} failed in {summary['seconds']:.0f} s; "
                  f"{summary['out']}/sweep.md")
    return 1 if summary["failed"] else 0


def _ray_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                        help="run on Ray (extra [ray]): a cluster address (host:port), `auto` (the default: the "
                             "cluster this machine runs, else a new local instance) or `local` (a new local instance)")


def _without(argv: list[str], options: dict[str, str | None]) -> list[str]:
    """`argv` less the given options and their values: `options` maps each to the value it parsed when that value
    is optional (`--ray`, `--ray auto`, `--ray=auto`), or None when the option always takes the next token."""
    out, skip = [], False
    for i, token in enumerate(argv):
        if skip:
            skip = False
            continue
        flag = token.split("=", 1)[0]
        if flag in options:
            optional = options[flag]
            skip = "=" not in token and i + 1 < len(argv) and (optional is None or argv[i + 1] == optional)
            continue
        out.append(token)
    return out


COMMANDS = {"check": _check, "plan": _plan, "bench": _bench, "inspect": _inspect, "verify": _verify,
            "generate": _generate, "eval": _eval, "search": _search, "sweep": _sweep}


def quiet_progress_bars() -> None:
    """Silence tqdm bars of huggingface_hub / transformers (GGUF conversion, "Loading weights") and any other
    tqdm user; set before those libraries are imported."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    argv = list(sys.argv[1:] if argv is None else argv)
    logged = not sys.stderr.isatty()
    # In a log (CI, `| tee`, nohup): one unwrapped line per message, and no third-party progress bars (they
    # print carriage-return streams there); our own progress prints plain lines (exporter/progress.py).
    console = Console(stderr=True, highlight=False, soft_wrap=logged)
    if logged:
        quiet_progress_bars()
    debug = "--debug" in argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: " + USAGE)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])

    raise_on_sigterm()  # SIGTERM cleans up like Ctrl-C: nothing half-written is left looking complete
    try:
        return command(argv[1:], console) if command else _run(argv, console)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        from rich.markup import escape  # user text is not markup: '[gpu]' in a message must stay

        for line in str(exc).splitlines():
            console.print(f"[red]error:[/] {escape(line)}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]: nothing was published")
        return 130
    except Exception:  # an internal error: keep the traceback in a log, print one line
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # the environment, not a bug: one line
            console.print(f"[red]error:[/] no space left on the device while writing {exc.filename2 or exc.filename}; "
                          "nothing was published (free space, or delete artifacts/.stages/)", soft_wrap=True)
            return 2
        log = Path(tempfile.mkstemp(prefix="export-skip-", suffix=".log")[1])
        log.write_text(traceback.format_exc(), encoding="utf-8")
        if debug:
            traceback.print_exc()
        console.print(f"[red]internal error:[/] {sys.exc_info()[1]!s:.300} (traceback in {log})", soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
