"""TensorRT engines: tensorrt-rtx builds on this CPU-only machine; running engines needs a GPU (marked `gpu`).

Builds need `tensorrt-rtx` (extra `[rtx]`, installed by scripts/setup.sh's default EXTRAS); without it
the build tests skip, saying so. What must work without any TensorRT is tested unconditionally.
"""

import importlib.util
import json
import os
import subprocess
import sys

import onnx
import pytest
import torch

from conftest import PROMPTS, make_mask
from exporter.errors import UserError
from exporter.onnx.export import export_onnx, model_in_precision
from exporter.model.surgery import apply_skip
from exporter.backends.trt import (BackendMissing, BuildOptions, ParseError, build_engine, check_sidecar, engine_profiles,
                                  import_backend, missing_reason, profile_shapes, sidecar_path)
from exporter.files import sha256_file as sha256
from helpers import ROOT, TINY_RECIPE, cli, one_node_onnx

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx is not installed (pip install -e '.[rtx]')")
OPTS = BuildOptions(max_batch=2, max_context=64, compute_capabilities=("sm89",))


@pytest.fixture(scope="module")
def tiny_graphs(tiny_models, tmp_path_factory):
    """The tiny mistral (sliding window, GQA) with attention skipped in layers 1-2, in fp32 and fp16."""
    model, _ = tiny_models["mistral"]
    out = {}
    for precision in ("fp32", "fp16"):
        skipped = apply_skip(model_in_precision(model, precision), make_mask("attention"))
        out[precision] = export_onnx(skipped, tmp_path_factory.mktemp(precision))
    return out


def test_profiles_cover_prefill_and_decode():
    inputs = {"input_ids": (-1, -1), "attention_mask": (-1, -1), "position_ids": (-1, -1),
              "past_key_values.0.key": (-1, 2, -1, 16), "past_key_values.0.value": (-1, 2, -1, 16)}
    shapes = profile_shapes(inputs, BuildOptions(max_batch=4, max_context=128))
    prefill, decode = shapes["prefill"], shapes["decode"]
    assert prefill["past_key_values.0.key"] == [[1, 2, 0, 16], [1, 2, 0, 16], [4, 2, 0, 16]]  # empty past
    assert prefill["input_ids"][2] == [4, 128]
    assert decode["input_ids"] == [[1, 1], [1, 1], [4, 1]]  # one token per step
    assert decode["past_key_values.0.value"][2] == [4, 2, 127, 16]
    assert decode["attention_mask"][2] == [4, 128]  # past + sequence never exceeds max_context
    with pytest.raises(UserError, match="not part of the ONNX contract"):
        profile_shapes({"pixel_values": (-1, 3)}, BuildOptions())


def test_missing_backend_is_one_line_naming_the_extra():
    # The official tensorrt wheels cannot be installed on these machines, so `tensorrt` is missing here.
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here; the missing-backend message cannot be observed")
    reason = missing_reason("tensorrt")
    assert "export-skip[gpu]" in reason and "\n" not in reason
    with pytest.raises(BackendMissing, match=r"export-skip\[gpu\]"):
        import_backend("tensorrt")
    assert "unknown TensorRT backend" in missing_reason("tensorrt-llm")


def test_recipe_requiring_a_missing_backend_exits_2_with_one_line(tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE.read_text() + "tensorrt: {backends: [tensorrt], required: true}\n")
    result = cli(recipe, "--out", tmp_path / "out", timeout=300)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tensorrt.required" in errors[0] and "export-skip[gpu]" in errors[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@needs_rtx
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_rtx_engine_build_and_sidecar(tiny_graphs, tmp_path, precision):
    onnx_path = tiny_graphs[precision]
    engine = tmp_path / f"tiny.{precision}.engine"
    sidecar = build_engine(onnx_path, engine, "tensorrt-rtx", precision, OPTS)
    meta = json.loads(sidecar_path(engine).read_text())
    assert meta["engine_bytes"] == engine.stat().st_size > 0
    assert meta["engine_sha256"] == sha256(engine) and meta["onnx_sha256"] == sha256(onnx_path)
    assert meta["backend"] == "tensorrt-rtx" and meta["backend_version"] and meta["precision"] == precision
    assert meta["compute_capabilities"] == ["sm89"] and meta["build_seconds"] > 0
    # the profiles cover every graph input, for prefill and decode
    graph_inputs = [i.name for i in onnx.load(str(onnx_path), load_external_data=False).graph.input]
    assert set(meta["profiles"]) == {"prefill", "decode"}
    for shapes in meta["profiles"].values():
        assert list(shapes) == graph_inputs
    assert meta["profiles"]["decode"]["past_key_values.0.key"][2] == [2, 1, 63, 16]
    assert meta == json.loads(json.dumps(vars(sidecar)))
    assert check_sidecar(engine, onnx_path) == []
    # the sidecar check fails when the engine or the graph is not the one recorded
    engine.write_bytes(engine.read_bytes()[:-1])
    assert any("bytes" in p for p in check_sidecar(engine, onnx_path))
    other = tiny_graphs["fp32" if precision == "fp16" else "fp16"]
    assert any("sha256" in p for p in check_sidecar(engine, other))


