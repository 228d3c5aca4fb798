"""export_onnx(skipped_model, out_dir) -> path: the decode graph under the ONNX contract.

Inputs: input_ids [batch, sequence], attention_mask [batch, total_sequence], position_ids
[batch, sequence], past_key_values.{i}.key/value [batch, kv_heads, past_sequence, head_dim] for
kept attention layers i only. Outputs: logits [batch, sequence, vocab] and present.{i}.key/value
[batch, kv_heads, total_sequence, head_dim]; total_sequence = past_sequence + sequence. One graph
serves prefill (past_sequence 0) and decode. Weights are stored as external data beside the .onnx.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

ONNX_FILE = "model.onnx"


def input_names(kept_attention: list[int]) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in kept_attention:
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(kept_attention: list[int]) -> list[str]:
    names = ["logits"]
    for i in kept_attention:
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


def kv_shape(config, batch: int, length: int) -> tuple[int, int, int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (batch, config.num_key_value_heads, length, head_dim)


def example_inputs(model, batch: int = 2, seq: int = 3, past: int = 2):
    """Tracing inputs; batch, sequence and past are at least 2 so export keeps them symbolic."""
    import torch

    config = model.config
    dtype = next(model.parameters()).dtype
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = tuple(torch.zeros(kv_shape(config, batch, past), dtype=dtype) for _ in range(2 * len(model.kept_attention)))
    return (ids, mask, pos, *kv)


def _name_dims(model_proto) -> None:
    """Give the graph's dynamic dims the contract's names (export leaves e.g. 's53' for the mask)."""
    for value in list(model_proto.graph.input) + list(model_proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        name = value.name
        if name == "attention_mask":
            dims[1].dim_param = "total_sequence"
        elif name.startswith("present."):
            dims[2].dim_param = "total_sequence"
        elif name == "logits":
            dims[0].dim_param, dims[1].dim_param = "batch", "sequence"


def export_onnx(model, out_dir: Path, opset: int = 18) -> Path:
    """Export a SkippedModel; returns the .onnx path. Raises on checker failure."""
    import onnx
    import torch
    from torch.export import Dim

    out_dir.mkdir(parents=True, exist_ok=True)
    kept = model.kept_attention
    batch, seq, past = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    dynamic_shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: Dim.AUTO},  # = past + sequence; export infers the relation
        {0: batch, 1: seq},
    )
    if kept:  # *past is one tuple argument to torch.export
        dynamic_shapes += (tuple({0: batch, 2: past} for _ in range(2 * len(kept))),)
    # torch.onnx is chatty (progress lines, deprecation warnings); our own progress is shown instead.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            example_inputs(model),
            dynamo=True,
            input_names=input_names(kept),
            output_names=output_names(kept),
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            verbose=False,
        )
    tmp = out_dir / "_export"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    program.save(str(tmp / ONNX_FILE), external_data=True)
    proto = onnx.load(str(tmp / ONNX_FILE), load_external_data=False)
    _name_dims(proto)
    path = out_dir / ONNX_FILE
    onnx.save(proto, str(path))
    (tmp / (ONNX_FILE + ".data")).replace(out_dir / (ONNX_FILE + ".data"))
    shutil.rmtree(tmp)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def onnx_signature(path: Path) -> dict:
    """Names, element types and dims of the graph's inputs and outputs."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)

    def describe(values):
        return {
            v.name: {
                "dtype": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower(),
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        }

    return {"inputs": describe(proto.graph.input), "outputs": describe(proto.graph.output)}


def onnx_weight_elements(path: Path) -> int:
    """Elements in the graph's floating-point initializers (weights; a few small constants too)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    total = 0
    for init in proto.graph.initializer:
        if init.data_type in floats:
            n = 1
            for d in init.dims:
                n *= d
            total += n
    return total


# Precisions a graph can be exported in. TensorRT 11 / TensorRT-RTX are strongly typed, so an engine's
# precision is its graph's: half-precision engines start here. What stays fp32 in a half graph is
# decided in the modules themselves: RMSNorm variance (Hugging Face's norms upcast), rotary cos/sin
# (computed in fp32), the attention bias, scaling and softmax, and the logits (surgery.py).
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def precision_of(dtype) -> str:
    """torch dtype -> 'fp32' / 'fp16' / 'bf16'."""
    name = str(dtype).removeprefix("torch.")
    return next(p for p, d in PRECISIONS.items() if d == name)


def model_in_precision(model, precision: str):
    """`model` itself if it is already in `precision`, else a cast copy (the original stays as it is)."""
    import copy

    import torch

    dtype = getattr(torch, PRECISIONS[precision])
    if next(model.parameters()).dtype == dtype:
        return model
    return copy.deepcopy(model).to(dtype)


def ort_unsupported_op(error: Exception) -> str | None:
    """'Where(16) node node_where' when ONNX Runtime has no kernel for a node on this provider, else None."""
    import re

    match = re.search(r"Could not find an implementation for (\S+?\(\d+\)) node with name '([^']*)'", str(error))
    return f"{match[1]} node {match[2]}" if match else None
