"""Precision names, dtype names and bytes per element: one table for every module.

A recipe's `model.dtype` is a dtype name (float32 / float16 / bfloat16); graphs, engines and reports name
precisions (fp32 / fp16 / bf16). TensorRT 11 / TensorRT-RTX are strongly typed, so an engine's precision is
its graph's.
"""

from __future__ import annotations

DTYPE_OF = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # precision -> dtype name
PRECISION_OF = {dtype: precision for precision, dtype in DTYPE_OF.items()}  # dtype name -> precision
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}  # dtype name -> bytes per element
DTYPE_NAMES = tuple(ITEMSIZE)


def dtype_name(dtype) -> str:
    """'float32' for torch.float32, 'float32', or Polygraphy's / numpy's float32."""
    return str(dtype).removeprefix("torch.")


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
