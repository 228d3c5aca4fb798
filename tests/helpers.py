"""Plain helpers the test files share (fixtures live in conftest.py): the CLI in a subprocess, a one-node ONNX graph."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny-llama.yaml"


def _argv(args) -> list[str]:
    return [sys.executable, "-m", "exporter.cli", *map(str, args)]


def _env(env: dict | None) -> dict:
    # offline: no test reaches the network (a hub id must fail with the one-line hint, not hang)
    return {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}


def cli(*args, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """`export-skip ARGS...` (`python -m exporter.cli`) run to the end; stdout and stderr captured as text.
    `env` adds to (or overrides) the environment."""
    return subprocess.run(_argv(args), capture_output=True, text=True, env=_env(env), timeout=timeout)


def _default_sigint() -> None:
    # A shell that starts pytest in the background ignores SIGINT, and children inherit that (Python then
    # installs no KeyboardInterrupt handler): give the run the disposition a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(*args) -> subprocess.Popen:
    """The same command started in the background, for a test to read its stderr (text) line by line and
    signal it as a user would (SIGINT included); stdout is discarded."""
    return subprocess.Popen(_argv(args), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env(None),
                            preexec_fn=_default_sigint)


def one_node_onnx(path: Path, op: str = "Identity", inputs=("x",), outputs=("y",), shape=(1,), domain: str = "",
                  name: str = "") -> Path:
    """Save a graph of one node `op` (float tensors of `shape` in and out; opset 18, plus `domain` version 1)."""
    import onnx
    from onnx import TensorProto, helper

    def values(names):
        return [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in names]

    node = helper.make_node(op, list(inputs), list(outputs), name=name or None, domain=domain or None)
    graph = helper.make_graph([node], "g", values(inputs), values(outputs))
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path
