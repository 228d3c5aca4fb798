"""model.opt.onnx (fused ONNX Runtime contrib ops) beside the plain graph, with the same parity checks."""

from __future__ import annotations

from pathlib import Path

from exporter.backends.ort import OrtRunner
from exporter.onnx.session import SECOND_LAYOUT_MAX_BYTES
from exporter.files import describe_file
from exporter.onnx.contract import OPT_FILE, data_path
from exporter.onnx.graph import move_graph
from exporter.onnx.gemv import matmul_weight_shapes
from exporter.onnx.optimize import NotOptimizable, optimize_onnx
from exporter.checks.parity import check_recorded
from exporter.pipeline.results import Optimized
from exporter.pipeline.settings import OptimizeSettings
from exporter.checks.reference import REFERENCE_FILE, load_reference


# The batch-1 branch keeps a second layout of the weights resident (ONNX Runtime's one-row kernels read them
# unpacked): on SmolLM2 it made batch-1 decode 0.86x the builder's time for +0.5 GiB. On a 7B-class model that
# second layout is gigabytes at inference and pushed the run's own parity check past 1.7x the weights
# (docs/results/scale.md), so "auto" keeps it for small models only (SECOND_LAYOUT_MAX_BYTES).


def batch1_path(setting, weight_bytes: int) -> bool:
    """Whether the recipe's `export.batch1_decode_path` lets the tuner try the batch-1 paths for a model with
    `weight_bytes` of kept weights."""
    return weight_bytes <= SECOND_LAYOUT_MAX_BYTES if setting == "auto" else bool(setting)


# Built without tuning: packed weights, unless the recipe asks for the branch (`true`). The branch's other side
# (batch > 1, prompts) ran batch-4 decode 1.86x the packed graph's time and batch 1 1.11x on an AVX-512 EPYC
# (docs/results/speed.md), so it is no default to build unmeasured.
def default_batch1_path(setting) -> bool:
    return setting is True


PLAIN, PACKED, BRANCH, ONE_ROW = "plain", "packed", "batch1-branch", "one-row-dispatch"  # what the tuner times
# the candidates while they are timed (model.opt.onnx if chosen, else removed)
TUNE_FILES = {BRANCH: "tune-branch.onnx", ONE_ROW: "tune-one-row.onnx"}


def build_options(fused: dict | None, tuning: dict | None) -> dict | None:
    """The variant `fused` describes (report.json's "optimized_graph" and "tuning"), as OptimizeSettings.variant
    takes it ({"batch1_path", "one_row_layouts": {"KxN": layout} or None}), so the unskipped model's graph is built
    alike for speed comparisons; None: no optimized graph."""
    if not fused:
        return None
    variant = fused.get("variant", BRANCH if fused.get("batch1_unpacked_matmuls") else PACKED)
    layouts = None
    if variant == ONE_ROW:
        layouts = dict((tuning or {}).get("one_row_kernels", {}).get("layouts", {}))
    return {"batch1_path": variant == BRANCH, "one_row_layouts": layouts}


def optimize_options(variant: dict) -> dict:
    """optimize_onnx's keyword arguments for a variant of build_options' form."""
    named = variant.get("one_row_layouts") or {}
    layouts = {tuple(int(x) for x in shape.split("x")): how for shape, how in named.items()} or None
    return {"batch1_path": variant["batch1_path"], "one_row_layouts": layouts}


