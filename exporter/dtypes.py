"""Precision names, dtype names, bytes per element and each library's spelling of them: one table for every module.

A recipe's `model.dtype` is a dtype name (float32 / float16 / bfloat16); graphs, engines and reports name
precisions (fp32 / fp16 / bf16). TensorRT 11 / TensorRT-RTX are strongly typed, so an engine's precision is
its graph's. ONNX names an element type by a TensorProto id (onnx.TensorProto.FLOAT16 = 10) and ONNX Runtime by
a string ('tensor(float16)'); numpy, torch and onnx are imported only by the functions that return their types,
so this module stays free to import.
"""

from __future__ import annotations

DTYPE_OF = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # precision -> dtype name
PRECISION_OF = {dtype: precision for precision, dtype in DTYPE_OF.items()}  # dtype name -> precision
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}  # dtype name -> bytes per element
DTYPE_NAMES = tuple(ITEMSIZE)
# dtype name -> onnx.TensorProto's name of it (ONNX Runtime's type string is 'tensor(' + that, lower case, + ')')
ONNX_TYPE = {"float32": "FLOAT", "float16": "FLOAT16", "bfloat16": "BFLOAT16", "float64": "DOUBLE",
             "int64": "INT64", "int32": "INT32"}
_OF_ONNX = {onnx_name: dtype for dtype, onnx_name in ONNX_TYPE.items()}


def dtype_name(dtype) -> str:
    """'float32' for torch.float32, 'float32', or Polygraphy's / numpy's float32."""
    return str(dtype).removeprefix("torch.")


def onnx_dtype_name(onnx_type: str | int) -> str | None:
    """'float16' for ONNX Runtime's 'tensor(float16)' or onnx.TensorProto.FLOAT16; None for a type not in ONNX_TYPE."""
    if isinstance(onnx_type, int):
        import onnx

        try:
            onnx_type = onnx.TensorProto.DataType.Name(onnx_type)
        except ValueError:  # not an ONNX element type
            return None
    else:
        onnx_type = onnx_type.removeprefix("tensor(").removesuffix(")")
    return _OF_ONNX.get(onnx_type.upper())


def numpy_dtype(dtype):
    """numpy's dtype for a dtype name, precision, ONNX Runtime type string or TensorProto id; None where numpy has
    none (bfloat16) or the type is not in ONNX_TYPE."""
    import numpy as np

    if isinstance(dtype, int) or str(dtype).startswith("tensor("):
        name = onnx_dtype_name(dtype)
    else:
        name = DTYPE_OF.get(dtype, dtype)
    return np.dtype(name).type if name in ONNX_TYPE and name != "bfloat16" else None


def precision_of(dtype) -> str:
    """torch dtype or dtype name -> 'fp32' / 'fp16' / 'bf16'."""
    return PRECISION_OF[dtype_name(dtype)]


def model_precision(model) -> str:
    """The precision of a torch module's parameters."""
    return precision_of(next(model.parameters()).dtype)


def itemsize(precision_or_dtype: str) -> int:
    """Bytes per element of 'fp16' or 'float16'."""
    return ITEMSIZE[DTYPE_OF.get(precision_or_dtype, precision_or_dtype)]


def torch_dtype(name: str):
    """torch.float16 for 'float16' or 'fp16'."""
    import torch

    return getattr(torch, DTYPE_OF.get(name, name))
