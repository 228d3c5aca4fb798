"""`export-skip RECIPE` end to end: artifact folder, report contents, exit codes, publish-on-success."""

import json

import pytest

from helpers import ROOT, TINY_RECIPE, cli


def test_tiny_recipe_passes_and_writes_the_artifact(tmp_path):
    out = tmp_path / "tiny-llama"
    result = cli(TINY_RECIPE, "--out", out, "--no-tune")
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.onnx.data", "model.opt.onnx", "model.opt.onnx.data", "report.json",
                                               "report.md", "manifest.json", "recipe.yaml", "genai_config.json", "reference.npz"}
    # --no-tune: the default variant (packed weights, no batch-1 branch), served, and the recipe says so
    r = json.loads((out / "report.json").read_text())
    assert r["tuning"] is None and r["recipe"]["resolved"]["export"]["tune"] is False
    assert r["optimized_graph"]["variant"] == "packed" and r["optimized_graph"]["batch1_unpacked_matmuls"] == 0
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "model.opt.onnx"
    assert "`model.opt.onnx` (the default variant: not tuned)" in (out / "report.md").read_text()


def test_report_json_contents(tiny_artifact):
    out = tiny_artifact
    r = json.loads((out / "report.json").read_text())
    assert r["passed"] is True
    assert r["mask"] == {"attention": [3, 4], "mlp": [4], "blocks": [4]}
    assert r["kept_attention_layers"] == [0, 1, 2, 5]
    params = r["parameters"]
    assert params["full"] - params["skipped"] == params["removed"] == params["removed_modules"] > 0
    kinds = {a["kind"]: a for a in r["artifacts"]}
    assert set(kinds) == {"onnx", "onnx-external-data", "onnx-optimized", "recipe", "genai-config", "reference"}
    for a in r["artifacts"]:
        assert (out / a["path"]).stat().st_size == a["bytes"] and len(a["sha256"]) == 64
    # parity: ONNX and the skipped torch model, batch 1 and a left-padded batch 2, prefill and decode
    combos = {(p["artifact"], p["phase"], p["batch"]) for p in r["parity"]}
    assert {("onnx:fp32", ph, b) for ph in ("prefill", "decode") for b in (1, 2)} <= combos
    assert {("onnx:fp32:optimized", ph, b) for ph in ("prefill", "decode") for b in (1, 2)} <= combos
    for p in r["parity"]:
        assert p["passed"] and p["greedy_match"] and p["max_abs_diff"] <= p["atol"]
    assert [s["name"] for s in r["stages"]] == ["load", "remove", "reference", "export", "validate", "optimize", "speed",
                                                 "package"]
    # the cost model's prediction and a short measured ratio, full vs skipped, for both ONNX graphs
    speed = r["speed"]
    assert speed["prediction"]["attention_layers_kept"] == 4 and speed["prediction"]["decode"]
    for variant in ("plain", "optimized"):
        m = speed["measured"][variant]
        assert m["full"]["n"] >= 5 and m["skipped"]["n"] == m["full"]["n"]
        assert m["measured_speedup"] > 0 and m["predicted_speedup"] > 1
    assert all(s["seconds"] >= 0 and s["peak_rss_mb"] > 0 for s in r["stages"])
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(r["versions"])
    assert r["kv_cache"]["bytes_per_token_skipped"] * 6 == r["kv_cache"]["bytes_per_token_full"] * 4
    md = (out / "report.md").read_text()
    assert "PASSED" in md and "onnx:fp32" in md
    # the variants were timed here and the fastest is served: onnxruntime-genai is pointed at it (plain, or the
    # optimized graph, parity-checked like the plain one, in the chosen variant)
    tuning = r["tuning"]
    kernels = tuning["one_row_kernels"]  # per weight shape, the one-row layouts timed here (bench/kernels.py)
    assert kernels["machine"]["cpu"] == tuning["machine"]["cpu"] and set(kernels["layouts"]) == set(kernels["median_us_per_matmul"])
    for shape, how in kernels["layouts"].items():
        us = kernels["median_us_per_matmul"][shape]
        assert how in us and all(v > 0 for v in us.values())
        assert how == "packed" or us[how] < (1 - kernels["margin"]) * us["packed"]
    one_row = any(how != "packed" for how in kernels["layouts"].values())  # then its variant was built and timed
    assert set(tuning["scores"]) == {"plain", "packed", "batch1-branch"} | ({"one-row-dispatch"} if one_row else set())
    assert tuning["default"] == "packed"
    assert tuning["scores"]["packed"] == 1.0 and tuning["chosen"] in tuning["scores"]
    assert set(tuning["median_ms"]) == {"decode batch 1", "decode batch 4", "prefill 32"}
    assert all(ms > 0 for shape in tuning["median_ms"].values() for ms in shape.values())
    machine = tuning["machine"]
    assert machine["cpu"] and machine["onnxruntime"] == r["versions"]["onnxruntime"] and machine["threads"] == 1
    assert isinstance(machine["isa"], list) and machine["cpus"] >= 1
    served = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    assert served == r["served_graph"] == ("model.onnx" if tuning["chosen"] == "plain" else "model.opt.onnx")
    assert r["optimized_graph"]["variant"] == ("packed" if tuning["chosen"] == "plain" else tuning["chosen"])
    assert f"Chosen: **{tuning['chosen']}**" in md and machine["cpu"] in md
    assert not list(out.glob("tune-*"))  # the candidate is not left behind


