"""bench: interleaved timing, the comparison arithmetic, measured KV bytes and peak memory, `export-skip bench`.

Speed itself is never asserted (the machine is shared); what is checked is that every number is measured,
paired and reported, and that the measured KV cache shrinks exactly by the removed attention layers.
"""

import json

import pytest

from exporter.commands import bench as command
from exporter.pipeline.run import unskipped_graph
from exporter.backends import ort
from exporter.timing import interleaved as timing
from exporter.timing import worker
from exporter.cost import kv_bytes_per_token
from helpers import TINY_RECIPE, cli, one_node_onnx


@pytest.fixture(scope="module")
def tiny():
    """The tiny-llama recipe (conftest's `tiny_artifact` is its pipeline run), its model and its mask."""
    from exporter.mask import resolve_mask
    from exporter.model.source import load_model
    from exporter.recipe import load_recipe

    recipe = load_recipe(TINY_RECIPE)
    model, _ = load_model(recipe.model)
    return recipe, model, resolve_mask(recipe, model.config.num_hidden_layers)


def test_time_interleaved_alternates_and_pairs():
    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = timing.time_interleaved(calls, warmup=1, rounds=4)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then A B, B A, ...
    assert len(times["a"]) == len(times["b"]) == 4 and all(t >= 0 for t in times["a"])


def test_multi_threaded_calls_are_followed_by_an_untimed_pause(monkeypatch):
    """With several intra-op threads per worker, each call is followed by a pause (the idle worker's threads stop
    spinning before the next call); the pause is not in the times; one thread needs none."""
    slept = []
    monkeypatch.setattr(timing.time, "sleep", slept.append)
    calls = {"a": lambda: 0.001, "b": lambda: 0.002}  # self-timed, as GraphWorker.run
    times = timing.time_interleaved(calls, warmup=1, rounds=3, settle_s=timing.settle_for(2))
    assert times == {"a": [0.001] * 3, "b": [0.002] * 3}
    assert slept == [timing.SETTLE_S] * 6 and timing.SETTLE_S > 0
    assert timing.settle_for(1) == 0 and timing.settle_for(None) == timing.SETTLE_S  # None: all cores


def test_compare_arithmetic():
    times = {"full": [2.0, 2.0, 2.0], "skipped": [1.5, 1.5, 1.5]}
    c = timing.compare(times, "full", "skipped", predicted_speedup=1.25)
    assert c["measured_speedup"] == pytest.approx(4 / 3, abs=1e-4)
    assert c["measured_saving"] == pytest.approx(0.25)
    assert c["predicted_saving"] == pytest.approx(0.2)
    assert c["removal_efficiency"] == pytest.approx(1.25)  # 25% saved where 20% was predicted
    assert c["full"]["median_ms"] == 2000.0 and c["skipped"]["n"] == 3


def test_measured_kv_bytes_match_the_cost_model(tiny, tiny_artifact):
    _, model, mask = tiny
    for name in ("model.onnx", "model.opt.onnx"):
        session = ort.open_session(tiny_artifact / name)
        assert worker.measured_kv_bytes_per_token(session) == kv_bytes_per_token(model.config, mask)


def test_peak_memory_runs_in_a_fresh_process(tiny_artifact):
    peak = worker.peak_memory(tiny_artifact / "model.opt.onnx", context=256)
    assert "error" not in peak, peak
    assert peak["context"] == 256 and peak["peak_rss_mb"] >= peak["after_load_rss_mb"] > 0


def test_bench_quick_writes_json_and_table(tiny, tiny_artifact_copy, monkeypatch, tmp_path):
    monkeypatch.setenv("EXPORT_SKIP_CACHE", str(tmp_path / "cache"))  # the full graph is exported into it
    recipe, _, _ = tiny
    out = tiny_artifact_copy  # bench.json and bench.md are added to it
    assert command.run_bench(recipe, out, console=None, quick=True) == 0
    r = json.loads((out / "bench.json").read_text())
    assert set(r["graphs"]) == {"full:plain", "skipped:plain", "full:optimized", "skipped:optimized"}
    (case,) = r["decode"]
    assert (case["batch"], case["size"]) == (1, 510)  # context 512 capped below max_position_embeddings (512)
    for variant in ("plain", "optimized"):
        c = case[variant]
        assert c["full"]["n"] == c["skipped"]["n"] >= 10
        assert c["measured_speedup"] > 0 and c["predicted_speedup"] > 1 and "removal_efficiency" in c
    m = r["memory"]
    assert m["kv_reduction_measured"] == pytest.approx(2 / 6, abs=1e-4)  # 2 of 6 attention layers removed
    assert m["kv_reduction_matches_removed_fraction"] is True
    assert "measured speedup" in (out / "bench.md").read_text()
    # the full graphs are the pipeline's own run with an empty mask, checked like any run and cached like any run
    (folder,) = [p for p in (tmp_path / "cache" / "unskipped").iterdir() if not p.name.startswith(".")]
    assert (folder / "model.opt.onnx").is_file() and r["graphs"]["full:plain"] == str(folder / "model.onnx")
    report = json.loads((folder / "report.json").read_text())
    assert report["passed"] and report["mask"]["attention"] == [] and report["parity"]
    assert unskipped_graph(recipe, command._artifact_build(out)) == folder / "model.onnx"
    stages = {s["name"]: s["cached"] for s in json.loads((folder / "report.json").read_text())["stages"]}
    assert stages["export"] and stages["reference"] and stages["optimize"]  # a second call exports nothing again


