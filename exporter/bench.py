"""ONNX Runtime latency of the full and the skipped graph, measured interleaved, next to the cost model.

Every speed figure is a ratio of two medians taken in the same run: the graphs are timed in turn
(A B, then B A, ...) after a warm-up, so load from other processes hits both alike. Removal
efficiency = measured saving / predicted saving (cost.py), both as fractions of the full model's time.

Each graph runs in a process of its own (`GraphWorker`), which times `session.run` itself. On this
project's shared 2-core VM the order in which sessions (or processes) were opened mattered: in one process
later sessions ran the same SmolLM2 graph 9-17% faster than the first, and across processes the first
one opened was sometimes 10-15% slower than the others (docs/results/speed.md). So the rounds are split
over `repeats` sets of fresh workers, each set opened in a rotated order, and the times pooled.

`full_graph` exports the unskipped model once per base model (and optimizes it) into the export-skip
cache, so comparing masks of the same model pays the full export only once.
"""

from __future__ import annotations

import fcntl
import os

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from exporter.cost import predicted_decode_speedup, predicted_prefill_speedup
from exporter.errors import UserError

DECODE = [(1, 128), (1, 512), (1, 2048), (4, 128), (4, 512), (4, 2048)]  # (batch, context)
PREFILL = [(1, 128), (1, 512)]  # (batch, prompt tokens)
PEAK_CONTEXT = 4096
DECODE_ROUNDS = 20  # interleaved rounds per decode case; EXPORT_SKIP_BENCH_ROUNDS overrides (a 3% saving
PREFILL_ROUNDS = 5  # on a busy machine needs a few hundred rounds to stand out of the noise)
REPEATS = 2  # fresh worker processes per graph, opened in a rotated order each time (EXPORT_SKIP_BENCH_REPEATS)


def _positive_env(name: str, default: int) -> int:
    """A positive whole number from the environment variable `name`, else `default`."""
    import os

    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{name}={value!r}: expected a positive whole number")
    return int(value)


def decode_rounds() -> int:
    return _positive_env("EXPORT_SKIP_BENCH_ROUNDS", DECODE_ROUNDS)


