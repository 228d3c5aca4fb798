"""The report of a run: report.json (the record of checks, a typed structure) and report.md (the same, for people).

`Report` is the one definition of report.json's sections: the pipeline builds it, and manifest, inspect and eval
read it. Sections other commands add later (eval's `quality`) are kept as extra keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from exporter.cost import render_prediction
from exporter.errors import UserError

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


class Report(BaseModel):
    """report.json. Nested records stay plain JSON (artifacts, parity rows, checks) as the stages write them."""

    model_config = ConfigDict(extra="allow")

    name: str
    passed: bool
    created: str
    recipe: dict
    model: dict  # the base model's identity (models.describe_source)
    architecture: str
    num_layers: int
    mask: dict  # SkipMask.describe()
    kept_attention_layers: list[int]
    parameters: dict
    kv_cache: dict
    artifacts: list[dict]  # files.describe_file records
    onnx: dict  # the plain graph's I/O signature
    parity: list[dict]  # parity.PhaseResult rows
    samples: list[dict]
    checks: list[dict]  # {name, value, limit, passed}
    not_run: list[dict]  # checks that could not run here, with the reason; never passed
    half_precision_greedy: dict
    engines: dict | None
    optimized_graph: dict | None
    speed: dict
    tuning: dict | None = None  # the variants timed on the building machine and the choice (timing/tune.py)
    served_graph: str | None = None  # the graph genai_config.json names
    int4: dict | None = None  # the int4 graph: what was quantized, its fit to the fp32 reference (pipeline/quantize.py)
    stages: list[dict]
    wall_seconds: float | None
    versions: dict

    def __getitem__(self, key: str) -> Any:
        """A section as report.json has it (`report["parity"]`)."""
        return self.to_json()[key]

    def get(self, key: str, default=None) -> Any:
        return self.to_json().get(key, default)

    def to_json(self) -> dict:
        return self.model_dump(mode="json")

    def write(self, folder: Path) -> None:
        """report.json and report.md into `folder`."""
        (folder / REPORT_JSON).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        (folder / REPORT_MD).write_text(render_markdown(self.to_json()), encoding="utf-8")

    def add_section(self, folder: Path, key: str, value: dict) -> None:
        """Another command's results (eval's quality) as a section of a folder's report.json."""
        data = self.to_json() | {key: value}
        (folder / REPORT_JSON).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> Report | None:
        """The folder's report.json, None when there is none; a file that is not a report is a user error."""
        path = Path(folder) / REPORT_JSON
        if not path.is_file():
            return None
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
        except ValueError as exc:
            raise UserError(f"{path}: not a report.json of export-skip ({str(exc).splitlines()[0]})") from None


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def describe_model(model: dict) -> str:
    """One phrase for the base model's identity (report.json keeps the full record), and the byte tokenizer
    when it stood in for a missing one."""
    tokenizer = model.get("tokenizer")
    note = f" (tokenizer: one token per byte, since {tokenizer['fallback']})" if tokenizer else ""
    if model["kind"] == "hub":
        return f"`{model['id']}` (revision {model['revision']}){note}"
    if model["kind"] == "gguf":
        return f"GGUF `{Path(model['path']).name}` (sha256 {model['sha256'][:12]}…){note}"
    if model["kind"] == "path":
        return f"folder `{model['path']}`{note}"
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
    lines += speed_markdown(r)
    lines += tuning_markdown(r)
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


def tuning_markdown(r: dict) -> list[str]:
    """Which graph variant the run chose on its machine, and the timings it chose by."""
    from exporter.machine import describe_machine

    t, served = r.get("tuning"), r.get("served_graph")
    if not t:
        return ["", "## Graph served", "", f"`{served}` (the default variant: not tuned)."] if served else []
    names = list(t["scores"])
    lines = ["", "## Graph variant, chosen on this machine", "",
             f"Chosen: **{t['chosen']}** (default {t['default']}); onnxruntime-genai serves `{served}`. "
             f"Timed on {describe_machine(t['machine'])}, about {sum(t['budget_s'].values()):.1f} s in all, calls interleaved; "
             f"score = geometric mean of the time relative to the default (a variant must beat it by {t['margin']:.0%}).", "",
             "| shape | " + " | ".join(f"{n} ms" for n in names) + " |", "|---|" + "---:|" * len(names)]
    for shape, ms in t["median_ms"].items():
        lines.append(f"| {shape} | " + " | ".join(f"{ms[n]:.2f}" for n in names) + " |")
    lines.append("| score | " + " | ".join(f"{t['scores'][n]:.3f}" for n in names) + " |")
    k = t.get("one_row_kernels")
    if k:  # what the one-row dispatch variant was built from (timing/kernels.py)
        lines += ["", "One-row MatMul layouts timed per weight shape (median us per MatMul, weights streamed; a layout "
                  f"other than packed must win by {k['margin']:.0%}):", "",
                  "| K x N | packed | unpacked | transposed | chosen |", "|---|---:|---:|---:|---|"]
        for shape, us in k["median_us_per_matmul"].items():
            lines.append(f"| {shape} | {us['packed']:.0f} | {us['unpacked']:.0f} | {us['transposed']:.0f} | "
                         f"{k['layouts'][shape]} |")
    return lines


def speed_markdown(report: dict) -> list[str]:
    """report.md's speed section: the cost model's table and the short measured ratio."""
    speed = report.get("speed")
    if not speed:
        return []
    m = speed["measured"]
    if m is None:
        why = speed.get("not_measured") or "validate.speed: false"
        return ["", "## Speed", "", *render_prediction(speed["prediction"]), "",
                f"Not measured in this run: {why}."]
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