def test_bench_without_an_artifact_is_a_user_error(tmp_path):
    result = cli("bench", TINY_RECIPE, "--out", tmp_path / "none", timeout=120)
    assert result.returncode == 2 and "run `export-skip" in result.stderr and "Traceback" not in result.stderr


def test_bench_with_a_peer_measures_it_alike(tiny, tiny_artifact_copy, monkeypatch, tmp_path):
    """A peer graph (here: the full model's plain graph under another name) is timed in the same interleaved
    rounds, gets its KV bytes measured and an ours/peer ratio; rounds come from EXPORT_SKIP_BENCH_ROUNDS."""
    monkeypatch.setenv("EXPORT_SKIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EXPORT_SKIP_BENCH_ROUNDS", "12")
    recipe, model, _ = tiny
    out = tiny_artifact_copy
    peer = unskipped_graph(recipe)
    assert command.run_bench(recipe, out, console=None, quick=True, threads=1, extra={"twin": peer}) == 0
    r = json.loads((out / "bench.json").read_text())
    (case,) = r["decode"]
    assert case["median_ms"]["peer:twin"]["n"] == case["median_ms"]["full:plain"]["n"] == 12
    assert case["full_plain_vs_peer:twin"] > 0 and case["full_optimized_vs_peer:twin"] > 0
    kv = r["memory"]["kv_bytes_per_token_measured"]
    assert kv["peer:twin"] == kv["full:plain"] == kv_bytes_per_token(model.config, None)
    assert r["threads"] == 1 and "12 rounds" in r["method"] and "2 sets of fresh workers" in r["method"]
    assert r["warnings"] == []
    assert r["graph_ops"]["full:optimized"]["com.microsoft.GroupQueryAttention"] == model.config.num_hidden_layers
    md = (out / "bench.md").read_text()
    assert "peer:twin" in md and "Load average" in md
    # every figure comes with the machine it was measured on (kernel choice depends on the ISA)
    assert r["machine"]["threads"] == 1 and r["machine"]["onnxruntime"] == r["onnxruntime"] and r["machine"]["cpu"]
    assert f"Machine: {r['machine']['cpu']}" in md


def test_machine_info_reads_cpu_model_and_isa_flags(monkeypatch):
    from exporter import machine

    monkeypatch.setattr(machine, "_cpuinfo", lambda: "model name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx2 fma avx512f "
                                                      "avx512_vnni avx512_bf16 ht\n")
    info = machine.machine_info(threads=2)
    assert info["cpu"] == "AMD EPYC 9R14" and info["isa"] == ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]
    assert info["threads"] == 2 and info["onnxruntime"]
    line = machine.describe_machine(info)
    assert line.startswith("AMD EPYC 9R14 (avx2 fma avx512f avx512_vnni avx512_bf16)") and "2 threads" in line
    assert machine.machine_key() == {k: machine.machine_info()[k] for k in ("cpu", "isa", "onnxruntime")}


def test_rounds_from_the_environment_are_checked(monkeypatch):
    from exporter.errors import UserError

    monkeypatch.setenv("EXPORT_SKIP_BENCH_ROUNDS", "0")
    with pytest.raises(UserError, match="EXPORT_SKIP_BENCH_ROUNDS"):
        command.decode_rounds()
    monkeypatch.delenv("EXPORT_SKIP_BENCH_ROUNDS")
    assert command.decode_rounds() == command.DECODE_ROUNDS


