"""`export-skip sweep RECIPE... --out DIR [--ray [ADDRESS]]`: many recipes, each through the normal pipeline.

Each item is one recipe -> DIR/<name>/ (the pipeline's own atomic folder; its stage cache in DIR/.stages/<name>/).
Without --ray the items run one after another in this process; with --ray each is a Ray task that declares its
CPUs, its memory (cluster.memory_estimate of the recipe's kept weights) and a GPU where a `tensorrt` engine is
built, so a node never takes more than it can hold (exporter/cluster.py). Items fail alone, each with its
error's first line; a worker lost mid-item is retried by Ray; an item whose published folder still verifies
against its recipe, built by the same tool versions, is not redone (`--force` redoes everything). Before an
item counts as passed the driver re-hashes every file in its folder against its manifest.json
(exporter.checks.verify.verify): with --ray, DIR must be one path that every node and the driver see (a shared
filesystem). Writes DIR/sweep.json and DIR/sweep.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from exporter.cluster import Job, Resources, check_code, connect, disconnect, memory_estimate, run_tasks, where_am_i
from exporter.commands.options import add_ray
from exporter.cost import kept_parameters
from exporter.dtypes import itemsize
from exporter.errors import UserError
from exporter.files import write_text_atomic
from exporter.checks.manifest import MANIFEST
from exporter.checks.verify import verify
from exporter.mask import resolve_mask
from exporter.model.source import config_for_recipe
from exporter.progress import progress_bar
from exporter.recipe import Recipe, load_recipe
from exporter.report import Report
from exporter.versions import tool_versions

SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipes", nargs="+", metavar="RECIPE",
                        help="recipe files, or glob patterns ('recipes/tiny-*.yaml')")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="folder for every item's artifact folder, sweep.json and sweep.md "
                             "(with --ray: a path every node sees, on a shared filesystem)")
    parser.add_argument("--force", action="store_true", help="redo every item and stage (no reuse, no stage cache)")
    parser.add_argument("--cpus", type=float, default=1, metavar="N", help="--ray: CPUs each item declares (default 1)")
    add_ray(parser)


def run(args: argparse.Namespace, console) -> int:
    summary = run_sweep(args.recipes, args.out, console, ray=args.ray, force=args.force, cpus=args.cpus)
    verdict = "[green bold]PASSED[/]" if not summary["failed"] else "[red bold]FAILED[/]"
    console.print(f"{verdict} {summary['passed']} passed, {summary['failed']} failed in {summary['seconds']:.0f} s; "
                  f"{summary['out']}/sweep.md")
    return 1 if summary["failed"] else 0


@dataclass
class Item:
    path: Path
    name: str
    recipe: Recipe | None = None
    resources: Resources = field(default_factory=Resources)
    row: dict | None = None  # set once the item is finished (or failed before it ran)


def expand(patterns: list[str]) -> list[Path]:
    """Recipe paths in the order given; a pattern with * ? [ that names no file is a glob (sorted matches)."""
    paths: list[Path] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?[") and not Path(pattern).exists():
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise UserError(f"{pattern}: matches no recipe file")
            paths += [Path(m) for m in matches]
        else:
            paths.append(Path(pattern))
    return list(dict.fromkeys(paths))


def plan_items(paths: list[Path], cpus: float) -> list[Item]:
    """Load and size every recipe here; one that does not load (or whose mask does not fit its model) is a
    failed item with its error line, and never reaches a worker."""
    items = []
    for path in paths:
        item = Item(path=path, name=path.stem)
        try:
            item.recipe = load_recipe(path)
            item.name = item.recipe.name or path.stem
            config, _ = config_for_recipe(item.recipe)
            mask = resolve_mask(item.recipe, config.num_hidden_layers)
            memory = memory_estimate(kept_parameters(config, mask), itemsize(item.recipe.model.dtype))
            gpus = 1 if item.recipe.tensorrt is not None and "tensorrt" in item.recipe.tensorrt.backends else 0
            item.resources = Resources(num_cpus=cpus, memory=memory, num_gpus=gpus)
        except Exception as exc:  # noqa: BLE001 - a bad recipe fails its item, not the sweep
            item.row = _failed(item, _one_line(exc))
        items.append(item)
    names = [i.name for i in items]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"two recipes would write the same artifact folder: {', '.join(twice)} (set `name:` in them)")
    return items


def run_item(recipe: Recipe, folder: str, force: bool = False) -> dict:
    """One item, where it runs (this process, or a Ray worker): the pipeline, then what the summary needs."""
    from exporter.pipeline.run import run as run_pipeline  # torch, onnx: only where an item runs

    started = time.perf_counter()
    where = where_am_i()
    try:
        report = run_pipeline(recipe, Path(folder), console=None, force=force)
    except Exception as exc:  # noqa: BLE001 - the item fails alone; its first line is kept
        return {"error": _one_line(exc), "seconds": round(time.perf_counter() - started, 1), "worker": where}
    return {**summarise(report.to_json()), "folder": str(report.published_to),
            "seconds": round(time.perf_counter() - started, 1), "worker": where}


def summarise(report: dict) -> dict:
    """A report's line in the sweep: passed, the worst parity row (by max|Δ| / atol), predicted and measured speed."""
    worst = max(report["parity"], key=lambda p: p["max_abs_diff"] / p["atol"], default=None)
    speed = report.get("speed") or {}
    measured = speed.get("measured") or {}
    context = measured.get("context", 512)
    decode = [d for d in (speed.get("prediction") or {}).get("decode", []) if d["batch"] == 1]
    predicted = min(decode, key=lambda d: abs(d["context"] - context), default=None)
    failures = [f"{p['artifact']} {p['phase']}: max|Δ| {p['max_abs_diff']:.2e} vs atol {p['atol']:.0e}"
                for p in report["parity"] if not p["passed"]]
    failures += [f"{c['name']}: {c['value']} (limit {c['limit']})" for c in report["checks"] if not c["passed"]]
    return {
        "passed": report["passed"],
        "worst_parity": None if worst is None else {k: worst[k] for k in ("artifact", "phase", "max_abs_diff", "atol")},
        "predicted_speedup": None if predicted is None else {"context": predicted["context"], "speedup": predicted["speedup"]},
        "measured_speedup": (measured.get("plain") or {}).get("measured_speedup"),
        "error": "; ".join(failures)[:300] or None,
    }


def finish(item: Item, result: dict) -> dict:
    """The item's row: the worker's result, checked here. A folder the driver cannot re-hash against its
    manifest (missing, changed, or not on a filesystem the driver sees) fails the item."""
    if "worker" in result:
        try:
            check_code(result["worker"])
        except UserError as exc:
            return _failed(item, str(exc), result)
    if result.get("error") and "passed" not in result:
        return _failed(item, result["error"], result)
    folder = Path(result["folder"])
    if not (folder / MANIFEST).is_file():
        problems = [f"{folder}/{MANIFEST} is not visible here (is --out on a filesystem every node shares?)"]
    else:
        problems = [str(p) for p in verify(folder, item.path)]
    row = {**_row(item, result), "folder": str(folder), "hashes_ok": not problems,
           "passed": bool(result["passed"]) and not problems}
    if problems:
        row["error"] = f"verify: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
    return row


def reuse(item: Item, folder: Path) -> dict | None:
    """The row of an item whose published folder is already what this recipe builds (same recipe, same tool
    versions, passed, every file matching its manifest), or None: then the item runs."""
    if not (folder / MANIFEST).is_file():
        return None
    try:
        report = Report.load(folder)
        if report is None or not report.passed or report.versions != tool_versions() or verify(folder, item.path):
            return None
    except Exception:  # noqa: BLE001 - anything unreadable: build it again
        return None
    result = {**summarise(report.to_json()), "folder": str(folder)}
    return {**_row(item, result), "folder": str(folder), "hashes_ok": True, "passed": True, "reused": True}


def run_sweep(patterns: list[str], out: Path, console=None, ray: str | None = None, force: bool = False,
              cpus: float = 1) -> dict:
    """Every recipe through the pipeline (here, or on Ray); returns the summary also written to DIR/sweep.json."""
    started = time.perf_counter()
    out = out.expanduser().resolve()  # workers resolve nothing: they get absolute paths
    items = plan_items(expand(patterns), cpus)
    for item in items:
        if item.row is None and not force:
            item.row = reuse(item, out / item.name)
    todo = [i for i in items if i.row is None]
    cluster = None
    with progress_bar(console) as progress:
        task = progress.add_task("sweep", total=len(items))
        running: set[str] = set()  # on Ray: submitted and not finished (running, or queued for resources)

        def show(advance: int = 0) -> None:
            rows = [i.row for i in items if i.row is not None]
            failed = sum(not r["passed"] for r in rows)
            progress.update(task, advance=advance, description=f"sweep: {len(rows) - failed} passed, {failed} failed, "
                                                               f"{len(running)} {'in flight' if ray else 'running'}")

        def done(item: Item, result: dict) -> None:
            item.row = finish(item, result)
            running.discard(item.name)
            show(1)
            if console is not None:
                console.print(_line(item.row), highlight=False, soft_wrap=True)

        for item in items:
            if item.row is not None and console is not None:
                console.print(_line(item.row), highlight=False, soft_wrap=True)
        show(len(items) - len(todo))
        if ray is None:
            for item in todo:
                running.add(item.name)
                show()
                done(item, run_item(item.recipe, str(out / item.name), force))
        elif todo:
            cluster = connect(ray)
            if console is not None:
                console.print(f"Ray cluster: {cluster}; {len(todo)} item(s) to run, artifacts under {out} "
                              "(a path every node must see)")
            try:
                jobs = [Job(i.name, (i.recipe, str(out / i.name), force), i.resources) for i in todo]
                by_name = {i.name: i for i in todo}

                def submitted(job: Job) -> None:
                    running.add(job.name)
                    show()

                run_tasks(run_item, jobs, lambda job, result: done(by_name[job.name], result), submitted)
            finally:
                disconnect()
    rows = [i.row for i in items]
    summary = {"out": str(out), "ray": ray, "cluster": cluster, "force": force,
               "passed": sum(r["passed"] for r in rows), "failed": sum(not r["passed"] for r in rows),
               "seconds": round(time.perf_counter() - started, 1), "items": rows}
    write_summary(out, summary)
    return summary


def write_summary(out: Path, summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in ((SWEEP_JSON, json.dumps(summary, indent=2) + "\n"), (SWEEP_MD, render_markdown(summary))):
        write_text_atomic(out / name, text)


def render_markdown(summary: dict) -> str:
    where = f"Ray ({summary['ray']}: {summary['cluster']})" if summary["ray"] else "this machine, one item at a time"
    lines = [f"# Sweep: {summary['passed']} passed, {summary['failed']} failed", "",
             f"Artifacts under `{summary['out']}`, run on {where}, {summary['seconds']:.0f} s. "
             "Parity is the worst phase's max|Δlogit| against its atol; speed is decode at batch 1 "
             "(predicted by the cost model; measured in ONNX Runtime where the recipe asked). "
             "Hashes: every file re-hashed here against the item's manifest.json.", "",
             "| item | passed | worst parity (max abs diff / atol) | predicted speedup | measured speedup | folder | hashes | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["items"]:
        parity = r.get("worst_parity")
        parity = f"{parity['max_abs_diff']:.1e} / {parity['atol']:.0e} ({parity['artifact']} {parity['phase']})" if parity else ""
        pred = r.get("predicted_speedup")
        pred = f"{pred['speedup']:.3f}x at {pred['context']}" if pred else ""
        meas = f"{r['measured_speedup']:.3f}x" if r.get("measured_speedup") else ""
        passed = ("yes" + (" (earlier run)" if r.get("reused") else "")) if r["passed"] else "**no**"
        hashes = {True: "ok", False: "**mismatch**", None: ""}[r.get("hashes_ok")]
        error = (r.get("error") or "").replace("|", "\\|")
        lines.append(f"| {r['name']} | {passed} | {parity} | {pred} | {meas} | {r.get('folder') or ''} | {hashes} | {error} |")
    return "\n".join(lines) + "\n"


def _row(item: Item, result: dict) -> dict:
    worker = result.get("worker") or {}
    return {"name": item.name, "recipe": str(item.path), "passed": False, "error": result.get("error"),
            "worst_parity": result.get("worst_parity"), "predicted_speedup": result.get("predicted_speedup"),
            "measured_speedup": result.get("measured_speedup"), "folder": result.get("folder"), "hashes_ok": None,
            "seconds": result.get("seconds"), "host": worker.get("host"), "pid": worker.get("pid"),
            "resources": {"cpus": item.resources.num_cpus, "memory_gib": round(item.resources.memory / 2**30, 2),
                          "gpus": item.resources.num_gpus}}


def _failed(item: Item, error: str, result: dict | None = None) -> dict:
    return {**_row(item, result or {}), "error": error}


def _line(row: dict) -> str:
    if row["passed"]:
        how = "kept from an earlier run" if row.get("reused") else f"{row['seconds'] or 0:.0f} s"
        return f"[green]PASSED[/] {escape(row['name'])}: {escape(row['folder'])} ({how}, hashes ok)"
    return f"[red]FAILED[/] {escape(row['name'])}: {escape(row['error'] or '')}"


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return (text if isinstance(exc, UserError) else f"{type(exc).__name__}: {text}")[:300]