def test_failed_parity_exits_1_and_keeps_the_previous_artifact(tiny_artifact_copy, tmp_path):
    out = tiny_artifact_copy
    before = (out / "report.json").read_bytes()
    strict = tmp_path / "tiny-llama.yaml"
    text = TINY_RECIPE.read_text()
    strict.write_text(text.replace("atol: {prefill: 1.0e-4, decode: 1.0e-4}", "atol: {prefill: 1.0e-15, decode: 1.0e-15}"))
    result = cli(strict, "--out", out)
    assert result.returncode == 1
    assert "FAILED" in result.stderr and "vs atol 1e-15" in result.stderr
    assert (out / "report.json").read_bytes() == before  # previous good artifact untouched
    failed = out.with_name(out.name + ".failed")
    report = json.loads((failed / "report.json").read_text())
    assert report["passed"] is False and not all(p["passed"] for p in report["parity"])
    assert not [p for p in out.parent.iterdir() if ".partial" in p.name]


@pytest.mark.slow
@pytest.mark.real_weights(ci=True)
def test_smollm2_default_recipe_end_to_end(tmp_path):
    """The default recipe on real SmolLM2-135M weights (`make test`, as CI, runs this): fp32 parity <= 1e-3,
    greedy match.

    The same run also asks for an fp16 graph and a tensorrt-rtx fp16 engine of the skipped model (where the
    [rtx] extra is installed, as in CI), so CI builds a real SmolLM2 engine from the skipped ONNX."""
    pytest.importorskip("gguf")
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes" / "smollm2-135m.yaml").read_text())
    rtx = _has("tensorrt_rtx")
    recipe["export"]["precisions"] = ["fp32", "fp16"]
    recipe["validate"]["speed"] = False  # keeps CI short: no unskipped export (bench and the tiny tests time it)
    if rtx:
        recipe["tensorrt"] = {"backends": ["tensorrt-rtx"], "precisions": ["fp16"], "max_context": 512}
    path = tmp_path / "smollm2-135m.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / "smollm2-135m"
    result = cli(path, "--out", out, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads((out / "report.json").read_text())
    assert r["mask"]["attention"] == [9, 25, 26, 28] and len(r["kept_attention_layers"]) == 26
    fp32 = [p for p in r["parity"] if p["artifact"] in ("onnx:fp32", "pytorch:skipped")]
    assert len(fp32) == 8
    for p in fp32:
        assert p["max_abs_diff"] <= 1e-3 and p["greedy_match"], p
    fp16 = [p for p in r["parity"] if "fp16" in p["artifact"]]
    assert fp16 and all(p["passed"] for p in fp16), fp16
    assert "Paris" in r["samples"][0]["skipped"]
    assert r["speed"]["measured"] is None and r["speed"]["prediction"]["kv_bytes_per_token_skipped"] == 26 * 2 * 3 * 64 * 4
    if rtx:
        (engine,) = r["engines"]["built"]
        assert engine["precision"] == "fp16" and engine["build_seconds"] < 600, engine
        assert (out / engine["path"]).stat().st_size == engine["engine_bytes"]


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_a_graph_over_2_gib_is_not_tuned_and_the_report_says_so(tiny_artifact_copy):
    """Each tuning candidate's session holds the weights again, all at once: above SECOND_LAYOUT_MAX_BYTES of
    weights the default variant is built and checked, and the tuning is listed under checks not run."""
    from exporter.onnx.session import SECOND_LAYOUT_MAX_BYTES
    from exporter.model.source import load_config
    from exporter.recipe import load_recipe
    from exporter.pipeline.optimize import optimize_stage
    from exporter.pipeline.settings import OptimizeSettings

    recipe = load_recipe(TINY_RECIPE)
    recipe = recipe.model_copy(update={"export": recipe.export.model_copy(update={"tune": True})})
    out = optimize_stage(OptimizeSettings.of(recipe), load_config(recipe.model), tiny_artifact_copy / "model.onnx",
                         "fp32", SECOND_LAYOUT_MAX_BYTES + 1)
    assert out.tuning is None and out.serve == "model.opt.onnx"
    assert [n["check"] for n in out.not_run] == ["variant tuning (timing/tune.py)"]
    assert "2 GiB" in out.not_run[0]["reason"]
    # over 2 GiB the default variant has no batch-1 branch (batch1_decode_path: auto), and it passed parity
    assert out.fused["variant"] == "packed" and out.parity and all(p["passed"] for p in out.parity)
    assert not list(tiny_artifact_copy.glob("tune-*"))


@pytest.mark.parametrize("setting, variant", [("auto", "packed"), (True, "batch1-branch")])
def test_untuned_builds_the_branch_only_when_the_recipe_asks(tiny_artifact_copy, setting, variant):
    """Without tuning, `batch1_decode_path` "auto" (as false) builds packed weights (the branch's batch > 1 side ran 1.86x
    packed on an AVX-512 EPYC); `true` builds the branch. Either passes the same parity checks."""
    from exporter.model.source import load_config
    from exporter.recipe import load_recipe
    from exporter.pipeline.optimize import optimize_stage
    from exporter.pipeline.settings import OptimizeSettings

    recipe = load_recipe(TINY_RECIPE)
    recipe = recipe.model_copy(update={"export": recipe.export.model_copy(update={"batch1_decode_path": setting,
                                                                                  "tune": False})})
    out = optimize_stage(OptimizeSettings.of(recipe), load_config(recipe.model), tiny_artifact_copy / "model.onnx",
                         "fp32", 1 << 20)
    assert out.tuning is None and out.fused["variant"] == variant
    assert (out.fused["batch1_unpacked_matmuls"] > 0) == (variant == "batch1-branch")
    assert out.parity and all(p["passed"] for p in out.parity)
