"""The ONNX contract (stable; other tools depend on it): file names, input/output names and shapes.

Inputs: input_ids [batch, sequence], attention_mask [batch, total_sequence], position_ids
[batch, sequence], past_key_values.{i}.key/value [batch, kv_heads, past_sequence, head_dim] for kept
attention layers i only (i = the layer's index in the base model). Outputs: logits [batch, sequence,
vocab] and present.{i}.key/value [batch, kv_heads, total_sequence, head_dim]; total_sequence =
past_sequence + sequence. One graph serves prefill (past_sequence 0) and decode. Weights are stored as
external data beside the .onnx. Names follow Optimum's and onnxruntime-genai's conventions.
"""

from __future__ import annotations

from pathlib import Path

from exporter.architectures import head_dim

ONNX_FILE = "model.onnx"  # the plain graph: TensorRT and any ONNX runtime
OPT_FILE = "model.opt.onnx"  # the optimized ONNX Runtime graph (contrib ops), same I/O
PAST = "past_key_values."
PRESENT = "present."
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def data_path(graph: Path) -> Path:
    """The external data file beside a graph (`model.onnx` -> `model.onnx.data`)."""
    return graph.with_name(graph.name + ".data")


def input_names(kept_attention: list[int]) -> list[str]:
    names = list(MODEL_INPUTS)
    for i in kept_attention:
        names += [f"{PAST}{i}.key", f"{PAST}{i}.value"]
    return names


def output_names(kept_attention: list[int]) -> list[str]:
    names = ["logits"]
    for i in kept_attention:
        names += [f"{PRESENT}{i}.key", f"{PRESENT}{i}.value"]
    return names


def is_past(name: str) -> bool:
    return name.startswith(PAST)


def is_present(name: str) -> bool:
    return name.startswith(PRESENT)


def past_for(present_name: str) -> str:
    """present.{i}.key -> past_key_values.{i}.key: what a decode loop feeds back."""
    return PAST + present_name.removeprefix(PRESENT)


def kept_layers(names) -> list[int]:
    """The kept attention layers a graph's input names declare (sorted)."""
    return sorted(int(n.split(".")[1]) for n in names if is_past(n) and n.endswith(".key"))


def kv_shape(config, batch: int, length: int) -> tuple[int, int, int, int]:
    """[batch, kv_heads, length, head_dim] of one layer's past key (or value)."""
    return (batch, config.num_key_value_heads, length, head_dim(config))


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


def position_ids(attention_mask):
    """The contract's `position_ids` for a left-padded batch [B, T] (torch): the first real token is 0 (padding
    gets 0 too)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)
