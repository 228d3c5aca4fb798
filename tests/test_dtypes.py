"""exporter/dtypes.py: every library's spelling of a dtype, from one table."""

from __future__ import annotations

import numpy as np
import onnx

from exporter.dtypes import numpy_dtype, onnx_dtype_name, precision_of


def test_onnx_runtime_and_onnx_types_map_to_numpy():
    for ort_type, proto, expected in [("tensor(float)", onnx.TensorProto.FLOAT, np.float32),
                                      ("tensor(float16)", onnx.TensorProto.FLOAT16, np.float16),
                                      ("tensor(int64)", onnx.TensorProto.INT64, np.int64),
                                      ("tensor(int32)", onnx.TensorProto.INT32, np.int32)]:
        assert numpy_dtype(ort_type) is numpy_dtype(proto) is expected
    assert numpy_dtype("fp16") is numpy_dtype("float16") is np.float16
    # numpy has no bfloat16; unknown types have no numpy dtype here either
    assert numpy_dtype("tensor(bfloat16)") is numpy_dtype("bf16") is numpy_dtype("tensor(bool)") is None
    assert onnx_dtype_name(onnx.TensorProto.BFLOAT16) == onnx_dtype_name("tensor(bfloat16)") == "bfloat16"
    assert precision_of(onnx_dtype_name("tensor(float)")) == "fp32"
    assert onnx_dtype_name(10_000) is None