@needs_rtx
def test_build_options_reach_the_sidecar(tiny_graphs, tmp_path):
    cache = tmp_path / "timing.cache"
    opts = BuildOptions(max_batch=1, max_context=32, compute_capabilities=("sm86", "sm120"), optimization_level=1,
                        hardware_compatibility="ampere_plus", timing_cache=cache)
    sidecar = build_engine(tiny_graphs["fp16"], tmp_path / "e.engine", "tensorrt-rtx", "fp16", opts)
    assert not cache.exists() and sidecar.timing_cache is None  # tensorrt-rtx has no timing cache
    assert sidecar.compute_capabilities == ["sm86", "sm120"] and sidecar.optimization_level == 1
    assert sidecar.hardware_compatibility == "ampere_plus"
    assert sidecar.profiles["prefill"]["input_ids"][2] == [1, 32]


@needs_rtx
def test_fp16_engine_is_smaller_than_fp32(tiny_graphs, tmp_path):
    sizes = {p: build_engine(tiny_graphs[p], tmp_path / f"{p}.engine", "tensorrt-rtx", p, OPTS).engine_bytes
             for p in ("fp32", "fp16")}
    assert sizes["fp16"] < sizes["fp32"], sizes


@needs_rtx
def test_parser_failure_names_the_node_and_op(tmp_path):
    path = one_node_onnx(tmp_path / "bad.onnx", "NoSuchOp", shape=(1, 4), domain="example.custom", name="mystery_node")
    with pytest.raises(ParseError, match=r"node mystery_node \(op NoSuchOp\)"):
        build_engine(path, tmp_path / "bad.engine", "tensorrt-rtx", "fp32", OPTS)
    assert not (tmp_path / "bad.engine").exists()


