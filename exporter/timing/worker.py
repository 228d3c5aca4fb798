"""One ONNX Runtime session per process, driven over a pipe (`GraphWorker`), and the peak-memory child.

On this project's shared 2-core VM the order in which sessions (or processes) were opened mattered: in one
process later sessions ran the same SmolLM2 graph 9-17% faster than the first, and across processes the
first one opened was sometimes 10-15% slower than the others (docs/results/speed.md). So every graph runs in
a fresh process of its own, which times `session.run` itself. Run as `python -m exporter.timing.worker`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from exporter.onnx.session import open_session
from exporter.errors import UserError
from exporter.measure import PeakSampler
from exporter.dtypes import numpy_dtype
from exporter.onnx.contract import MODEL_INPUTS, PAST, is_cache_input, is_cache_output

WORKER = "exporter.timing.worker"


def make_feeds(session, batch: int, seq: int, past: int, seed: int = 0, head_dim: int | None = None,
               zero_past: bool = False) -> dict:
    """Inputs for one call: `seq` new tokens after `past` cached ones.

    The past cache holds random values, not zeros: a large zero array can be lazily mapped memory in one
    worker and touched heap in another, which read at different cost (measured: docs/results/speed.md);
    `zero_past` keeps zeros for that comparison.

    Every array starts on a 64-byte boundary, as ORT's own outputs do (a decode loop feeds those back),
    where numpy's heap gives 16: the bench feeds what real decoding feeds. (Measured on SmolLM2: no
    difference either way, docs/results/speed.md; it rules out one way two workers could differ.)

    The layers' caches hold the same values, each in a buffer of its own (as a decode loop's are): one random
    draw per shape, not one per layer, which made preparing a batch-4 case cost a second per worker.

    `head_dim` is needed only for graphs whose past inputs leave it symbolic (onnxruntime-genai's builder).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds, filled = {}, {}
    for inp in session.get_inputs():
        name, dtype = inp.name, numpy_dtype(inp.type)
        if name == "input_ids":
            feeds[name] = rng.integers(0, 100, (batch, seq), dtype=np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, past + seq), dtype=dtype or np.int64)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq)).copy()
        elif is_cache_input(name):  # ours or a peer graph's (contract.PEER_PAST)
            _, heads, _, dim = inp.shape
            dim = dim if isinstance(dim, int) else head_dim
            if not isinstance(heads, int) or dim is None:
                raise UserError(f"graph input {name!r} has symbolic heads/head_dim {inp.shape}: cannot size the cache")
            shape, dtype = (batch, heads, past, dim), dtype or np.float32
            if (shape, dtype) not in filled:  # one random draw per shape, copied into each input's own buffer
                filled[shape, dtype] = (np.zeros(shape, dtype) if zero_past else
                                        rng.standard_normal(shape, dtype=np.float32).astype(dtype))
            feeds[name] = filled[shape, dtype]
        else:
            raise UserError(f"cannot feed graph input {name!r}: the bench drives graphs that follow the ONNX "
                            f"contract ({', '.join(MODEL_INPUTS)}, {PAST}*)")
    return {name: aligned(value) for name, value in feeds.items()}


ALIGNMENT = 64  # bytes: ORT's CPU allocator's alignment


