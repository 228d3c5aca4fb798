"""int4 graphs: what the quantizer rewrites (every constant-weight MatMul, the tied LM head too), that the affine
method reproduces Q4_1-style block grids exactly, their fit to the fp32 reference and that a wrong graph fails it,
the recipe's int4 keys, and the pipeline's int4 artifact."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import PROMPTS, build_model, make_mask
from exporter.backends.ort import OrtRunner
from exporter.errors import UserError
from exporter.onnx.export import export_onnx
from exporter.onnx.int4 import affine_blocks, quantize_affine, quantize_int4
from exporter.checks.parity import fit_recorded
from exporter.model.prompts import left_padded
from exporter.recipe import load_recipe
from exporter.checks.reference import load_reference
from exporter.pipeline.reference import record_reference
from exporter.model.surgery import apply_skip
from helpers import TINY_RECIPE, cli


def _ops(path):
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


@pytest.fixture(scope="module")
def qwen3_plain(tiny_models, tmp_path_factory):
    """qwen3 (tied embeddings: the LM head is MatMul(h, Transpose(embedding))), attention skipped in 1-2."""
    model, _ = tiny_models["qwen3"]
    return export_onnx(apply_skip(model, make_mask("attention")), tmp_path_factory.mktemp("qwen3"))


def test_every_matmul_and_the_tied_lm_head_become_matmulnbits(qwen3_plain, tmp_path):
    plain_matmuls = _ops(qwen3_plain).count("MatMul")
    info = quantize_int4(qwen3_plain, tmp_path / "int4" / "model.onnx", block_size=32, accuracy_level=4)
    ops = _ops(tmp_path / "int4" / "model.onnx")
    assert info["lm_head"] == "int4" and info["accuracy_level"] == 4 and info["method"] == "affine"
    # 2 layers x (q, k, v, o) attention + 4 layers x (gate, up, down) + the LM head; the attention's own
    # MatMuls (scores, probabilities x values) read activations and stay
    assert ops.count("MatMulNBits") == info["matmul_nbits"] == 2 * 4 + 4 * 3 + 1
    assert ops.count("MatMul") == plain_matmuls - info["matmul_nbits"]
    assert "Gather" in ops  # the embedding stays fp32
    nodes = onnx.load(str(tmp_path / "int4" / "model.onnx"), load_external_data=False).graph.node
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in next(n for n in nodes if n.op_type == "MatMulNBits").attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 32 and attrs["accuracy_level"] == 4


def _q4_1(rng, k: int, n: int) -> np.ndarray:
    """A [k, n] weight as a GGUF Q4_1 file holds it: per 32 along k, w = d*q + m, q in 0..15, d and m fp16."""
    d = (rng.random((n, k // 32)) * 0.02 + 1e-3).astype(np.float16).astype(np.float32)
    m = (-d * 15 * rng.random((n, k // 32))).astype(np.float16).astype(np.float32)  # 0 inside most blocks
    q = rng.integers(0, 16, (n, k // 32, 32)).astype(np.float32)
    return (d[..., None] * q + m[..., None]).reshape(n, k).T.copy()


def _matmul_graph(path, w: np.ndarray):
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"], name="head")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", n])], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path),
              save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


def test_affine_blocks_reproduce_a_q4_1_grid():
    w = _q4_1(np.random.default_rng(0), 64, 48).T.reshape(48, 2, 32)
    q, scale, zero, offset, on_grid = affine_blocks(w)
    assert on_grid.all() and q.max() <= 15 and zero.max() <= 15
    rebuilt = scale[..., None] * (q.astype(np.float64) - zero[..., None]) + offset[..., None]
    assert np.abs(rebuilt - w).max() < 1e-6
    assert np.abs(offset).max() > 1e-4  # the zero points do not round exactly: the offsets carry the rest


def test_q4_1_weights_in_onnx_runtime(tmp_path):
    """affine: the weights are exact and only the 4-bit offset rows round; rtn (symmetric) cannot hold Q4_1."""
    rng = np.random.default_rng(1)
    w = _q4_1(rng, 96, 64)
    src = _matmul_graph(tmp_path / "src.onnx", w)
    x = rng.standard_normal((2, 3, 96)).astype(np.float32)
    error = {}
    for method in ("affine", "rtn"):
        info = quantize_int4(src, tmp_path / method / "model.onnx", block_size=32, accuracy_level=0, method=method)
        ops = _ops(tmp_path / method / "model.onnx")
        assert info["matmul_nbits"] == 1 and ops.count("MatMul") == 0
        assert ("Concat" in ops) == (method == "affine")  # the block means of x feed the offset rows
        got = ort.InferenceSession(str(tmp_path / method / "model.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"x": x})[0]
        error[method] = float(np.abs(got - x @ w).max() / np.abs(x @ w).max())
    assert error["affine"] < 3e-3 and error["rtn"] > 10 * error["affine"], error


def test_rounded_offsets_drop_the_block_means_and_cost_accuracy(tmp_path):
    """attention_output_offsets rounded: the MatMuls reading a named tensor keep x and K (no AveragePool, no
    offset rows); their zero points' rounding is what the block means would have added back."""
    rng = np.random.default_rng(3)
    w = _q4_1(rng, 96, 64)
    x = rng.standard_normal((2, 3, 96)).astype(np.float32) + 0.5  # a mean, as attention outputs have
    error, k = {}, {}
    for rounded in (set(), {"x"}):
        proto = onnx.load(str(_matmul_graph(tmp_path / f"src{len(rounded)}.onnx", w)))
        info = quantize_affine(proto, 32, 0, set(), None, rounded)
        node = next(n for n in proto.graph.node if n.op_type == "MatMulNBits")
        k[len(rounded)] = next(a.i for a in node.attribute if a.name == "K")
        assert ({n.op_type for n in proto.graph.node} >= {"AveragePool", "Concat"}) == (not rounded)
        assert info["block_mean_inputs"] == (0 if rounded else 1) and info["rounded_offset_inputs"] == len(rounded)
        got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        error[len(rounded)] = float(np.abs(got - x @ w).max() / np.abs(x @ w).max())
    assert (k[0], k[1]) == (96 + 3, 96)
    assert error[0] < 5e-3 and error[1] > 5 * error[0], error  # measured 0.003 and 0.07


