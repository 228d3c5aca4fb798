"""The recorded reference: a replay checks exactly as the live masked model does, the pipeline releases the
PyTorch model before ONNX Runtime opens, and `verify --parity` re-checks a folder from its recording alone."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from conftest import PROMPTS, make_mask
from helpers import TINY_RECIPE, cli
from exporter.backends.pytorch import HFRunner, TorchRunner
from exporter.checks.manifest import record_files
from exporter.checks.parity import check_parity
from exporter.model.prompts import left_padded
from exporter.checks.reference import REFERENCE_FILE, ReplayRunner, load_reference, record_batch, save_reference
from exporter.model.surgery import apply_skip, masked


def test_replay_checks_exactly_as_the_live_reference(tiny_models, tmp_path):
    model, tok = tiny_models["qwen2"]
    mask = make_mask("both")
    ids, attn = left_padded(tok, PROMPTS)
    with masked(model, mask):
        recorded = record_batch(HFRunner(model), ids, attn, 6)
        live, _ = check_parity(HFRunner(model), TorchRunner(apply_skip(model, mask)), ids, attn, 6, 1e-4, 1e-4, "x")
    [batch] = load_reference(save_reference([recorded], tmp_path / REFERENCE_FILE))
    replayed, _ = check_parity(ReplayRunner(batch), TorchRunner(apply_skip(model, mask)), ids, attn, 6, 1e-4, 1e-4, "x")
    assert [p.as_dict() for p in replayed] == [p.as_dict() for p in live]
    assert batch.steps.shape == (6, 2, 1, model.config.vocab_size) and batch.tokens.shape == (2, 7)


def test_replay_refuses_other_inputs_or_tokens(tiny_models):
    model, tok = tiny_models["llama"]
    ids, attn = left_padded(tok, PROMPTS[:1])
    batch = record_batch(HFRunner(model), ids, attn, 2)
    with pytest.raises(ValueError, match="other inputs"):
        ReplayRunner(batch).prefill(ids + 1, attn)
    replay = ReplayRunner(batch)
    replay.prefill(ids, attn)
    with pytest.raises(ValueError, match="its own greedy tokens"):
        replay.step(torch.tensor([[int(batch.tokens[0, 0]) + 1]]))


def test_the_pytorch_model_is_released_before_onnx_runtime(tmp_path, monkeypatch):
    """Everything that runs the model happens in pipeline._pytorch_stages; when it returns, the model is gone
    (no stage, closure or exporter cache keeps it: torch.onnx's rewriter used to)."""
    from contextlib import ExitStack

    from exporter.measure import StageLog
    from exporter.pipeline import run as pipeline
    from exporter.pipeline.cache import StageCache
    from exporter.model.source import load_config
    from exporter.pipeline.results import Findings
    from exporter.pipeline.settings import RunSettings
    from exporter.recipe import load_recipe

    alive = []
    real_load = pipeline.load_stage

    def spy(settings, config):
        loaded = real_load(settings, config)
        alive.append(weakref.ref(loaded[2]))
        return loaded

    monkeypatch.setattr(pipeline, "load_stage", spy)
    cache, found = StageCache(tmp_path / "cache", enabled=False), Findings()

    def cached(stage, key, rec, compute, result_type):
        result, rec.cached = cache.restore_or_run(stage, key, tmp_path, compute, result_type)
        return found.add(result)

    settings = RunSettings.of(load_recipe(TINY_RECIPE))
    loaded = pipeline._pytorch_stages(settings, load_config(settings.load.source), ExitStack(), tmp_path, StageLog(None),
                                      found, cached, False)
    gc.collect()
    assert alive and alive[0]() is None
    assert (tmp_path / REFERENCE_FILE).is_file() and loaded.exported.artifacts


def test_verify_parity_rechecks_a_folder_from_its_recording(tiny_artifact_copy):
    ok = cli("verify", tiny_artifact_copy, "--parity")
    assert ok.returncode == 0, ok.stderr
    assert "parity onnx:fp32 decode batch 2" in ok.stderr and "parity onnx:fp32:optimized prefill batch 1" in ok.stderr
    # a recording that disagrees with the graphs beyond atol (recorded as a known change) fails the check
    path = tiny_artifact_copy / REFERENCE_FILE
    batches = load_reference(path)
    batches[0].prefill[0, -1, 0] += 1.0
    save_reference(batches, path)
    record_files(tiny_artifact_copy, [REFERENCE_FILE])
    bad = cli("verify", tiny_artifact_copy, "--parity")
    assert bad.returncode == 1 and "FAILED" in bad.stderr
    assert np.isclose(load_reference(path)[0].prefill[0, -1, 0] - batches[0].prefill[0, -1, 0], 0.0)


def test_parity_sessions_prepack_small_graphs_only(tmp_path, monkeypatch):
    from helpers import one_node_onnx
    from exporter.onnx import session as ort_backend

    graph = one_node_onnx(tmp_path / "g.onnx")
    (tmp_path / "g.onnx.data").write_bytes(b"\0" * 4096)
    monkeypatch.delenv("EXPORT_SKIP_CHECK_PREPACK", raising=False)
    assert ort_backend.graph_bytes(graph) == graph.stat().st_size + 4096
    assert ort_backend.check_prepacks(graph)  # as deployed
    monkeypatch.setattr(ort_backend, "SECOND_LAYOUT_MAX_BYTES", 4096)  # graph + data now over the limit
    assert not ort_backend.check_prepacks(graph)
    monkeypatch.setenv("EXPORT_SKIP_CHECK_PREPACK", "1")
    assert ort_backend.check_prepacks(graph)
    monkeypatch.setenv("EXPORT_SKIP_CHECK_PREPACK", "0")
    monkeypatch.setattr(ort_backend, "SECOND_LAYOUT_MAX_BYTES", 1 << 40)
    assert not ort_backend.check_prepacks(graph)


def test_a_graph_too_big_to_check_here_is_not_run_and_verify_checks_it_later(tmp_path, monkeypatch):
    """Where no parity session fits (a 7B fp16 graph on 24 GB), the run passes on what ran, lists the check under
    not_run with the reason (never as passed), and `verify --parity` checks the graph where it fits."""
    import types

    import psutil

    from helpers import one_node_onnx
    from exporter.pipeline import run as pipeline
    from exporter.recipe import load_recipe
    from exporter.pipeline import validate

    graph = one_node_onnx(tmp_path / "g.onnx")
    assert validate.session_too_big(graph, "fp32") is None
    with monkeypatch.context() as m:
        m.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=1 << 20))
        reason = validate.session_too_big(graph, "fp16")
    assert reason and "verify DIR --parity" in reason and "\n" not in reason
    monkeypatch.setattr(validate, "session_too_big", lambda path, precision: f"no room for {precision} (test)")
    report = pipeline.run(load_recipe(TINY_RECIPE), tmp_path / "art", force=True)
    assert report["passed"]
    assert "no room for fp32 (test)" in [n["reason"] for n in report["not_run"]]
    assert not any(p["artifact"] == "onnx:fp32" for p in report["parity"])
    again = cli("verify", tmp_path / "art", "--parity")
    assert again.returncode == 0 and "parity onnx:fp32 decode batch 2" in again.stderr, again.stderr
