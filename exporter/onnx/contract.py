"""The ONNX contract (stable; other tools depend on it): file names, input/output names and shapes.

Inputs: input_ids [batch, sequence], attention_mask [batch, total_sequence], position_ids
[batch, sequence], past_key_values.{i}.key/value [batch, kv_heads, past_sequence, head_dim] for kept
attention layers i only (i = the layer's index in the base model). Outputs: logits [batch, sequence,
vocab] and present.{i}.key/value [batch, kv_heads, total_sequence, head_dim]; total_sequence =
past_sequence + sequence. One graph serves prefill (past_sequence 0) and decode. Weights are stored as
external data beside the .onnx. Names follow Optimum's and onnxruntime-genai's conventions.
"""

from __future__ import annotations

import re
from pathlib import Path

from exporter.architectures import head_dim

ONNX_FILE = "model.onnx"  # the plain graph: TensorRT and any ONNX runtime
OPT_FILE = "model.opt.onnx"  # the optimized ONNX Runtime graph (contrib ops), same I/O
PAST = "past_key_values."  # + "{layer}.key" / "{layer}.value": the cache inputs
PRESENT = "present."  # + "{layer}.key" / "{layer}.value": the cache outputs
KINDS = ("key", "value")
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# Peer graphs the bench times beside ours (onnxruntime-genai's model builder) name their caches otherwise:
# inputs `past_key.{i}`-style, outputs `present_...`; the bench feeds and measures them too (timing/worker.py).
PEER_PAST = ("past_key.",)
PEER_PRESENT = "present"


def data_path(graph: Path) -> Path:
    """The external data file beside a graph (`model.onnx` -> `model.onnx.data`)."""
    return graph.with_name(graph.name + ".data")


def past_name(layer: int | str, kind: str = "key") -> str:
    """past_key_values.{layer}.{kind}; `layer` may be a template's placeholder ("%d": onnxruntime-genai's config)."""
    return f"{PAST}{layer}.{kind}"


def present_name(layer: int | str, kind: str = "key") -> str:
    """present.{layer}.{kind} (see past_name)."""
    return f"{PRESENT}{layer}.{kind}"


def input_names(kept_attention: list[int]) -> list[str]:
    return list(MODEL_INPUTS) + [past_name(i, kind) for i in kept_attention for kind in KINDS]


def output_names(kept_attention: list[int]) -> list[str]:
    return ["logits"] + [present_name(i, kind) for i in kept_attention for kind in KINDS]


def is_past(name: str) -> bool:
    return name.startswith(PAST)


def is_present(name: str) -> bool:
    return name.startswith(PRESENT)


def is_cache_input(name: str) -> bool:
    """A past cache input: ours, or a peer graph's (PEER_PAST)."""
    return is_past(name) or name.startswith(PEER_PAST)


def is_cache_output(name: str) -> bool:
    """A present cache output: ours, or a peer graph's (PEER_PRESENT)."""
    return name.startswith(PEER_PRESENT)


def past_for(present: str) -> str:
    """present.{i}.key -> past_key_values.{i}.key: what a decode loop feeds back."""
    return PAST + present.removeprefix(PRESENT)


_PRESENT_KEY = re.compile(re.escape(PRESENT) + r"(\d+)\.key$")


def present_key_layer(name: str) -> int | None:
    """i for a name ending in present.{i}.key (a branch of the graph may prefix it), else None."""
    match = _PRESENT_KEY.search(name)
    return int(match.group(1)) if match else None


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
