"""manifest.json, `verify`, `inspect` and `generate` on the tiny artifact built once by the real pipeline
(conftest's `tiny_artifact`; the tests that damage it take a private copy)."""

import io
import json

import pytest
import torch

from exporter.checks.manifest import MANIFEST, RECIPE_COPY, read_manifest
from exporter.checks.verify import verify
from exporter.files import json_digest
from helpers import TINY_RECIPE as TINY
from helpers import cli


def test_manifest_lists_every_file_with_size_and_hash(tiny_artifact):
    from exporter.files import sha256_file
    from exporter.recipe import load_recipe
    from exporter.checks.manifest import resolved_recipe

    m = read_manifest(tiny_artifact)
    on_disk = sorted(p.relative_to(tiny_artifact).as_posix() for p in tiny_artifact.rglob("*") if p.is_file())
    assert [f["path"] for f in m["files"]] == [p for p in on_disk if p != MANIFEST]
    assert {"model.onnx", "model.onnx.data", "report.json", "report.md", RECIPE_COPY} <= set(on_disk)
    for f in m["files"]:
        assert f["bytes"] == (tiny_artifact / f["path"]).stat().st_size
        assert f["sha256"] == sha256_file(tiny_artifact / f["path"])
    kinds = {f["path"]: f["kind"] for f in m["files"]}
    assert kinds["model.onnx"] == "onnx" and kinds["model.onnx.data"] == "onnx-external-data"
    assert m["recipe"]["sha256"] == json_digest(resolved_recipe(load_recipe(TINY)))
    assert m["mask"] == {"attention": [3, 4], "mlp": [4], "blocks": [4]}
    assert m["model"]["kind"] == "config" and len(m["model"]["config_sha256"]) == 64
    sig = m["onnx"]["model.onnx"]["signature"]
    assert [n for n in sig["inputs"] if n.startswith("past_key_values.") and n.endswith(".key")] == \
        [f"past_key_values.{i}.key" for i in (0, 1, 2, 5)]
    assert {"torch", "onnx", "onnxruntime", "python"} <= set(m["versions"])
    assert m["created"].endswith("+00:00")


def test_verify_passes_on_an_intact_folder(tiny_artifact):
    assert verify(tiny_artifact, recipe_path=TINY, with_ort=True) == []
    result = cli("verify", tiny_artifact)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stderr


def test_verify_catches_a_flipped_byte_in_the_external_data(tiny_artifact_copy):
    data = tiny_artifact_copy / "model.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    data.write_bytes(bytes(blob))
    problems = verify(tiny_artifact_copy)
    assert [p.path for p in problems] == ["model.onnx.data"]
    assert "content changed" in problems[0].message
    result = cli("verify", tiny_artifact_copy)
    assert result.returncode == 1
    assert "model.onnx.data" in result.stderr and "FAILED" in result.stderr


def test_verify_catches_a_changed_recipe(tiny_artifact_copy):
    path = tiny_artifact_copy / RECIPE_COPY
    path.write_text(path.read_text().replace("  - 3\n  - 4\n", "  - 3\n", 1))
    problems = verify(tiny_artifact_copy)
    assert {p.path for p in problems} == {RECIPE_COPY}
    assert any("skip.attention" in p.message for p in problems)
    assert cli("verify", tiny_artifact_copy).returncode == 1


def test_verify_catches_an_edited_manifest_recipe(tiny_artifact_copy):
    manifest = json.loads((tiny_artifact_copy / MANIFEST).read_text())
    manifest["recipe"]["resolved"]["skip"]["attention"] = [3]
    (tiny_artifact_copy / MANIFEST).write_text(json.dumps(manifest))
    assert [p.path for p in verify(tiny_artifact_copy)] == [MANIFEST]


def test_verify_recipe_option_names_the_differing_keys(tiny_artifact, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(TINY.read_text().replace("decode_steps: 16", "decode_steps: 8"))
    problems = verify(tiny_artifact, recipe_path=other)
    assert len(problems) == 1 and "validate.decode_steps" in problems[0].message
    result = cli("verify", tiny_artifact, "--recipe", other)
    assert result.returncode == 1 and "validate.decode_steps" in result.stderr


def test_verify_catches_added_missing_and_truncated_files(tiny_artifact_copy):
    (tiny_artifact_copy / "extra.bin").write_bytes(b"x")
    (tiny_artifact_copy / "report.md").unlink()
    data = tiny_artifact_copy / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    messages = {p.path: p.message for p in verify(tiny_artifact_copy)}
    assert "not in the manifest" in messages["extra.bin"]
    assert messages["report.md"] == "missing"
    assert "size changed" in messages["model.onnx.data"]
    assert "reads past the end of model.onnx.data" in messages["model.onnx"]


def test_verify_without_a_manifest_is_a_one_line_user_error(tmp_path):
    result = cli("verify", tmp_path)
    assert result.returncode == 2
    assert "no manifest.json" in result.stderr and "Traceback" not in result.stderr


def test_inspect_draws_the_mask_as_a_layer_map(tiny_artifact):
    from rich.console import Console

    from exporter.commands.inspect import layer_map, render

    rows = layer_map(6, [3, 4], [4])
    plain = [Console().render_str(r).plain for r in rows]
    assert plain[2] == "attention  ■■■··■" and plain[3] == "MLP        ■■■■·■"
    buffer = io.StringIO()
    render(tiny_artifact, Console(file=buffer, width=200, color_system=None))
    text = buffer.getvalue()
    for expected in ("PASSED", "attention  ■■■··■", "model.onnx.data", "KV cache bytes / token", "onnx:fp32"):
        assert expected in text
    assert cli("inspect", tiny_artifact).returncode == 0


@pytest.mark.parametrize("graph", [None, "model.onnx"])  # default: the optimized graph the run wrote
def test_generate_streams_the_masked_models_greedy_tokens(tiny_artifact, graph):
    from exporter.commands.generate import _onnx_file, generate
    from exporter.checks.parity import greedy_tokens
    from exporter.backends.pytorch import HFRunner
    from exporter.mask import SkipMask
    from exporter.model.surgery import masked
    from exporter.model.source import load_model
    from exporter.recipe import load_recipe

    model, tok = load_model(load_recipe(TINY).model)
    out = io.StringIO()
    tokens = generate(tiny_artifact, "Hello there", max_new_tokens=12, onnx_file=graph, out=out)
    assert _onnx_file(tiny_artifact, read_manifest(tiny_artifact), graph).name == (graph or "model.opt.onnx")
    ids = torch.tensor([tok.encode("Hello there")])
    with masked(model, SkipMask(attention=(3, 4), mlp=(4,))):
        reference = greedy_tokens(HFRunner(model), ids, torch.ones_like(ids), 11)[0]
    assert tokens == reference
    assert out.getvalue().split() == [str(t) for t in reference]  # the byte tokenizer prints token ids


def test_record_files_accepts_a_known_change_and_refuses_an_unknown_one(tiny_artifact_copy):
    from exporter.errors import CheckFailed
    from exporter.checks.manifest import record_files

    (tiny_artifact_copy / "eval.json").write_text('{"ppl": 1.0}')
    record_files(tiny_artifact_copy, ["eval.json"])
    assert verify(tiny_artifact_copy) == []
    assert "eval.json" in {f["path"] for f in read_manifest(tiny_artifact_copy)["files"]}
    (tiny_artifact_copy / "report.md").write_text("changed")
    (tiny_artifact_copy / "bench.json").write_text("{}")
    with pytest.raises(CheckFailed, match="report.md"):
        record_files(tiny_artifact_copy, ["bench.json"])
