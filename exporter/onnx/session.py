"""ONNX Runtime sessions (CPU by default), without torch: bench workers and tuning open them in fresh processes,
where importing torch would cost seconds per process."""

from __future__ import annotations

import os
import re
from pathlib import Path

from exporter.onnx.contract import data_path


# A second layout of the weights (ONNX Runtime's prepacked MatMul panels, the batch-1 branch's unpacked copy)
# is kept only for graphs of at most this many weight bytes: on a 7B-class model it is gigabytes.
SECOND_LAYOUT_MAX_BYTES = 2 << 30

# Sessions that only check parity of a bigger graph do not prepack MatMul weights: prepacking keeps a second,
# re-laid-out copy of every weight resident (the weights twice), which buys speed a few validation steps do not
# need. Smaller graphs are checked as they are deployed (prepacked: the kernels, and so the rounding, users get).
# EXPORT_SKIP_CHECK_PREPACK=1 / =0 forces it on / off. Measured: docs/results/scale.md.
CHECK_CONFIG = {"session.disable_prepacking": "1"}


def graph_bytes(path: Path) -> int:
    """Bytes of a graph file and of every external data file it reads (its own and, for an optimized graph, the
    plain graph's, which holds most of its weights: counting only its own file once let a 7B-class model's
    optimized graph be checked prepacked, the weights twice in memory)."""
    from exporter.onnx.graph import external_data_files

    files = {data_path(path), *external_data_files(path)}
    return path.stat().st_size + sum(f.stat().st_size for f in files if f.is_file())


def check_prepacks(path: Path) -> bool:
    """Whether a parity session of `path` prepacks its weights (see CHECK_CONFIG)."""
    forced = os.environ.get("EXPORT_SKIP_CHECK_PREPACK")
    return forced == "1" if forced in ("0", "1") else graph_bytes(path) <= SECOND_LAYOUT_MAX_BYTES


def open_session(model, threads: int | None = None, providers: list[str] | None = None, check: bool = False):
    """An InferenceSession of `model` (a graph file's path, a serialized graph's bytes, or an onnx ModelProto built
    in memory) with quiet logging and, when given, `threads` intra-op threads; `check`: a session that only checks
    parity (CHECK_CONFIG where the graph file is big)."""
    import onnxruntime as ort

    if hasattr(model, "SerializeToString"):  # a ModelProto
        model = model.SerializeToString()
    in_memory = isinstance(model, bytes)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if check and not in_memory and not check_prepacks(Path(model)):
        for key, value in CHECK_CONFIG.items():
            options.add_session_config_entry(key, value)
    return ort.InferenceSession(model if in_memory else str(model), options,
                                providers=providers or ["CPUExecutionProvider"])


def ort_unsupported_op(error: Exception) -> str | None:
    """'Where(16) node node_where' when ONNX Runtime has no kernel for a node on this provider, else None."""
    match = re.search(r"Could not find an implementation for (\S+?\(\d+\)) node with name '([^']*)'", str(error))
    return f"{match[1]} node {match[2]}" if match else None