def bench_repeats() -> int:
    return _positive_env("EXPORT_SKIP_BENCH_REPEATS", REPEATS)


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (the machine's business while we measured), [] where unknown."""
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# --- inputs and timing -----------------------------------------------------------------------------


def make_feeds(session, batch: int, seq: int, past: int, seed: int = 0, head_dim: int | None = None,
               zero_past: bool = False) -> dict:
    """Inputs for one call: `seq` new tokens after `past` cached ones.

    The past cache holds random values, not zeros: a large zero array can be lazily mapped memory in one
    worker and touched heap in another, which read at different cost (measured: docs/results/speed.md);
    `zero_past` keeps zeros for that comparison.

    Every array starts on a 64-byte boundary, as ORT's own outputs do (a decode loop feeds those back),
    where numpy's heap gives 16: the bench feeds what real decoding feeds. (Measured on SmolLM2: no
    difference either way, docs/results/speed.md; it rules out one way two workers could differ.)

    `head_dim` is needed only for graphs whose past inputs leave it symbolic (onnxruntime-genai's builder).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}
    feeds = {}
    for inp in session.get_inputs():
        name, dtype = inp.name, dtypes.get(inp.type)
        if name == "input_ids":
            feeds[name] = rng.integers(0, 100, (batch, seq), dtype=np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, past + seq), dtype=dtype or np.int64)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq)).copy()
        elif name.startswith("past_key_values.") or name.startswith("past_key."):
            _, heads, _, dim = inp.shape
            dim = dim if isinstance(dim, int) else head_dim
            if not isinstance(heads, int) or dim is None:
                raise UserError(f"graph input {name!r} has symbolic heads/head_dim {inp.shape}: cannot size the cache")
            shape = (batch, heads, past, dim)
            feeds[name] = (np.zeros(shape, dtype or np.float32) if zero_past else
                           rng.standard_normal(shape, dtype=np.float32).astype(dtype or np.float32))
        else:
            raise UserError(f"cannot feed graph input {name!r}: the bench drives graphs that follow the ONNX "
                            "contract (input_ids, attention_mask, position_ids, past_key_values.*)")
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


def session_for(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_interleaved(calls: dict, warmup: int, rounds: int, budget_s: float | None = None) -> dict[str, list[float]]:
    """{name: callable} -> {name: [seconds per call]}, alternating the order every round (A B, B A, ...).

    A call that returns a float has timed itself (a GraphWorker, in its own process): that is the figure kept.
    """
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            own = calls[name]()
            elapsed = time.perf_counter() - t0
            times[name].append(own if isinstance(own, float) else elapsed)
        if budget_s is not None and r >= 4 and time.perf_counter() - start > budget_s:
            break
    return times


def summarize(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    q = lambda f: ordered[min(len(ordered) - 1, int(f * len(ordered)))]  # noqa: E731
    return {"median_ms": round(statistics.median(seconds) * 1e3, 3), "p10_ms": round(q(0.1) * 1e3, 3),
            "p90_ms": round(q(0.9) * 1e3, 3), "n": len(seconds)}


def compare(times: dict, full: str, skipped: str, predicted_speedup: float | None) -> dict:
    """Measured ratio full / skipped, saving, and removal efficiency against the cost model."""
    f, s = statistics.median(times[full]), statistics.median(times[skipped])
    out = {"full": summarize(times[full]), "skipped": summarize(times[skipped]),
           "measured_speedup": round(f / s, 4), "measured_saving": round(1 - s / f, 4)}
    if predicted_speedup is not None:
        predicted_saving = 1 - 1 / predicted_speedup
        out["predicted_speedup"] = round(predicted_speedup, 4)
        out["predicted_saving"] = round(predicted_saving, 4)
        out["removal_efficiency"] = round(out["measured_saving"] / predicted_saving, 3) if predicted_saving > 0 else None
    return out


# --- memory --------------------------------------------------------------------------------------


def measured_kv_bytes_per_token(session, past: int = 15, head_dim: int | None = None) -> int:
    """Bytes of the present.* outputs of one decode step, per cached token (batch 1): measured, not computed."""
    outputs = [o.name for o in session.get_outputs()]
    values = session.run(None, make_feeds(session, 1, 1, past, head_dim=head_dim))
    total = sum(v.nbytes for name, v in zip(outputs, values) if name.startswith("present"))
    return total // (past + 1)


def peak_memory(path: Path, context: int, threads: int | None = None, head_dim: int | None = None) -> dict:
    """Peak RSS of a fresh process that loads `path` and runs one decode step at `context` (batch 1)."""
    cmd = [sys.executable, "-m", "exporter.bench", "--peak", str(path), str(context), str(threads or 0),
           str(head_dim or 0)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _peak_child(path: str, context: int, threads: int, head_dim: int = 0) -> None:
    # Sampled RSS, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent, so a child of a
    # large bench process would report the parent's peak.
    import psutil

    from exporter.measure import _PeakSampler

    session = session_for(Path(path), threads or None)
    loaded = psutil.Process().memory_info().rss
    feeds = make_feeds(session, 1, 1, context - 1, head_dim=head_dim or None)
    sampler = _PeakSampler(interval=0.005)
    sampler.start()
    session.run(None, feeds)
    peak = sampler.stop()
    print(json.dumps({"context": context, "peak_rss_mb": round(peak / 2**20, 1),
                      "after_load_rss_mb": round(loaded / 2**20, 1)}))


# --- one process per graph -----------------------------------------------------------------------------


class GraphWorker:
    """One ONNX Runtime session in a fresh process of its own, driven over a pipe (JSON lines).

    `prepare(batch, seq, past)` builds the inputs there; `run()` returns the seconds `session.run` took,
    measured in the worker (the pipe's round trip is not counted); `kv_bytes()` measures the present
    outputs. Every worker starts from the same state, whatever was opened before it.
    """

    def __init__(self, path: Path, threads: int | None = None, head_dim: int | None = None):
        import tempfile

        self.path = Path(path)
        self._stderr = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "exporter.bench", "--worker", str(self.path), str(threads or 0), str(head_dim or 0)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, bufsize=1)
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
    session = session_for(Path(path), threads or None)
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


def open_workers(graphs: dict, threads: int | None = None, head_dim: int | None = None) -> dict:
    workers = {}
    try:
        for name, path in graphs.items():
            workers[name] = GraphWorker(path, threads, head_dim)
    except BaseException:
        close_workers(workers)
        raise
    return workers


def close_workers(workers: dict) -> None:
    for worker in workers.values():
        worker.close()


# --- the full model's graph --------------------------------------------------------------------


def full_graph(recipe, model=None, console=None) -> Path:
    """The unskipped model's plain graph (and model.opt.onnx beside it), exported once into the cache."""
    import shutil

    from exporter import report as reports
    from exporter.cache import code_fingerprint, stage_key
    from exporter.models import cache_dir, describe_source, load_config, load_model, publish_folder
    from exporter.onnx_export import export_onnx
    from exporter.surgery import SkipMask, apply_skip

    key = stage_key({"model": describe_source(recipe.model), "dtype": recipe.model.dtype, "opset": recipe.export.opset,
                     "code": code_fingerprint("models", "architectures", "surgery", "onnx_export"),
                     "versions": reports.tool_versions()})
    folder = cache_dir() / "full-onnx" / key
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(f".{key}.lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # runs side by side export and refresh it once, never interleaved
        if not (folder / "model.onnx").is_file():
            if console is not None:
                console.print("exporting the unskipped model once for speed comparisons (cached for later runs)")
            if model is None:
                model, _ = load_model(recipe.model)
            tmp = folder.with_name(f".{key}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            export_onnx(apply_skip(model, SkipMask()), tmp, opset=recipe.export.opset)
            publish_folder(tmp, folder)
        _refresh_optimized(folder / "model.onnx", load_config(recipe.model), recipe.export.batch1_decode_path)
    return folder / "model.onnx"


def _refresh_optimized(plain: Path, config, batch1_path: bool = True) -> None:
    """(Re)write model.opt.onnx beside a cached full graph when optimize.py changed since it was written, or
    the recipe's `export.batch1_decode_path` differs (full and skipped graphs must be built alike)."""
    from exporter.cache import code_fingerprint
    from exporter.optimize import OPT_FILE, NotOptimizable, optimize_onnx

    stamp = plain.with_name("optimize.stamp")
    fingerprint = code_fingerprint("optimize", "gemv") + ("" if batch1_path else " no-batch1-path")
    if plain.with_name(OPT_FILE).is_file() and stamp.is_file() and stamp.read_text() == fingerprint:
        return
    try:
        optimize_onnx(plain, config, batch1_path=batch1_path)
    except NotOptimizable:
        plain.with_name(OPT_FILE).unlink(missing_ok=True)  # the bench then compares plain graphs only
    stamp.write_text(fingerprint)


def graph_pairs(full_plain: Path, skipped_plain: Path) -> dict[str, tuple[Path, Path]]:
    """{'plain': (full, skipped), 'optimized': (full, skipped)} for the variants present on disk."""
    from exporter.optimize import OPT_FILE

    pairs = {"plain": (full_plain, skipped_plain)}
    full_opt, skipped_opt = full_plain.with_name(OPT_FILE), skipped_plain.with_name(OPT_FILE)
    if full_opt.is_file() and skipped_opt.is_file():
        pairs["optimized"] = (full_opt, skipped_opt)
    return pairs


# --- the short measurement in the pipeline, and the full bench ------------------------------------------


def quick_ratio(config, mask, full_plain: Path, skipped_plain: Path, context: int = 512, budget_s: float = 4.0,
                precision: str = "float32") -> dict:
    """Decode at `context`, batch 1, full vs skipped, interleaved for about `budget_s` seconds per variant."""
    from exporter.cost import predicted_decode_speedup

    context = min(context, config.max_position_embeddings - 2)
    predicted = predicted_decode_speedup(config, mask, context, 1, precision)
    out = {"context": context, "batch": 1, "threads": 1}  # 1 thread: steadier on shared cores (speed.md)
    for variant, (full, skipped) in graph_pairs(full_plain, skipped_plain).items():
        workers = open_workers({"full": full, "skipped": skipped}, threads=1)
        try:
            for worker in workers.values():
                worker.prepare(1, 1, context)
            times = time_interleaved({n: w.run for n, w in workers.items()}, warmup=2, rounds=200, budget_s=budget_s)
        finally:
            close_workers(workers)
        out[variant] = compare(times, "full", "skipped", predicted)
        # A few seconds cannot resolve a saving smaller than the calls' own spread: say so, not a number alone.
        full_stats = out[variant]["full"]
        noise = (full_stats["p90_ms"] - full_stats["p10_ms"]) / (2 * full_stats["median_ms"])
        out[variant]["noise"] = round(noise, 4)
        out[variant]["resolved"] = noise < abs(1 - 1 / predicted)
    return out


def run_bench(recipe, out: Path, console, quick: bool = False, threads: int | None = None,
              extra: dict[str, Path] | None = None, rounds: int | None = None, repeats: int | None = None) -> int:
    """`export-skip bench`: writes bench.json and bench.md into the artifact folder `out`."""
    import onnxruntime as ort

    from exporter.models import load_config
    from exporter.recipe import resolve_mask

    skipped_plain = out / "model.onnx"
    if not skipped_plain.is_file():
        raise UserError(f"{skipped_plain} not found: run `export-skip {recipe.source_path}` first (or give --out)")
    config = load_config(recipe.model)
    mask = resolve_mask(recipe, config.num_hidden_layers)
    precision = recipe.model.dtype
    max_ctx = config.max_position_embeddings - 2
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    full_plain = full_graph(recipe, console=console)
    pairs = graph_pairs(full_plain, skipped_plain)
    graphs = {f"{side}:{variant}": path for variant, paths in pairs.items() for side, path in zip(("full", "skipped"), paths)}
    for name, path in (extra or {}).items():
        graphs[f"peer:{name}"] = Path(path)
    used_threads = threads or f"onnxruntime default ({_physical_cores()} physical cores)"
    decode_cases = [(1, min(512, max_ctx))] if quick else [(b, c) for b, c in DECODE if c <= max_ctx]
    prefill_cases = [] if quick else [(b, t) for b, t in PREFILL if t <= max_ctx]
    rounds = rounds or decode_rounds()
    peak_context = min(PEAK_CONTEXT, max_ctx)
    result = {"recipe": str(recipe.source_path), "graphs": {k: str(v) for k, v in graphs.items()},
              "threads": used_threads, "onnxruntime": ort.__version__, "precision": precision,
              "method": f"medians of interleaved calls (order alternates each round) after warm-up, one process "
                        f"per graph; decode {rounds} rounds, prefill {PREFILL_ROUNDS}",
              "load_average_start": load_average(), "graph_ops": {k: op_counts(v) for k, v in graphs.items()},
              "decode": [], "prefill": []}
    result["warnings"] = _variant_warnings(result["graph_ops"])
    for warning in result["warnings"]:
        if console is not None:
            console.print(f"warning: {warning}")
    repeats = repeats or bench_repeats()
    result["method"] += f"; {repeats} sets of fresh workers, each opened in a rotated order, times pooled"
    names = list(graphs)
    pooled = {}  # (phase, batch, size) -> {graph: [seconds]}
    kv = {}
    for repeat in range(repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        workers = open_workers({name: graphs[name] for name in order}, threads, head_dim)
        try:
            for phase, cases in (("decode", decode_cases), ("prefill", prefill_cases)):
                for batch, size in cases:
                    if console is not None:
                        what = f"context {size}" if phase == "decode" else f"{size} tokens"
                        console.print(f"{phase}: batch {batch}, {what} ({len(workers)} graphs interleaved, "
                                      f"set {repeat + 1} of {repeats})")
                    seq, past = (1, size) if phase == "decode" else (size, 0)
                    for worker in workers.values():
                        worker.prepare(batch, seq, past)
                    calls = {name: workers[name].run for name in names}
                    n = -(-(rounds if phase == "decode" else PREFILL_ROUNDS) // repeats)  # ceil
                    times = time_interleaved(calls, warmup=3 if phase == "decode" else 1, rounds=n)
                    slot = pooled.setdefault((phase, batch, size), {name: [] for name in names})
                    for name, t in times.items():
                        slot[name] += t
            if repeat == 0:
                kv = {name: worker.kv_bytes() for name, worker in workers.items()}
        finally:
            close_workers(workers)
    for (phase, batch, size), times in pooled.items():
        predicted = (predicted_decode_speedup(config, mask, size, batch, precision) if phase == "decode"
                     else predicted_prefill_speedup(config, mask, size))
        result[phase].append(_case(times, pairs, batch, size, predicted))
    result["load_average_end"] = load_average()
    if console is not None:
        console.print(f"memory: peak RSS at context {peak_context}, one fresh process per graph")
    result["memory"] = _memory(kv, graphs, config, mask, precision, peak_context, threads, quick, head_dim)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "bench.md").write_text("\n".join(render(result)) + "\n", encoding="utf-8")
    if (out / "manifest.json").is_file():  # a published folder: record the two files we added
        from exporter.manifest import record_files

        record_files(out, ["bench.json", "bench.md"])
    print("\n".join(render(result)))
    if console is not None:
        console.print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


def op_counts(path: Path) -> dict[str, int]:
    """{op type: nodes} of a graph (domain-qualified for contrib ops): what a peer's graph has that ours lacks."""
    import collections

    import onnx

    from exporter.gemv import body_graph

    proto = onnx.load(str(path), load_external_data=False)
    counts = collections.Counter(f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                                 for n in body_graph(proto).node)  # our optimized graph: its general branch
    return dict(counts.most_common())


def _variant_warnings(ops: dict) -> list[str]:
    """The full and skipped graphs of one variant must be built alike (say, by the same optimize.py): the
    kinds of op they use must match, else the ratio measures the rewrite, not the mask."""
    warnings = []
    for variant in ("plain", "optimized"):
        full, skipped = ops.get(f"full:{variant}"), ops.get(f"skipped:{variant}")
        if full is not None and skipped is not None and set(full) != set(skipped):
            warnings.append(f"{variant} graphs use different ops (full only: {sorted(set(full) - set(skipped))}, "
                            f"skipped only: {sorted(set(skipped) - set(full))}): re-export the artifact with "
                            "this version of export-skip before comparing them")
    return warnings


def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or psutil.cpu_count()


def _case(times: dict, pairs: dict, batch: int, size: int, predicted: float) -> dict:
    case = {"batch": batch, "size": size, "median_ms": {n: summarize(t) for n, t in times.items()}}
    for variant in pairs:
        case[variant] = compare(times, f"full:{variant}", f"skipped:{variant}", predicted)
    if "optimized" in pairs:  # how much faster the optimized graph is than the plain one, same model
        for side in ("full", "skipped"):
            case[f"{side}_optimized_vs_plain"] = round(
                statistics.median(times[f"{side}:optimized"]) / statistics.median(times[f"{side}:plain"]), 4)
    for name in times:
        if name.startswith("peer:"):
            for variant in pairs:  # ours / peer: <= 1.00 means ours is at least as fast
                ours = statistics.median(times[f"full:{variant}"])
                case[f"full_{variant}_vs_{name}"] = round(ours / statistics.median(times[name]), 4)
    return case


def _memory(kv: dict, graphs, config, mask, precision, context, threads, quick, head_dim=None) -> dict:
    """`kv`: {graph: measured KV bytes per token}; adds the cost model's figure and the peak RSS per graph."""
    from exporter.cost import kv_bytes_per_token

    full, skipped = kv["full:plain"], kv["skipped:plain"]
    n = config.num_hidden_layers
    removed_fraction = len(mask.attention) / n
    mem = {"kv_bytes_per_token_measured": kv,
           "kv_bytes_per_token_predicted": {"full": kv_bytes_per_token(config, None, precision),
                                            "skipped": kv_bytes_per_token(config, mask, precision)},
           "kv_reduction_measured": round(1 - skipped / full, 4),
           "attention_layers_removed_fraction": round(removed_fraction, 4),
           "kv_reduction_matches_removed_fraction": abs((1 - skipped / full) - removed_fraction) < 1e-6}
    if not quick:
        mem["peak_rss"] = {name: peak_memory(graphs[name], context, threads, head_dim) for name in graphs}
    return mem


def render(r: dict) -> list[str]:
    lines = [f"ONNX Runtime {r['onnxruntime']}, threads: {r['threads']}, {r['precision']}; {r['method']}.", "",
             "| phase | batch | context / tokens | graphs | full ms (p10-p90) | skipped ms (p10-p90) | measured speedup | "
             "predicted | removal efficiency |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for phase in ("decode", "prefill"):
        for case in r[phase]:
            for variant in ("plain", "optimized"):
                if variant not in case:
                    continue
                c = case[variant]
                f, s = c["full"], c["skipped"]
                lines.append(f"| {phase} | {case['batch']} | {case['size']} | {variant} | {f['median_ms']:.2f} "
                             f"({f['p10_ms']:.2f}-{f['p90_ms']:.2f}) | {s['median_ms']:.2f} ({s['p10_ms']:.2f}-{s['p90_ms']:.2f}) | "
                             f"{c['measured_speedup']:.3f}x | {c['predicted_speedup']:.3f}x | {c.get('removal_efficiency')} |")
    graphs = list(r["graphs"])
    lines += ["", "Every graph's median ms (p10-p90), same run:", "",
              "| phase | batch | context / tokens | " + " | ".join(graphs) + " |",
              "|---|---:|---:|" + "---:|" * len(graphs)]
    for phase in ("decode", "prefill"):
        for case in r[phase]:
            cells = [f"{m['median_ms']:.2f} ({m['p10_ms']:.2f}-{m['p90_ms']:.2f})"
                     for m in (case["median_ms"][g] for g in graphs)]
            lines.append(f"| {phase} | {case['batch']} | {case['size']} | " + " | ".join(cells) + " |")
    lines += [f"- WARNING: {w}" for w in r.get("warnings", [])]
    if r.get("load_average_start"):
        lines += ["", f"Load average (1, 5, 15 min) at start {r['load_average_start']}, "
                      f"before the memory checks {r.get('load_average_end')}."]
    extras = [(phase, case, k, v) for phase in ("decode", "prefill") for case in r[phase] for k, v in case.items()
              if k.endswith("_vs_plain") or "_vs_peer:" in k]
    if extras:
        lines += ["", "| phase | batch | context / tokens | ratio (time / time; < 1 is faster) | value |", "|---|---:|---:|---|---:|"]
        lines += [f"| {phase} | {case['batch']} | {case['size']} | {k} | {v:.3f} |" for phase, case, k, v in extras]
    m = r["memory"]
    lines += ["", "KV cache bytes per token, measured from the graphs' present outputs: "
                  + ", ".join(f"{k} {v:,}" for k, v in m["kv_bytes_per_token_measured"].items())
              + f"; reduction {m['kv_reduction_measured']:.1%} vs attention layers removed "
                f"{m['attention_layers_removed_fraction']:.1%}."]
    for name, peak in m.get("peak_rss", {}).items():
        if "error" in peak:
            lines.append(f"- peak RSS {name}: failed ({peak['error']})")
        else:
            lines.append(f"- peak RSS {name} at context {peak['context']}: {peak['peak_rss_mb']:,.0f} MiB "
                         f"(after load {peak['after_load_rss_mb']:,.0f} MiB)")
    return lines


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--peak":
    _peak_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    _worker_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))


def speed_stage(recipe, model, mask, skipped_plain: Path, console=None, budget_s: float = 3.0) -> dict:
    """For the pipeline's report: the cost model's prediction and a short measured ORT ratio, full vs skipped."""
    from exporter.cost import predict

    config = model.config
    precision = recipe.model.dtype
    contexts = [c for c in (128, 512, 2048) if c <= config.max_position_embeddings - 2] or [config.max_position_embeddings // 2]
    prediction = predict(config, mask, contexts=contexts, precision=precision)
    full_plain = full_graph(recipe, model=model, console=console)
    measured = quick_ratio(config, mask, full_plain, skipped_plain, context=512, budget_s=budget_s, precision=precision)
    return {"prediction": prediction, "measured": measured, "full_graph": str(full_plain)}


def speed_markdown(report: dict) -> list[str]:
    """report.md's speed section: the cost model's table and the short measured ratio."""
    from exporter.cost import render_prediction

    speed = report.get("speed")
    if not speed:
        return []
    m = speed["measured"]
    lines = ["", "## Speed", "", *render_prediction(speed["prediction"]), "",
             f"Measured in ONNX Runtime (CPU, intra-op threads: {m['threads']}), decode at context {m['context']}, batch 1, "
             "full and skipped graphs interleaved for a few seconds (`export-skip bench` measures more):", "",
             "| graph | full ms | skipped ms | measured speedup | predicted | removal efficiency |",
             "|---|---:|---:|---:|---:|---:|"]
    for variant in ("plain", "optimized"):
        if variant in m:
            c = m[variant]
            within = "" if c.get("resolved", True) else f" (within noise, ±{c['noise']:.0%})"
            lines.append(f"| {variant} | {c['full']['median_ms']:.2f} | {c['skipped']['median_ms']:.2f} | "
                         f"{c['measured_speedup']:.3f}x{within} | {c['predicted_speedup']:.3f}x | "
                         f"{c.get('removal_efficiency')} |")
    return lines
