"""The command line itself: one module per command, usage generated from the parsers, the README's command list
kept in step with them, and a `--help` that loads no heavy library."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from exporter import cli

ROOT = Path(__file__).resolve().parents[1]
HELP = ("-h", "--help")


def options(name: str) -> list[str]:
    """Every option string of the command's parser (-h / --help aside)."""
    return [s for action in cli.build_parser(name)._actions for s in action.option_strings if s not in HELP]


def mentioned(option: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def readme_commands() -> dict[str, str]:
    """{command: the text of its README bullets}: a bullet headed by the command (`export-skip RECIPE` is the main
    job), and a bullet headed by an option shared by several commands (`--ray [ADDRESS]` (`search`, `sweep`; ...))."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    text = re.sub(r"--\[no-\]([\w-]+)", r"--\1 --no-\1", section)  # `--[no-]chat` names --chat and --no-chat
    out: dict[str, str] = {}
    for bullet in re.split(r"\n(?=- )", text)[1:]:
        head = re.match(r"- \*\*`([^`]+)`\*\*(?: \(([^)]*)\))?", bullet)
        if head is None:
            continue
        if head[1].startswith("--"):
            names = re.findall(r"`(\w+)`", head[2] or "")
        else:
            first = head[1].split()[0]
            names = [cli.MAIN if first == "export-skip" else first]
        for name in names:
            out[name] = out.get(name, "") + bullet
    out[""] = section.split("\n- ", 1)[0]  # the section's opening lines: what every command takes
    return out


def test_every_command_has_a_module():
    for name in cli.COMMANDS:
        assert (ROOT / "exporter" / "commands" / f"{name}.py").is_file(), name
        module = cli.command_module(name)
        assert callable(module.add_arguments) and callable(module.run), name


def test_help_shows_every_option_of_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, description in cli.COMMANDS.items():
        assert description in out
        missing = [o for o in options(name) if not mentioned(o, out)]
        assert not missing, f"export-skip --help lacks {name}'s {missing}"
    assert out.startswith("usage: export-skip ") and "export-skip sweep" in out


def test_no_arguments_print_the_usage_and_exit_2(capsys):
    assert cli.main([]) == 2
    assert capsys.readouterr().out.startswith("usage: export-skip ")


def test_a_command_help_is_its_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: export-skip eval ") and "--windows" in out and "--tasks" in out


def test_the_readme_lists_every_option_of_every_command():
    readme = readme_commands()
    for name in cli.COMMANDS:
        assert name in readme, f"README.md's Commands section has no bullet for {name}"
        common = [o for o in options(name) if mentioned(o, readme[""])]  # --debug: said once for all
        missing = [o for o in options(name) if o not in common and not mentioned(o, readme[name])]
        assert not missing, f"README.md's `{name}` bullet lacks {missing}"


def test_help_loads_no_heavy_library():
    code = ("import sys, contextlib, io; from exporter.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['--help'])\n"
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'transformers', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