@needs_rtx
def test_tiny_mistral_recipe_builds_engines_and_reports_missing_backends(tmp_path):
    """recipes/tiny-mistral.yaml end to end, plus the `tensorrt` backend, which is missing here."""
    recipe = tmp_path / "tiny-mistral.yaml"
    text = (ROOT / "recipes" / "tiny-mistral.yaml").read_text()
    assert "backends: [tensorrt-rtx]" in text
    recipe.write_text(text.replace("backends: [tensorrt-rtx]", "backends: [tensorrt-rtx, tensorrt]"))
    out = tmp_path / "tiny-mistral"
    result = cli(recipe, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads((out / "report.json").read_text())
    engines = {(a["precision"], a["path"]) for a in r["artifacts"] if a["kind"] == "engine"}
    assert engines == {("fp32", "engines/tensorrt-rtx.fp32.engine"), ("fp16", "engines/tensorrt-rtx.fp16.engine")}
    for a in r["artifacts"]:
        assert (out / a["path"]).stat().st_size == a["bytes"]
    for built in r["engines"]["built"]:
        onnx_path = out / "model.onnx" if built["precision"] == "fp32" else out / "fp16" / "model.onnx"
        assert check_sidecar(out / built["path"], onnx_path) == []
    if importlib.util.find_spec("tensorrt") is None:
        not_built = r["engines"]["not_built"]
        assert {(n["backend"], n["precision"]) for n in not_built} == {("tensorrt", "fp32"), ("tensorrt", "fp16")}
        assert all("export-skip[gpu]" in n["reason"] for n in not_built)
    # the fp16 graph was checked in ORT against the fp32 reference, batch 1 and left-padded batch 2
    half = [p for p in r["parity"] if p["artifact"] == "onnx:fp16"]
    assert {(p["phase"], p["batch"]) for p in half} == {(ph, b) for ph in ("prefill", "decode") for b in (1, 2)}
    assert all(p["passed"] for p in half) and r["not_run"] == []
    assert {"precisions", "engines"} <= {s["name"] for s in r["stages"]}
    md = (out / "report.md").read_text()
    assert "tensorrt-rtx" in md and "onnx:fp16" in md


def test_pipeline_without_tensorrt_still_exports_and_says_why(tmp_path, monkeypatch):
    """No TensorRT at all: ONNX is exported and validated, the report lists engines not built and why."""
    from exporter.pipeline import run as pipeline
    from exporter.backends import trt as tensorrt
    from exporter.recipe import TensorRT, load_recipe

    for backend, (_, extra, how) in list(tensorrt.BACKENDS.items()):  # point both at modules that do not exist
        monkeypatch.setitem(tensorrt.BACKENDS, backend, (f"not_installed_{extra}", extra, how))
    recipe = load_recipe(TINY_RECIPE).model_copy(update={"tensorrt": TensorRT()})
    report = pipeline.run(recipe, tmp_path / "tiny")
    assert report["passed"]
    assert report["engines"]["built"] == [] and not any(a["kind"] == "engine" for a in report["artifacts"])
    assert [(n["backend"], n["precision"]) for n in report["engines"]["not_built"]] == [("tensorrt-rtx", "fp32")]
    assert "export-skip[rtx]" in report["engines"]["not_built"][0]["reason"]
    assert (tmp_path / "tiny" / "model.onnx").is_file()
    assert "not built" in (tmp_path / "tiny" / "report.md").read_text()


# --- on a GPU (scripts/gpu_check.sh); skipped here with the reason -------------------------------------

def _gpu_backend():
    for backend in ("tensorrt", "tensorrt-rtx"):
        if missing_reason(backend) is None and importlib.util.find_spec("polygraphy") is not None:
            major, minor = torch.cuda.get_device_capability()
            if backend == "tensorrt-rtx" and (major, minor) not in {(7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1)}:
                continue  # tensorrt-rtx engines do not run on e.g. Hopper
            return backend, f"sm{major}{minor}"
    pytest.skip("no TensorRT backend that can run engines on this GPU (tensorrt, or tensorrt-rtx on RTX-class GPUs)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to PyTorch")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_trt_runner_parity_against_masked_reference(tiny_models, tiny_graphs, tmp_path, precision):
    from exporter.checks.parity import check_parity
    from exporter.model.prompts import left_padded
    from exporter.backends.pytorch import HFRunner
    from exporter.backends.trt import TrtRunner
    from exporter.model.surgery import masked

    backend, cc = _gpu_backend()
    opts = BuildOptions(max_batch=2, max_context=64, compute_capabilities=(cc,))
    engine = tmp_path / f"{precision}.engine"
    build_engine(tiny_graphs[precision], engine, backend, precision, opts)
    # the sidecar's profiles are the ones the engine reports (deserialising needs the GPU)
    meta = json.loads(sidecar_path(engine).read_text())
    for name, per_profile in engine_profiles(engine, backend).items():
        assert per_profile == [meta["profiles"][p][name] for p in ("prefill", "decode")], name
    model, tok = tiny_models["mistral"]
    ids, attn = left_padded(tok, PROMPTS)
    runner = TrtRunner(engine, backend)
    atol = 1e-3 if precision == "fp32" else 2e-2  # TF32/fp16 kernels vs the fp32 CPU reference
    try:
        with masked(model, make_mask("attention")):
            phases, _ = check_parity(HFRunner(model), runner, ids, attn, 8, atol, atol, f"{backend}:{precision}")
    finally:
        runner.close()
    for p in phases:
        assert p.passed, p


@pytest.mark.slow
@pytest.mark.real_weights
@needs_rtx
def test_smollm2_fp16_parity_and_engine_sizes():
    """The bars on real SmolLM2-135M weights (scripts/smollm2_fp16.py; ~10 min on 2 busy cores):
    fp16 ONNX in ORT CPU gives the fp32 reference's greedy tokens for 16 steps; a tensorrt-rtx fp16
    engine of the skipped model builds on the CPU within 10 minutes and is smaller than the unskipped
    model's by at least the removed weights (fp16 bytes); the engine also drops those layers' kernels."""
    pytest.importorskip("gguf")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "smollm2_fp16.py")], capture_output=True,
                            text=True, timeout=3600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    ort = summary["ort_fp16"]
    assert ort["not_run"] == [] and ort["greedy"]["fp16"]["identical"] and ort["greedy"]["fp16"]["tokens"] == 17
    assert all(p["passed"] and p["mismatches"] == 0 and p["near_ties"] == 0 for p in ort["parity"])
    engines = summary["engines"]
    assert engines["skipped"]["build_seconds"] < 600
    removed = engines["removed_weight_bytes_fp16"]
    assert engines["full"]["onnx_data_bytes"] - engines["skipped"]["onnx_data_bytes"] == removed
    assert 0.9 * removed <= engines["engine_bytes_saved"] <= 2.0 * removed, engines