def test_lm_head_false_keeps_it_fp32(qwen3_plain, tmp_path):
    info = quantize_int4(qwen3_plain, tmp_path / "model.onnx", block_size=16, accuracy_level=0, lm_head=False)
    assert info["lm_head"] == "fp32" and info["matmul_nbits"] == 2 * 4 + 4 * 3 and info["lm_head_fit"] is None
    nodes = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.node
    # accuracy level 0 is left unset on the node (MatMulNBits' default)
    assert all("accuracy_level" not in {a.name for a in n.attribute} for n in nodes if n.op_type == "MatMulNBits")


def test_fit_is_close_for_int4_and_fails_for_a_wrong_graph(tiny_models, qwen3_plain, tmp_path):
    model, tok = tiny_models["qwen3"]
    mask = make_mask("attention")
    ids, attn = left_padded(tok, PROMPTS)
    recorded = record_reference(model, mask, [(ids[:1], attn[:1]), (ids, attn)], steps=8)
    quantize_int4(qwen3_plain, tmp_path / "int4.onnx", block_size=32, accuracy_level=4)
    fit = fit_recorded(recorded, OrtRunner(tmp_path / "int4.onnx"), 8, "onnx:int4")
    exact = fit_recorded(recorded, OrtRunner(qwen3_plain), 8, "onnx:fp32")
    assert exact["mean_kl"] < 1e-6 and exact["top1"] == 1.0 and exact["greedy"] == 1.0
    assert 0 < fit["mean_kl"] < 0.01 and fit["positions"] == exact["positions"] == int(attn[:1].sum() + attn.sum()) + 8 * 3
    other = export_onnx(apply_skip(build_model("qwen3", seed=1)[0], mask), tmp_path / "other")  # other weights
    wrong = fit_recorded(recorded, OrtRunner(other), 8, "onnx:wrong")
    # tiny random models give near-uniform distributions, so KLs are small; the ratio is what separates them
    assert wrong["mean_kl"] > 20 * fit["mean_kl"] and wrong["top1"] < fit["top1"], (wrong, fit)


