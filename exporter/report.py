"""report.json (the record of checks) and report.md (the same, for people)."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("export-skip", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tensorrt-rtx",
            "tensorrt", "polygraphy", "onnxruntime-genai", "safetensors", "tokenizers")


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def describe_file(path: Path, root: Path, kind: str, precision: str | None = None) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return {"kind": kind, "precision": precision, "path": str(path.relative_to(root)),
            "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def write_json(report: dict, out_dir: Path) -> Path:
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def describe_model(model: dict) -> str:
    """One phrase for the base model's identity (report.json keeps the full record)."""
    if model["kind"] == "hub":
        return f"`{model['id']}` (revision {model['revision']})"
    if model["kind"] == "gguf":
        return f"GGUF `{Path(model['path']).name}` (sha256 {model['sha256'][:12]}…)"
    if model["kind"] == "path":
        return f"folder `{model['path']}`"
    return f"random weights from a config (seed {model.get('seed')})"


def render_markdown(r: dict) -> str:
    mask, params = r["mask"], r["parameters"]
    lines = [
        f"# {r['name']}: {'PASSED' if r['passed'] else 'FAILED'}",
        "",
        f"Recipe `{r['recipe']['path']}`, base model {describe_model(r['model'])} ({r['architecture']}, "
        f"{r['num_layers']} layers).",
        "",
        "## Mask",
        "",
        f"- attention skipped: {mask['attention'] or 'none'}",
        f"- MLP skipped: {mask['mlp'] or 'none'}",
        f"- whole blocks removed: {mask['blocks'] or 'none'}",
        f"- kept attention layers (KV cache entries): {len(r['kept_attention_layers'])} of {r['num_layers']}",
        "",
        "## Size",
        "",
        "| | full | skipped |",
        "|---|---:|---:|",
        f"| parameters | {params['full']:,} | {params['skipped']:,} |",
        f"| KV cache bytes per token | {r['kv_cache']['bytes_per_token_full']:,} | {r['kv_cache']['bytes_per_token_skipped']:,} |",
        "",
        "## Checks",
        "",
        "| check | value | limit | passed |",
        "|---|---:|---:|:---:|",
    ]
    for c in r["checks"]:
        lines.append(f"| {c['name']} | {c['value']} | {c['limit']} | {'yes' if c['passed'] else 'NO'} |")
    lines += [
        "",
        "## Parity against the masked PyTorch model",
        "",
        "| artifact | phase | batch | steps | max abs logit diff | atol | greedy tokens match | passed |",
        "|---|---|---:|---:|---:|---:|:---:|:---:|",
    ]
    for p in r["parity"]:
        match = "yes" if p["greedy_match"] else f"NO ({p['mismatches']} differ)"
        if p["near_ties"]:
            match += f", {p['near_ties']} near-tie(s)"
        lines.append(f"| {p['artifact']} | {p['phase']} | {p['batch']} | {p['steps']} | {p['max_abs_diff']:.2e} | "
                     f"{p['atol']:.0e} | {match} | {'yes' if p['passed'] else 'NO'} |")
    lines += ["", "## Greedy samples", ""]
    for s in r["samples"]:
        lines += [f"Prompt: `{s['prompt']}`", "", f"- full model: {s['full']!r}", f"- skipped model: {s['skipped']!r}", ""]
    lines += ["## Artifacts", "", "| kind | precision | path | size | sha256 |", "|---|---|---|---:|---|"]
    for a in r["artifacts"]:
        lines.append(f"| {a['kind']} | {a['precision'] or ''} | `{a['path']}` | {_mb(a['bytes'])} | `{a['sha256'][:16]}…` |")
    lines += engines_markdown(r)
    if r.get("speed") and r["speed"]["measured"] is None:
        from exporter.cost import render_prediction

        lines += ["", "## Speed", "", *render_prediction(r["speed"]["prediction"]), "",
                  "Not measured in this run (`validate.speed: false`); `export-skip bench RECIPE` measures it."]
    else:
        from exporter.bench import speed_markdown

        lines += speed_markdown(r)
    lines += ["", "## Stages", "", "| stage | wall s | peak RSS MiB |", "|---|---:|---:|"]
    for s in r["stages"]:
        lines.append(f"| {s['name']} | {s['seconds']:.1f} | {s['peak_rss_mb']:,.0f} |")
    lines += ["", "Tool versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()), ""]
    return "\n".join(lines)


def engines_markdown(r: dict) -> list[str]:
    """TensorRT engines built / not built, half-precision greedy agreement, and checks that could not run."""
    lines = []
    engines = r.get("engines")
    if engines:
        lines += ["", "## TensorRT engines", "",
                  "Built ahead of time; running them (parity, speed) is checked on a GPU: scripts/gpu_check.sh.", ""]
        for e in engines["built"]:
            lines.append(f"- `{e['path']}`: {e['backend']} {e['backend_version']}, {e['precision']}, "
                         f"{_mb(e['engine_bytes'])}, targets {', '.join(e['compute_capabilities'])}, "
                         f"built in {e['build_seconds']:.1f} s")
        for n in engines["not_built"]:
            lines.append(f"- {n['backend']} {n['precision']}: not built: {n['reason']}")
    for precision, g in (r.get("half_precision_greedy") or {}).items():
        said = "identical" if g["identical"] else f"first differs at token {g['first_difference']}"
        lines.append(f"\nonnx:{precision} free-running greedy tokens vs the reference ({g['tokens']} tokens): {said}")
    if r.get("not_run"):
        lines += ["", "## Checks not run (not passed)", ""]
        lines += [f"- {n['check']}: {n['reason']}" for n in r["not_run"]]
    return lines


def write_markdown(report: dict, out_dir: Path) -> Path:
    path = out_dir / "report.md"
    path.write_text(render_markdown(report), encoding="utf-8")
    return path