def aligned(array):
    """A copy of `array` whose data starts on an ALIGNMENT-byte boundary."""
    import numpy as np

    buf = np.empty(array.nbytes + ALIGNMENT, dtype=np.uint8)
    start = -buf.ctypes.data % ALIGNMENT
    out = buf[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def measured_kv_bytes_per_token(session, past: int = 15, head_dim: int | None = None) -> int:
    """Bytes of the present cache outputs of one decode step, per cached token (batch 1): measured, not computed."""
    outputs = [o.name for o in session.get_outputs()]
    values = session.run(None, make_feeds(session, 1, 1, past, head_dim=head_dim))
    total = sum(v.nbytes for name, v in zip(outputs, values) if is_cache_output(name))
    return total // (past + 1)


def peak_memory(path: Path, context: int, threads: int | None = None, head_dim: int | None = None) -> dict:
    """Peak RSS of a fresh process that loads `path` and runs one decode step at `context` (batch 1)."""
    cmd = [sys.executable, "-m", WORKER, "--peak", str(path), str(context), str(threads or 0),
           str(head_dim or 0)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _peak_child(path: str, context: int, threads: int, head_dim: int = 0) -> None:
    # Sampled RSS, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent, so a child of a
    # large bench process would report the parent's peak.
    import psutil

    session = open_session(Path(path), threads or None)
    loaded = psutil.Process().memory_info().rss
    feeds = make_feeds(session, 1, 1, context - 1, head_dim=head_dim or None)
    sampler = PeakSampler(interval=0.005)
    sampler.start()
    session.run(None, feeds)
    peak = sampler.stop()
    print(json.dumps({"context": context, "peak_rss_mb": round(peak / 2**20, 1),
                      "after_load_rss_mb": round(loaded / 2**20, 1)}))


class GraphWorker:
    """One ONNX Runtime session in a fresh process of its own, driven over a pipe (JSON lines).

    `prepare(batch, seq, past)` builds the inputs there; `run()` returns the seconds `session.run` took,
    measured in the worker (the pipe's round trip is not counted); `kv_bytes()` measures the present
    outputs. Every worker starts from the same state, whatever was opened before it.
    """

    def __init__(self, path: Path, threads: int | None = None, head_dim: int | None = None, wait: bool = True):
        import tempfile

        self.path = Path(path)
        self._stderr = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", WORKER, "--worker", str(self.path), str(threads or 0), str(head_dim or 0)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, bufsize=1)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Returns once the worker has opened its session (raises if it died doing so)."""
        self._ask({"op": "ping"})

    def _ask(self, message: dict):
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self._stderr.seek(0)
            tail = self._stderr.read().decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"bench worker for {self.path} died: {tail[0]}")
        answer = json.loads(line)
        if "user_error" in answer:
            raise UserError(answer["user_error"])
        if "error" in answer:
            raise RuntimeError(f"bench worker for {self.path}: {answer['error']}")
        return answer.get("value")

    def prepare(self, batch: int, seq: int, past: int) -> None:
        self._ask({"op": "prepare", "batch": batch, "seq": seq, "past": past})

    def run(self) -> float:
        return float(self._ask({"op": "run"}))

    def kv_bytes(self) -> int:
        return int(self._ask({"op": "kv"}))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._stderr.close()


def _worker_main(path: str, threads: int, head_dim: int) -> None:
    session = open_session(Path(path), threads or None)
    feeds = None
    for line in sys.stdin:
        message = json.loads(line)
        try:
            op, value = message["op"], None
            if op == "prepare":
                feeds = None  # free the previous case's cache first
                feeds = make_feeds(session, message["batch"], message["seq"], message["past"], head_dim=head_dim or None)
            elif op == "run":
                t0 = time.perf_counter()
                session.run(None, feeds)
                value = time.perf_counter() - t0
            elif op == "kv":
                value = measured_kv_bytes_per_token(session, head_dim=head_dim or None)
            answer = {"value": value}
        except UserError as exc:
            answer = {"user_error": str(exc)}
        except Exception as exc:  # reported to the parent, which raises it
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def open_workers(graphs: dict, threads: int | None = None, head_dim: int | None = None,
                 together: bool = False) -> dict:
    """One worker per graph, opened in the order given; `together`: all started at once, then waited for (tuning;
    measured on 3 SmolLM2 graphs: 3.44-3.59 s together, 3.5-3.9 s one after another, so no faster, only simpler;
    the bench opens them one after another in a rotated order, which its timings account for)."""
    workers = {}
    try:
        for name, path in graphs.items():
            workers[name] = GraphWorker(path, threads, head_dim, wait=not together)
        for worker in workers.values() if together else ():
            worker.wait_ready()
    except BaseException:
        close_workers(workers)
        raise
    return workers


def close_workers(workers: dict) -> None:
    for worker in workers.values():
        worker.close()


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--peak":
    _peak_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    _worker_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