def _recipe_with(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(TINY_RECIPE.read_text().replace("  opset: 18\n", "  opset: 18\n" + text))
    return path


def test_recipe_int4_keys(tmp_path):
    recipe = load_recipe(_recipe_with(tmp_path, "  precisions: [fp32, int4]\n"))
    assert recipe.int4 and recipe.precisions == ["fp32"]
    assert (recipe.export.int4.block_size, recipe.export.int4.accuracy_level) == (32, 4)
    assert recipe.export.int4.method == "affine" and recipe.export.int4.lm_head_fit == "weighted"
    assert recipe.export.int4.attention_output_offsets == "exact"
    rounded = load_recipe(_recipe_with(tmp_path, "  precisions: [int4]\n  int4: {attention_output_offsets: rounded}\n"))
    assert rounded.export.int4.attention_output_offsets == "rounded"
    with pytest.raises(UserError, match=r"export\.int4\.attention_output_offsets"):
        load_recipe(_recipe_with(tmp_path, "  precisions: [int4]\n  int4: {attention_output_offsets: maybe}\n"))
    minmax = load_recipe(_recipe_with(tmp_path, "  precisions: [int4]\n  int4: {lm_head_fit: minmax}\n"))
    assert minmax.export.int4.lm_head_fit == "minmax"
    with pytest.raises(UserError, match=r"export\.int4\.lm_head_fit"):
        load_recipe(_recipe_with(tmp_path, "  precisions: [int4]\n  int4: {lm_head_fit: awq}\n"))
    assert load_recipe(_recipe_with(tmp_path, "  precisions: [int4]\n  int4: {method: rtn}\n")).export.int4.method == "rtn"
    with pytest.raises(UserError, match=r"export\.int4\.method"):
        load_recipe(_recipe_with(tmp_path, "  precisions: [int4]\n  int4: {method: hqq}\n"))
    assert not load_recipe(TINY_RECIPE).int4
    with pytest.raises(UserError, match=r"export\.int4\.block_size"):
        load_recipe(_recipe_with(tmp_path, "  precisions: [int4]\n  int4: {block_size: 48}\n"))
    half = _recipe_with(tmp_path, "  precisions: [fp16, int4]\n").read_text().replace("dtype: float32", "dtype: float16")
    (tmp_path / "half.yaml").write_text(half)
    with pytest.raises(UserError, match="int4 is quantized from the fp32 graph"):
        load_recipe(tmp_path / "half.yaml")


def test_pipeline_writes_checks_and_serves_the_int4_graph(tmp_path):
    # a tiny random model's next-token distributions are near uniform: its argmax flips on rounding that moves
    # no probability (KL 0.000), so top-1 and greedy are held to the old loose values here
    loose = "  int4: {min_top1: 0.5, min_greedy: 0.2}\n"
    rounded = "  int4: {attention_output_offsets: rounded}\n"  # exact (the default): test_q4_1_weights_in_onnx_runtime
    recipe = _recipe_with(tmp_path, "  precisions: [fp32, int4]\n" + rounded).read_text() + "  speed: false\n" + loose
    (tmp_path / "int4.yaml").write_text(recipe)
    out = tmp_path / "art" / "tiny-int4"
    result = cli(tmp_path / "int4.yaml", "--out", out, env={"EXPORT_SKIP_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert {(a["path"], a["precision"]) for a in report["artifacts"] if a["precision"] == "int4"} == {
        ("int4/model.onnx", "int4"), ("int4/model.onnx.data", "int4")}
    checks = [c for c in report["checks"] if c["name"].startswith("int4:")]
    assert len(checks) == 3 and all(c["passed"] for c in checks)
    assert report["int4"]["matmul_nbits"] > 0 and report["int4"]["fit"]["greedy_tokens"] == 3 * 17
    assert report["int4"]["lm_head_fit"] == "weighted" and report["int4"]["weighted_fit_error_ratio"] < 1
    # the attention output projections read the attention's output as it is (attention_output_offsets: rounded)
    graphs = [onnx.load(str(out / "int4/model.onnx"), load_external_data=False).graph]
    graphs += [a.g for g in graphs for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    graphs += [a.g for g in graphs[1:] for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    gqa_outputs = {n.output[0] for g in graphs for n in g.node if n.op_type == "GroupQueryAttention"}
    o_proj = [n for g in graphs for n in g.node if n.op_type == "MatMulNBits" and n.input[0] in gqa_outputs]
    assert report["int4"]["attention_output_offsets"] == "rounded"
    assert report["int4"]["rounded_offset_inputs"] > 0 and len(o_proj) >= report["int4"]["rounded_offset_inputs"]
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "int4/model.onnx"
    assert "int4" in (out / "report.md").read_text()
    assert cli("verify", out).returncode == 0
    generated = cli("generate", out, "--prompt", "Hi", "--max-new-tokens", "3")
    assert generated.returncode == 0 and generated.stdout.strip()

    # a threshold the graph cannot meet fails the run, names the check, and publishes nothing
    strict = (tmp_path / "int4.yaml").read_text().replace(loose, "  int4: {min_top1: 1.0}\n")
    (tmp_path / "strict.yaml").write_text(strict)
    shutil.rmtree(out)
    failed = cli(tmp_path / "strict.yaml", "--out", out, env={"EXPORT_SKIP_CACHE": str(tmp_path / "cache")})
    assert failed.returncode == 1 and "int4: top-1 agreement" in failed.stderr + failed.stdout
    assert not out.exists() and (out.parent / "tiny-int4.failed").is_dir()
    assert load_reference(out.parent / "tiny-int4.failed" / "reference.npz")


def test_weighted_grids_lower_the_weighted_error_and_keep_q4_1_blocks_exact():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 4, 32))
    importance = rng.lognormal(0, 1.5, (4, 32))  # a few input channels weigh most, as after a trained norm

    def weighted_error(q, scale, zero, offset, _):
        rebuilt = scale[..., None] * (q.astype(np.float64) - zero[..., None]) + offset[..., None]
        return float((importance * (rebuilt - w) ** 2).sum())

    minmax, weighted = weighted_error(*affine_blocks(w)), weighted_error(*affine_blocks(w, importance))
    assert weighted < 0.8 * minmax, (weighted, minmax)
    exact = _q4_1(rng, 64, 48).T.reshape(48, 2, 32)  # on-grid blocks keep their grid whatever the weights
    q, scale, zero, offset, on_grid = affine_blocks(exact, rng.lognormal(0, 1.5, (2, 32)))
    assert on_grid.all()
    assert np.abs(scale[..., None] * (q.astype(np.float64) - zero[..., None]) + offset[..., None] - exact).max() < 1e-6


def _outlier_norm(plain, out_dir, rng):
    """The plain graph with its final norm's weight (the Mul feeding the tied LM head) multiplied per channel by
    lognormal factors: a few channels then dominate the LM head's input, as a trained model's do."""
    proto = onnx.load(str(plain))
    nodes = {o: n for n in proto.graph.node for o in n.output}
    inits = {t.name: t for t in proto.graph.initializer}
    head = next(n for n in proto.graph.node if n.op_type == "MatMul" and nodes.get(n.input[1]) is not None
                and nodes[n.input[1]].op_type == "Transpose" and nodes[n.input[1]].input[0] in inits)
    name = next(i for i in nodes[head.input[0]].input if i in inits)
    gamma = numpy_helper.to_array(inits[name])
    inits[name].CopyFrom(numpy_helper.from_array((gamma * rng.lognormal(0, 1.5, gamma.shape)).astype(np.float32), name))
    out_dir.mkdir()
    onnx.save(proto, str(out_dir / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return out_dir / "model.onnx"


def test_weighted_lm_head_fit_is_closer_to_the_fp32_graph(tiny_models, qwen3_plain, tmp_path):
    _, tok = tiny_models["qwen3"]
    rng = np.random.default_rng(3)
    source = _outlier_norm(qwen3_plain, tmp_path / "src", rng)
    ids, attn = left_padded(tok, PROMPTS)
    calibration = [(ids.numpy(), attn.numpy())]
    with pytest.raises(ValueError, match="calibration"):
        quantize_int4(source, tmp_path / "x" / "model.onnx", lm_head_fit="weighted")
    info = {fit: quantize_int4(source, tmp_path / fit / "model.onnx", block_size=32, accuracy_level=0,
                               lm_head_fit=fit, calibration=calibration if fit == "weighted" else None)
            for fit in ("minmax", "weighted")}
    assert info["weighted"]["lm_head_fit"] == "weighted" and info["minmax"]["lm_head_fit"] == "minmax"
    assert info["weighted"]["lm_head_calibration_rows"] == int(attn.sum())
    assert info["weighted"]["weighted_fit_error_ratio"] < 1 and "weighted_fit_error_ratio" not in info["minmax"]
    assert _ops(tmp_path / "weighted" / "model.onnx") == _ops(tmp_path / "minmax" / "model.onnx")  # same cost
    # on other tokens than the calibration's, the LM head's own error (against the same int4 body with an fp32
    # LM head) is smaller with weighted blocks
    quantize_int4(source, tmp_path / "fp32" / "model.onnx", block_size=32, accuracy_level=0, lm_head=False)
    held_out = torch.from_numpy(rng.integers(0, 256, (4, 12)))
    logits = {name: OrtRunner(tmp_path / name / "model.onnx").prefill(held_out, torch.ones_like(held_out)).numpy()
              for name in ("fp32", "minmax", "weighted")}
    error = {fit: float(((logits[fit] - logits["fp32"]) ** 2).mean()) for fit in ("minmax", "weighted")}
    assert error["weighted"] < 0.5 * error["minmax"], error
