"""`export-skip inspect DIR`: what an artifact folder holds, as rich tables.

Reads manifest.json (contents) and report.json (checks); other stages' results (speed, quality,
engines) are shown from whatever extra sections report.json has and whatever other *.json files lie
in the folder, so a new stage shows up here without a change to this module.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from exporter.commands.options import add_folder
from exporter.errors import UserError
from exporter.dtypes import ITEMSIZE
from exporter.checks.manifest import MANIFEST, read_manifest
from exporter.report import Report

# report.json sections drawn by a dedicated table below; any other section is shown generically.
_KNOWN = {"name", "passed", "created", "recipe", "model", "architecture", "num_layers", "mask",
          "kept_attention_layers", "parameters", "kv_cache", "artifacts", "onnx", "parity", "samples", "checks",
          "stages", "wall_seconds", "versions", "published_to"}
_KNOWN_FILES = {"manifest.json", "report.json", "genai_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "config.json", "generation_config.json"}


def _load(folder: Path) -> tuple[dict | None, dict | None]:
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (give an artifact folder, e.g. artifacts/smollm2-135m)")
    manifest = read_manifest(folder) if (folder / MANIFEST).is_file() else None
    loaded = Report.load(folder)
    report = loaded.to_json() if loaded is not None else None
    if manifest is None and report is None:
        raise UserError(f"{folder}: neither manifest.json nor report.json here; not an export-skip artifact folder")
    return manifest, report


def layer_map(num_layers: int, attention_skipped: list[int], mlp_skipped: list[int]) -> list[str]:
    """Rows of rich markup: ■ kept, · skipped, one column per layer, tens above units."""
    cols = range(num_layers)
    tens = "".join(str(i // 10) if i % 10 == 0 else " " for i in cols)
    units = "".join(str(i % 10) for i in cols)

    def row(skipped: list[int]) -> str:
        return "".join("[red]·[/]" if i in skipped else "[green]■[/]" for i in cols)

    return [f"layer      {tens}", f"           {units}", f"attention  {row(attention_skipped)}",
            f"MLP        {row(mlp_skipped)}",
            f"           [green]■[/] kept  [red]·[/] removed "
            f"({num_layers - len(attention_skipped)}/{num_layers} attention, {num_layers - len(mlp_skipped)}/{num_layers} MLP kept)"]


def _flatten(data, prefix: str = "") -> list[tuple[str, str]]:
    """Scalar leaves of nested JSON as (dotted key, value) rows; lists of scalars kept on one row."""
    if isinstance(data, dict):
        rows = []
        for key, value in data.items():
            rows += _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return rows
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        rows = []
        for i, value in enumerate(data):
            rows += _flatten(value, f"{prefix}[{i}]")
        return rows
    if isinstance(data, float):
        return [(prefix, f"{data:.4g}")]
    return [(prefix, json.dumps(data) if isinstance(data, (list, dict)) else str(data))]


def _kv_table(title: str, data, limit: int = 40):
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("key", style="cyan", no_wrap=True)
    table.add_column("value")
    rows = _flatten(data)
    for key, value in rows[:limit]:
        table.add_row(key, value)
    if len(rows) > limit:
        table.add_row("…", f"{len(rows) - limit} more (see the file)")
    return table


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def render(folder: Path, console) -> None:
    from rich.table import Table

    folder = Path(folder)
    manifest, report = _load(folder)
    source = report or manifest
    passed = source.get("passed")
    status = "[green]PASSED[/]" if passed else "[red]FAILED[/]" if passed is False else "unknown"
    console.print(f"[bold]{source.get('name', folder.name)}[/]  {status}  created {source.get('created', '?')}")
    model = (manifest or report).get("model", {})
    ident = model.get("id") or model.get("path") or model.get("kind", "?")
    extra = f" @ {model['revision']}" if model.get("revision") else ""
    extra += f" sha256 {model['sha256'][:16]}…" if model.get("sha256") else ""
    console.print(f"base model {ident}{extra} ({source.get('architecture')}, {source.get('num_layers')} layers)")
    if manifest:
        console.print(f"recipe {manifest['recipe'].get('source')} (sha256 {manifest['recipe']['sha256'][:16]}…)")
    console.print()

    mask = source.get("mask") or {}
    if source.get("num_layers"):
        for line in layer_map(source["num_layers"], mask.get("attention", []), mask.get("mlp", [])):
            console.print(line, highlight=False)
        console.print()

    if report and "parameters" in report:
        dtype = (manifest or report)["recipe"]["resolved"]["model"]["dtype"] if "recipe" in (manifest or report) else "float32"
        itemsize = ITEMSIZE.get(dtype, 4)
        p, kv = report["parameters"], report["kv_cache"]
        table = Table(title="Size", title_justify="left")
        for col in ("", "full", "skipped", "change"):
            table.add_column(col, justify="right" if col else "left")
        table.add_row("parameters", f"{p['full']:,}", f"{p['skipped']:,}", f"-{p['removed'] / p['full']:.1%}")
        table.add_row(f"weight bytes ({dtype})", _mib(p["full"] * itemsize), _mib(p["skipped"] * itemsize),
                      f"-{_mib(p['removed'] * itemsize)}")
        full_kv, skip_kv = kv["bytes_per_token_full"], kv["bytes_per_token_skipped"]
        table.add_row("KV cache bytes / token", f"{full_kv:,}", f"{skip_kv:,}",
                      f"-{1 - skip_kv / full_kv:.1%}" if full_kv else "")
        table.add_row("layers with a KV cache", str(kv["layers_full"]), str(kv["layers_skipped"]), "")
        console.print(table)

    files = manifest["files"] if manifest else (report or {}).get("artifacts", [])
    table = Table(title="Artifacts" + ("" if manifest else " (from report.json: no manifest)"), title_justify="left")
    for col in ("path", "kind", "size", "sha256"):
        table.add_column(col, justify="right" if col == "size" else "left", no_wrap=col != "path",
                         overflow="fold" if col == "path" else "ellipsis")
    for f in files:
        table.add_row(f["path"], f["kind"], _mib(f["bytes"]), f["sha256"][:12] + "…")
    console.print(table)

    if report and report.get("parity"):
        table = Table(title="Parity against the masked PyTorch model", title_justify="left")
        for col in ("artifact", "phase", "batch", "max |Δlogit|", "atol", "greedy", "passed"):
            table.add_column(col)
        for p in report["parity"]:
            table.add_row(p["artifact"], p["phase"], str(p["batch"]), f"{p['max_abs_diff']:.2e}", f"{p['atol']:.0e}",
                          "match" if p["greedy_match"] else f"{p['mismatches']} differ",
                          "[green]yes[/]" if p["passed"] else "[red]NO[/]")
        console.print(table)
    for s in (report or {}).get("samples", []):
        console.print(f"prompt {s['prompt']!r}\n  full:    {s['full']!r}\n  skipped: {s['skipped']!r}", highlight=False)

    # Speed, quality, engines, ...: sections and files other stages add.
    for key, value in (report or {}).items():
        if key not in _KNOWN and value not in (None, [], {}, ""):  # an empty section says nothing
            console.print(_kv_table(f"{key} (report.json)", value))
    for path in sorted(folder.glob("*.json")):
        if path.name not in _KNOWN_FILES:
            try:
                console.print(_kv_table(path.name, json.loads(path.read_text(encoding="utf-8"))))
            except json.JSONDecodeError:
                console.print(f"{path.name}: not valid JSON")
    if manifest:
        console.print("tools: " + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()), highlight=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_folder(parser)


def run(args: argparse.Namespace, console) -> int:
    from rich.console import Console

    render(args.folder, Console(highlight=False))  # on stdout, the diagnostics console is stderr
    return 0