def optimize_stage(settings: OptimizeSettings, config, plain_path: Path, precision: str,
                   weight_bytes: int) -> Optimized:
    """Write model.opt.onnx beside the plain graph and check its parity exactly as the plain graph's.

    With `tune`, the variants are timed on this machine (timing/tune.py): the plain graph, the optimized
    graph with packed weights only, and, where `export.batch1_decode_path` allows it, with the batch-1 branch
    and with one-row dispatches of the weight shapes whose one-row layout this machine ran faster
    (timing/kernels.py; only built when some shape won);
    model.opt.onnx is the faster optimized one (each candidate is built once: the winner is renamed, not
    rebuilt) and "serve" names the graph genai_config.json points at. Without, the default variant is built (packed
    weights; the branch where the recipe sets `batch1_decode_path: true`) and served; with `settings.variant`,
    exactly that variant.
    A graph this rewrite does not handle is reported under not_run with the reason; the plain graph is then
    the only ONNX artifact.
    """
    out_dir = plain_path.parent
    opt = out_dir / OPT_FILE
    setting, tune = settings.batch1_decode_path, settings.tune
    branch = batch1_path(setting, weight_bytes) and precision == "fp32"  # the tuner may try it
    default_branch = default_batch1_path(setting) and precision == "fp32"
    tuning, not_run = None, []
    if tune and weight_bytes > SECOND_LAYOUT_MAX_BYTES:  # each candidate's session holds the weights again
        tune = False
        not_run.append({"check": "variant tuning (timing/tune.py)", "reason":
                        f"the candidates' sessions would hold the {weight_bytes / 2**30:.1f} GiB of weights once each, "
                        f"at once (tuned up to {SECOND_LAYOUT_MAX_BYTES / 2**30:.0f} GiB); the default variant was built"})
    try:
        if settings.variant is not None:
            fused = optimize_onnx(plain_path, config, **optimize_options(settings.variant))
        elif tune:
            fused, tuning = _tune(plain_path, config, branch, default_branch, settings.max_context)
        else:
            fused = optimize_onnx(plain_path, config, batch1_path=default_branch)
    except NotOptimizable as exc:
        return Optimized(serve=plain_path.name,
                         not_run=not_run + [{"check": "optimized graph (ONNX Runtime contrib ops)", "reason": str(exc)}])
    v = settings
    recorded = load_reference(out_dir / REFERENCE_FILE)
    parity = check_recorded(recorded, OrtRunner(opt, check=True), v.decode_steps, v.atol.prefill, v.atol.decode,
                            f"onnx:{precision}:optimized")
    artifact = describe_file(opt, out_dir, "onnx-optimized", precision)
    artifact["shares_external_data_with"] = plain_path.name
    artifacts = [artifact]
    if fused["data"]:  # the fused q/k/v weights (the other weights are read from the plain graph's file)
        artifacts.append(describe_file(out_dir / fused["data"], out_dir, "onnx-external-data", precision))
    fused["variant"] = (BRANCH if fused["batch1_unpacked_matmuls"] else
                        ONE_ROW if fused.get("one_row_dispatched_matmuls") else PACKED)
    serve = plain_path.name if tuning is not None and tuning["chosen"] == PLAIN else opt.name
    return Optimized(artifacts=artifacts, parity=parity, not_run=not_run, fused=fused, tuning=tuning, serve=serve)


def _tune(plain_path: Path, config, branch: bool, default_branch: bool, max_context: int) -> tuple[dict, dict]:
    """Build the packed variant as model.opt.onnx and (where `branch`) the batch-1 branch and one-row dispatch
    variants beside it, time them with the plain graph against the default (the branch where `default_branch`,
    else packed), keep the chosen optimized one as model.opt.onnx; (what was fused in it, the tuning record)."""
    from exporter.timing.kernels import one_row_layouts
    from exporter.timing.tune import THREADS, choose_variant

    opt = plain_path.with_name(OPT_FILE)
    files = {name: plain_path.with_name(f) for name, f in TUNE_FILES.items()}
    fused = {PACKED: optimize_onnx(plain_path, config, batch1_path=False)}
    candidates = {PLAIN: plain_path, PACKED: opt}
    kernels = None
    try:
        if branch:
            fused[BRANCH] = optimize_onnx(plain_path, config, out_path=files[BRANCH], batch1_path=True)
            candidates[BRANCH] = files[BRANCH]
            kernels = one_row_layouts(matmul_weight_shapes(opt), threads=THREADS)
            if any(how != "packed" for how in kernels["layouts"].values()):
                fused[ONE_ROW] = optimize_onnx(plain_path, config, out_path=files[ONE_ROW], batch1_path=False,
                                               one_row_layouts=kernels["layouts"])
                candidates[ONE_ROW] = files[ONE_ROW]
        tuning = choose_variant(candidates, default=BRANCH if default_branch else PACKED,
                                max_context=min(max_context, config.max_position_embeddings))
        if kernels is not None:  # JSON keys: "KxN"
            tuning["one_row_kernels"] = {**kernels, "layouts": {f"{k}x{n}": how for (k, n), how in kernels["layouts"].items()}}
        kept = tuning["default"] if tuning["chosen"] == PLAIN else tuning["chosen"]  # plain: the default is written
        if kept in files:
            move_graph(files[kept], opt)
            fused[kept].update(path=opt.name, data=data_path(opt).name if fused[kept]["data"] else None)
        return fused[kept], tuning
    finally:
        for candidate in files.values():
            candidate.unlink(missing_ok=True)
            data_path(candidate).unlink(missing_ok=True)
