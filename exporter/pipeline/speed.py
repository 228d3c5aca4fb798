"""The run's speed figure: the cost model's prediction and a few seconds of interleaved ONNX Runtime timing,
full vs skipped (`export-skip bench` measures properly)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from exporter.errors import CheckFailed
from exporter.onnx.contract import OPT_FILE
from exporter.pipeline.results import Speed
from exporter.pipeline.settings import SpeedSettings
from exporter.timing.interleaved import compare, time_interleaved
from exporter.timing.worker import close_workers, open_workers
from exporter.cost import predict, predicted_decode_speedup


def graph_pairs(full_plain: Path, skipped_plain: Path) -> dict[str, tuple[Path, Path]]:
    """{'plain': (full, skipped), 'optimized': (full, skipped)} for the variants present on disk."""
    pairs = {"plain": (full_plain, skipped_plain)}
    full_opt, skipped_opt = full_plain.with_name(OPT_FILE), skipped_plain.with_name(OPT_FILE)
    if full_opt.is_file() and skipped_opt.is_file():
        pairs["optimized"] = (full_opt, skipped_opt)
    return pairs


def quick_ratio(config, mask, full_plain: Path, skipped_plain: Path, context: int = 512, budget_s: float = 4.0,
                precision: str = "float32") -> dict:
    """Decode at `context`, batch 1, full vs skipped, interleaved for about `budget_s` seconds per variant."""
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


# What the run measures. A few seconds of interleaved timing on a shared 2-core machine resolve a decode saving
# of about 5% at best (the quick ratio's own spread, p10-p90, was 4-13% of the median on SmolLM2:
# docs/results/speed.md), and the unskipped graph it needs is a second export of the whole model. So the run
# measures only a predicted saving of at least QUICK_RESOLVES on a model of at most QUICK_MAX_WEIGHT_BYTES;
# otherwise it reports the cost model and says why nothing was timed (`export-skip bench` measures properly).
QUICK_RESOLVES = 0.05
QUICK_MAX_WEIGHT_BYTES = 2 << 30
QUICK_CONTEXT = 512


def speed_stage(settings: SpeedSettings, config, mask, skipped_plain: Path, weight_bytes: int,
                full_graph: Callable[[], Path], budget_s: float = 3.0) -> Speed:
    """For the pipeline's report: the cost model's prediction and, where it can resolve the predicted saving,
    a short measured ORT ratio, full vs skipped; `full_graph()` gives the unskipped model's plain graph (the
    pipeline run with an empty mask, its optimized graph in the skipped artifact's variant), called only then."""
    precision = settings.dtype
    if not settings.measure:
        return Speed(prediction=predict(config, mask, precision=precision), not_measured="validate.speed: false")
    contexts = [c for c in (128, 512, 2048) if c <= config.max_position_embeddings - 2] or [config.max_position_embeddings // 2]
    prediction = predict(config, mask, contexts=contexts, precision=precision)
    context = min(QUICK_CONTEXT, config.max_position_embeddings - 2)
    saving = 1 - 1 / predicted_decode_speedup(config, mask, context, 1, precision)
    why = None
    if saving < QUICK_RESOLVES:
        why = (f"the predicted decode saving at context {context} ({saving:.1%}) is below the {QUICK_RESOLVES:.0%} "
               "that a few seconds of timing resolve on a shared machine")
    elif weight_bytes > QUICK_MAX_WEIGHT_BYTES:
        why = (f"the run does not export the unskipped model of {weight_bytes / 2**30:.1f} GiB a second time "
               "to time it")
    if why is not None:
        return Speed(prediction=prediction, not_measured=f"{why}; `export-skip bench RECIPE` measures full vs skipped")
    try:
        full_plain = full_graph()
    except CheckFailed as exc:  # the unskipped model's own run failed a check: no sound comparison to time
        return Speed(prediction=prediction, not_measured=f"{exc}; `export-skip bench RECIPE` measures full vs skipped")
    measured = quick_ratio(config, mask, full_plain, skipped_plain, context=context, budget_s=budget_s,
                           precision=precision)
    return Speed(prediction=prediction, measured=measured, full_graph=str(full_plain))
