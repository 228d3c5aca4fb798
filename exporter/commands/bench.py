"""ONNX Runtime latency of the full and the skipped graph, measured interleaved, next to the cost model.

Every speed figure is a ratio of two medians taken in the same run: the graphs are timed in turn
(A B, then B A, ...) after a warm-up, so load from other processes hits both alike. Removal
efficiency = measured saving / predicted saving (cost.py), both as fractions of the full model's time.

Each graph runs in a process of its own (`GraphWorker`), which times `session.run` itself. On this
project's shared 2-core VM the order in which sessions (or processes) were opened mattered: in one process
later sessions ran the same SmolLM2 graph 9-17% faster than the first, and across processes the first
one opened was sometimes 10-15% slower than the others (docs/results/speed.md). So the rounds are split
over `repeats` sets of fresh workers, each set opened in a rotated order, and the times pooled.

The timing itself is in timing/interleaved.py, the worker processes in timing/worker.py; the full model's graphs
come from the pipeline run with an empty mask (pipeline/run.py: unskipped_graph).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import psutil

from exporter.architectures import head_dim
from exporter.commands.options import add_recipe, positive
from exporter.pipeline.speed import graph_pairs
from exporter.timing.interleaved import compare, load_average, settle_for, summarize, time_interleaved
from exporter.machine import describe_machine, machine_info
from exporter.timing.worker import close_workers, open_workers, peak_memory
from exporter.cost import kv_bytes_per_token, predicted_decode_speedup, predicted_prefill_speedup
from exporter.errors import UserError
from exporter.checks.manifest import record_files
from exporter.mask import resolve_mask
from exporter.model.source import load_config
from exporter.recipe import load_recipe
from exporter.onnx.contract import ONNX_FILE

DECODE = [(1, 128), (1, 512), (1, 2048), (4, 128), (4, 512), (4, 2048)]  # (batch, context)
PREFILL = [(1, 128), (1, 512)]  # (batch, prompt tokens)
PEAK_CONTEXT = 4096
DECODE_ROUNDS = 20  # interleaved rounds per decode case; EXPORT_SKIP_BENCH_ROUNDS overrides (a 3% saving
PREFILL_ROUNDS = 5  # on a busy machine needs a few hundred rounds to stand out of the noise)
REPEATS = 2  # fresh worker processes per graph, opened in a rotated order each time (EXPORT_SKIP_BENCH_REPEATS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe(parser)
    parser.add_argument("--out", type=Path, metavar="DIR", help="artifact folder holding the skipped model.onnx "
                                                              "(default: artifacts/<recipe file stem>)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and cases (a smoke run)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="ONNX Runtime intra-op threads (default: cores)")
    parser.add_argument("--peer", action="append", default=[], metavar="NAME=ONNX",
                        help="another tool's graph of the full model, timed in the same run (repeatable)")
    parser.add_argument("--rounds", type=positive, metavar="N", help="interleaved decode rounds per case (default 20; "
                        "a 3%% saving on a busy machine needs a few hundred)")
    parser.add_argument("--repeats", type=positive, metavar="N",
                        help="sets of fresh worker processes, opened in rotated order (default 2)")


def run(args: argparse.Namespace, console) -> int:
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


def run_bench(recipe, out: Path, console, quick: bool = False, threads: int | None = None,
              extra: dict[str, Path] | None = None, rounds: int | None = None, repeats: int | None = None) -> int:
    """`export-skip bench`: writes bench.json and bench.md into the artifact folder `out`."""
    import onnxruntime as ort

    from exporter.onnx.graph import op_counts  # onnx, torch: imported when the bench runs, not for its --help
    from exporter.pipeline.run import unskipped_graph

    skipped_plain = out / ONNX_FILE
    if not skipped_plain.is_file():
        raise UserError(f"{skipped_plain} not found: run `export-skip {recipe.source_path}` first (or give --out)")
    config = load_config(recipe.model)
    mask = resolve_mask(recipe, config.num_hidden_layers)
    precision = recipe.model.dtype
    max_ctx = config.max_position_embeddings - 2
    kv_head_dim = head_dim(config)
    full_plain = unskipped_graph(recipe, _artifact_build(out), console)
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
              "machine": machine_info(threads),  # CPU model and ISA flags: kernel choice (so every figure) depends on them
              "method": f"medians of interleaved calls (order alternates each round) after warm-up, one process "
                        f"per graph; decode {rounds} rounds, prefill {PREFILL_ROUNDS}"
                        + (f"; an untimed {settle_for(threads):g} s pause after each call (the idle workers' threads "
                           "stop spinning)" if settle_for(threads) else ""),
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
        workers = open_workers({name: graphs[name] for name in order}, threads, kv_head_dim)
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
                    times = time_interleaved(calls, warmup=3 if phase == "decode" else 1, rounds=n,
                                             settle_s=settle_for(threads))
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
    result["memory"] = _memory(kv, graphs, config, mask, precision, peak_context, threads, quick, kv_head_dim)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "bench.md").write_text("\n".join(render(result)) + "\n", encoding="utf-8")
    if (out / "manifest.json").is_file():  # a published folder: record the two files we added

        record_files(out, ["bench.json", "bench.md"])
    print("\n".join(render(result)))
    if console is not None:
        console.print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


def _artifact_build(out: Path) -> dict | None:
    """The optimized variant the artifact in `out` was built in (its report.json), for the full graph to match."""
    from exporter.pipeline.optimize import build_options  # onnx, torch

    try:
        r = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return build_options(r.get("optimized_graph"), r.get("tuning"))


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


def _memory(kv: dict, graphs, config, mask, precision, context, threads, quick, kv_head_dim=None) -> dict:
    """`kv`: {graph: measured KV bytes per token}; adds the cost model's figure and the peak RSS per graph."""
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
        mem["peak_rss"] = {name: peak_memory(graphs[name], context, threads, kv_head_dim) for name in graphs}
    return mem


def render(r: dict) -> list[str]:
    lines = [f"ONNX Runtime {r['onnxruntime']}, threads: {r['threads']}, {r['precision']}; {r['method']}.", "",
             *([f"Machine: {describe_machine(r['machine'])}.", ""] if r.get("machine") else []),
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
