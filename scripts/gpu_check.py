"""On a machine with an NVIDIA GPU: build engines for the GPU, check parity, time full vs skipped decode.

    .venv/bin/python scripts/gpu_check.py [--recipes recipes/tiny-mistral.yaml recipes/smollm2-135m.yaml]

For each recipe: export the skipped and the unskipped (full) graph in fp16, build an engine from each
with the backend that can run on this GPU (tensorrt; or tensorrt-rtx on RTX-class GPUs), check the
skipped engine against the masked PyTorch reference (teacher-forced, as the pipeline does), and time
decode steps of the two engines interleaved (full, skipped, skipped, full, ...) after a prefill of
`--context` tokens. Prints one JSON object; exit 0: parity passed, 1: it failed, 3: nothing ran. Called by scripts/gpu_check.sh; never run in this
project's CI (no GPU there), so its figures come from users' machines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RTX_CCS = {(7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1)}


def pick_backend() -> tuple[str | None, str]:
    import torch

    from exporter.backends.trt import missing_reason

    major, minor = torch.cuda.get_device_capability()
    if missing_reason("tensorrt") is None:
        return "tensorrt", f"sm{major}{minor}"
    if missing_reason("tensorrt-rtx") is None and (major, minor) in RTX_CCS:
        return "tensorrt-rtx", f"sm{major}{minor}"
    return None, f"sm{major}{minor}"


def time_steps(runners: dict, prompt, steps: int) -> dict:
    """Median ms per decode step for each runner, calls interleaved so drift hits both alike."""
    import torch

    ids, attn = prompt
    tokens = {name: r.prefill(ids, attn)[:, -1].argmax(-1, keepdim=True) for name, r in runners.items()}
    times = {name: [] for name in runners}
    names = list(runners)
    for i in range(steps):
        for name in names if i % 2 == 0 else names[::-1]:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tokens[name] = runners[name].step(tokens[name])[:, -1].argmax(-1, keepdim=True)  # .cpu() syncs
            times[name].append(time.perf_counter() - t0)
    return {name: round(statistics.median(t[3:]) * 1e3, 3) for name, t in times.items()}


def check_recipe(path: Path, backend: str, cc: str, work: Path, context: int, steps: int) -> dict:
    import torch

    from exporter.model.source import load_model
    from exporter.onnx.export import export_onnx, model_in_precision
    from exporter.checks.parity import check_parity
    from exporter.pipeline.settings import ReferenceSettings
    from exporter.pipeline.validate import validation_batches
    from exporter.mask import resolve_mask
    from exporter.recipe import load_recipe
    from exporter.backends.pytorch import HFRunner
    from exporter.backends.trt import TrtRunner
    from exporter.mask import SkipMask
    from exporter.model.surgery import apply_skip, masked
    from exporter.backends.trt import BuildOptions, build_engine

    recipe = load_recipe(path)
    model, tokenizer = load_model(recipe.model)
    mask = resolve_mask(recipe, model.config.num_hidden_layers)
    half = model_in_precision(model, "fp16")
    opts = BuildOptions(max_batch=2, max_context=context + steps + 8, compute_capabilities=(cc,))
    engines, out = {}, {"recipe": str(path), "mask": {"attention": list(mask.attention), "mlp": list(mask.mlp)}}
    for name, m in (("skipped", mask), ("full", SkipMask())):
        onnx_path = export_onnx(apply_skip(half, m), work / path.stem / name)
        sidecar = build_engine(onnx_path, work / path.stem / f"{name}.engine", backend, "fp16", opts)
        engines[name] = TrtRunner(work / path.stem / f"{name}.engine", backend)
        out[f"{name}_engine_bytes"] = sidecar.engine_bytes
    try:
        v = recipe.validation
        parity = []
        with masked(model, mask):
            for _, (ids, attn) in validation_batches(ReferenceSettings.of(recipe), tokenizer):
                phases, _ = check_parity(HFRunner(model), engines["skipped"], ids, attn, v.decode_steps,
                                         v.half_atol.prefill, v.half_atol.decode, f"{backend}:fp16")
                parity += [p.as_dict() for p in phases]
        out["parity"] = parity
        out["parity_passed"] = all(p["passed"] for p in parity)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (1, context), generator=generator)
        ms = time_steps(engines, (ids, torch.ones_like(ids)), steps)
        out["decode_ms"] = {"context": context, **ms, "speedup": round(ms["full"] / ms["skipped"], 4)}
    finally:
        for runner in engines.values():
            runner.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", nargs="+", type=Path,
                        default=[ROOT / "recipes" / "tiny-mistral.yaml", ROOT / "recipes" / "smollm2-135m.yaml"])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"ran": False, "reason": "no CUDA device visible to PyTorch"}))
        return 3  # nothing was checked: never report that as a pass
    backend, cc = pick_backend()
    summary = {"ran": backend is not None, "device": torch.cuda.get_device_name(), "compute_capability": cc,
               "backend": backend, "recipes": []}
    if backend is None:
        summary["reason"] = (f"no TensorRT backend can run engines on {cc}: install the [gpu] extra "
                             "(tensorrt; tensorrt-rtx engines run only on SM 7.5/8.0/8.6/8.9/12.x)")
    else:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            for path in args.recipes:
                summary["recipes"].append(check_recipe(path, backend, cc, Path(tmp), args.context, args.steps))
    print(json.dumps(summary, indent=1))
    if backend is None:
        return 3
    return 0 if all(r.get("parity_passed") for r in summary["recipes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