def test_the_full_graph_is_built_in_the_artifacts_variant(tiny, monkeypatch, tmp_path):
    """The full model's optimized graph is rebuilt in the variant the skipped artifact serves (report.json's
    optimized_graph and tuning, via pipeline.optimize.build_options), so a ratio compares masks, not rewrites."""
    import onnx

    from exporter.onnx.contract import OPT_FILE
    from exporter.onnx.decode import decode_body
    from exporter.onnx.gemv import ONE_ROW, matmul_weight_shapes
    from exporter.pipeline.optimize import build_options

    monkeypatch.setenv("EXPORT_SKIP_CACHE", str(tmp_path / "cache"))
    recipe, model, _ = tiny
    assert build_options(None, None) is None
    assert build_options({"variant": "packed"}, None) == {"batch1_path": False, "one_row_layouts": None}
    assert build_options({"variant": "batch1-branch"}, None) == {"batch1_path": True, "one_row_layouts": None}
    packed = {"batch1_path": False, "one_row_layouts": None}
    plain = unskipped_graph(recipe, packed)
    opt = plain.with_name(OPT_FILE)
    shapes = sorted(matmul_weight_shapes(opt))
    tuning = {"one_row_kernels": {"layouts": {f"{k}x{n}": "unpacked" for k, n in shapes}}}
    build = build_options({"variant": "one-row-dispatch"}, tuning)
    assert build == {"batch1_path": False, "one_row_layouts": {f"{k}x{n}": "unpacked" for k, n in shapes}}

    def one_row_dispatches():
        proto = onnx.load(str(opt), load_external_data=False)
        return sum(n.name.startswith(ONE_ROW) for n in decode_body(proto.graph).node if n.op_type == "If")

    assert one_row_dispatches() == 0
    assert unskipped_graph(recipe, build) == plain
    assert one_row_dispatches() > 0  # rebuilt in the artifact's variant
    assert json.loads(plain.with_name("report.json").read_text())["optimized_graph"]["variant"] == "one-row-dispatch"
    unskipped_graph(recipe, packed)
    assert one_row_dispatches() == 0


def test_graphs_built_differently_are_flagged():
    same = {"full:optimized": {"MatMul": 9, "GQA": 3}, "skipped:optimized": {"MatMul": 7, "GQA": 2}}
    assert command._variant_warnings(same) == []
    stale = {"full:optimized": {"MatMul": 9, "GQA": 3}, "skipped:optimized": {"MatMul": 7, "Split": 2, "GQA": 2}}
    (warning,) = command._variant_warnings(stale)
    assert "skipped only: ['Split']" in warning


def test_a_worker_reports_a_graph_it_cannot_feed(tmp_path):
    """Each graph runs in its own worker process; a graph outside the contract is a one-line user error there."""
    from exporter.errors import UserError

    path = one_node_onnx(tmp_path / "odd.onnx", inputs=["foo"], outputs=["bar"])
    graph_worker = worker.GraphWorker(path, threads=1)
    try:
        with pytest.raises(UserError, match="cannot feed graph input 'foo'"):
            graph_worker.prepare(1, 1, 0)
    finally:
        graph_worker.close()
    assert graph_worker.proc.poll() is not None  # the process is gone


def test_workers_time_themselves(tiny_artifact):
    workers = worker.open_workers({"a": tiny_artifact / "model.onnx", "b": tiny_artifact / "model.opt.onnx"}, threads=1)
    try:
        for w in workers.values():
            w.prepare(1, 1, 8)
        times = timing.time_interleaved({n: w.run for n, w in workers.items()}, warmup=1, rounds=3)
    finally:
        worker.close_workers(workers)
    assert all(len(t) == 3 and all(isinstance(x, float) and x > 0 for x in t) for t in times.values())


def test_feeds_start_on_64_byte_boundaries_like_ort_outputs(tiny_artifact):
    """The past cache is fed as a decode loop would feed ORT's own (64-byte aligned) outputs back."""
    import numpy as np

    session = ort.open_session(tiny_artifact / "model.onnx")
    feeds = worker.make_feeds(session, 2, 1, 37)
    assert {n for n in feeds if n.startswith("past_key_values.")}
    for name, value in feeds.items():
        assert value.ctypes.data % worker.ALIGNMENT == 0, name
        assert value.flags["C_CONTIGUOUS"]
    assert np.all(feeds["position_ids"] == 37) and feeds["attention_mask"].shape == (2, 38)
    outputs = session.run(None, feeds)  # the graph takes them as they are
    assert outputs[0].shape[:2] == (2, 1)


def test_the_speed_stage_times_nothing_when_the_unskipped_run_fails_its_checks(tiny, tmp_path):
    """The unskipped graphs come from a checked pipeline run; when that run fails a check, the skipped run reports
    the cost model and why nothing was timed (the full graph is never called twice, nothing is timed)."""
    from exporter.errors import CheckFailed
    from exporter.pipeline.settings import SpeedSettings
    from exporter.pipeline.speed import speed_stage

    recipe, model, mask = tiny
    calls = []

    def failing():
        calls.append(1)
        raise CheckFailed("the unskipped model's run failed its checks: see X/report.md")

    speed = speed_stage(SpeedSettings(measure=True, dtype="float32"), model.config, mask, tmp_path / "model.onnx",
                        weight_bytes=1 << 20, full_graph=failing)
    assert calls == [1] and speed.measured is None and speed.prediction
    assert speed.not_measured.startswith("the unskipped model's run failed its checks")
    assert set(speed.to_report()) == {"prediction", "measured", "not_measured"}
