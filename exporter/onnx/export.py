"""export_onnx(skipped_model, out_dir) -> path: the decode graph under the ONNX contract (onnx/contract.py).

One graph serves prefill (past_sequence 0) and decode; weights are stored as external data beside the .onnx.
A graph in another precision is exported from a cast copy of the model (`model_in_precision`), so what stays
fp32 in a half graph is decided in the modules: RMSNorm variance (Hugging Face's norms upcast), rotary
cos/sin (computed in fp32), the attention bias, scaling and softmax, and the logits (surgery.py).
"""

from __future__ import annotations

import gc
import logging
import shutil
import warnings
from pathlib import Path

from exporter.dtypes import torch_dtype
from exporter.onnx.contract import ONNX_FILE, data_path, input_names, is_present, kv_shape, output_names


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
        elif is_present(name):
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
    example = example_inputs(model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # One eager pass of the embedding and rotary first: a rotary module that builds a table on its first
        # call (Phi-3's longrope keeps `long_inv_freq` as a plain attribute) must not build it under tracing,
        # where it would be a fake tensor baked wrongly into the graph and left on the module.
        model.embed(*example[:3])
        program = torch.onnx.export(
            model,
            example,
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
    del program
    release_rewriter_state()
    proto = onnx.load(str(tmp / ONNX_FILE), load_external_data=False)
    _name_dims(proto)
    path = out_dir / ONNX_FILE
    onnx.save(proto, str(path))
    data_path(tmp / ONNX_FILE).replace(data_path(out_dir / ONNX_FILE))
    shutil.rmtree(tmp)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def model_in_precision(model, precision: str, in_place: bool = False):
    """`model` itself if it is already in `precision`, else a cast copy (the original stays as it is); with
    `in_place`, the model itself is cast (no second copy of the weights)."""
    import copy

    dtype = torch_dtype(precision)
    if next(model.parameters()).dtype == dtype:
        return model
    cast = (model if in_place else copy.deepcopy(model)).to(dtype)
    # Rotary tables stay fp32, as in a half model Hugging Face loads itself (its inv_freq buffers are built in fp32
    # and never cast); cos/sin are computed in fp32 and cast to the activations' dtype by the module. Phi-3's
    # longrope also mixes inv_freq with an fp32 table, which a half buffer makes a dtype mismatch in the export.
    for name, module in cast.named_modules():
        if name.endswith("rotary_emb"):
            module.float()
    return cast


def release_rewriter_state() -> None:
    """Drop the graph onnxscript's pattern matchers keep after their last match.

    onnxscript 0.7's SimplePatternMatcher (module-level rewrite rules that torch.onnx's optimizer runs) keeps
    `_graph`, `_current_node`, `_match` and `_tracer` of the last graph it matched; that graph holds the
    model's weights as TorchTensors, so after an export the weights stayed resident even once the model was
    released (a 1-layer Mistral-7B-shaped model: 2.2 GiB kept). Each match sets these again, so clearing them
    is safe.
    """
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to clear
        return
    with warnings.catch_warnings():  # isinstance on every object touches deprecated torch attributes
        warnings.simplefilter("ignore")
        matchers = [obj for obj in gc.get_objects() if isinstance(obj, SimplePatternMatcher)]
    for obj in matchers:
        for attr in ("_graph", "_current_node", "_match", "_tracer"):
            if attr in vars(obj):
                setattr(obj, attr, None)
