"""Command line: the command table, each command's parser, exit codes.

Each command is a module of exporter/commands/ (the table's key) with `add_arguments(parser)` and
`run(args, console) -> int`; the main job, `export-skip RECIPE [options]`, is `run` and takes no command word.
A command's module is imported when it runs (or `--help` prints its usage) and imports torch, onnx and
onnxruntime only inside `run`, so `check`, `plan`, `inspect`, `verify` and `--help` start in a fraction of a second.

Exit codes: 0 every check passed; 1 a check failed or an internal error (log path printed);
2 a user error (one line, no traceback; --debug shows it).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import tempfile
import traceback
from pathlib import Path

from exporter.errors import CheckFailed, UserError
from exporter.pipeline.workdir import raise_on_sigterm

MAIN = "run"  # the main job: `export-skip RECIPE ...`, no command word
COMMANDS = {  # command -> the one line `export-skip --help` prints under its usage
    MAIN: "export, validate and report (the main job)",
    "check": "validate a recipe (and its mask against the model config)",
    "plan": "the cost model's predicted speedup, from the config alone",
    "bench": "ONNX Runtime latency, full vs skipped, interleaved (bench.json)",
    "inspect": "what an artifact folder holds: mask as a layer map, sizes, checks",
    "verify": "re-hash every file against manifest.json, check the ONNX graphs",
    "generate": "stream greedy text from an artifact",
    "eval": "perplexity, LAMBADA, KL / top-1 vs the full model (eval.json)",
    "search": "find a mask under a quality budget; writes a recipe",
    "sweep": "run many recipes (on Ray with --ray); sweep.json / sweep.md",
}


def command_module(name: str):
    """exporter/commands/<name>.py: `add_arguments(parser)` and `run(args, console) -> int`."""
    return importlib.import_module(f"exporter.commands.{name}")


def build_parser(name: str) -> argparse.ArgumentParser:
    """The command's parser: its module's arguments, and --debug."""
    parser = argparse.ArgumentParser(prog="export-skip" if name == MAIN else f"export-skip {name}",
                                     description=COMMANDS[name])
    command_module(name).add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser


def usage() -> str:
    """`export-skip --help`: every command's usage, as its parser writes it, and its one-line description."""
    blocks = []
    for name, description in COMMANDS.items():
        # "usage: " and the indent of the later lines are both 7 wide: argparse's wrapped lines stay aligned
        text = build_parser(name).format_usage().removeprefix("usage: ").rstrip()
        blocks.append(("usage: " if not blocks else " " * 7) + text + "\n" + " " * 11 + description)
    return "\n".join(blocks) + "\n\n`export-skip COMMAND --help` describes a command's options."


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
        print(usage())
        return 0 if argv else 2
    name = argv[0] if argv[0] in COMMANDS and argv[0] != MAIN else MAIN
    own = argv if name == MAIN else argv[1:]

    raise_on_sigterm()  # SIGTERM cleans up like Ctrl-C: nothing half-written is left looking complete
    try:
        args = build_parser(name).parse_args(own)
        args.argv = own  # as typed: `search` records its command line in the recipe it writes
        return command_module(name).run(args, console)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        from rich.markup import escape  # user text is not markup: '[gpu]' in a message must stay

        for line in str(exc).splitlines():
            console.print(f"[red]error:[/] {escape(line)}", soft_wrap=True)
        return 2
    except CheckFailed as exc:  # a check failed (its report says which): one line, exit 1
        if debug:
            traceback.print_exc()
        console.print(f"[red bold]FAILED[/] {exc}", soft_wrap=True, markup=True, highlight=False)
        return 1
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
