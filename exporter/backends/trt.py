"""build_engine(onnx_path, ...) -> path: TensorRT engines from the contract's ONNX, plus a JSON sidecar.

The only module that imports tensorrt / tensorrt_rtx. Two backends:
- `tensorrt-rtx` (PyPI wheel, extra `[rtx]`): builds ahead of time on a machine without a GPU, for the
  compute capabilities it is given; engines run on RTX-class GPUs (SM 7.5, 8.0, 8.6, 8.9, 12.x), not Hopper.
- `tensorrt` (10.x / 11.x, extra `[gpu]`, NVIDIA's package index): builds on, and for, the GPU present.
Both are strongly typed here: the engine's precision is the ONNX graph's (no FP16 builder flag).

Two optimization profiles: `prefill` (past_sequence 0, sequence 1..max_context) and `decode`
(sequence 1, past_sequence 1..max_context-1). A runner picks the profile per call.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from exporter.backends.base import DecodeRunner
from exporter.dtypes import dtype_name, torch_dtype
from exporter.errors import UserError
from exporter.files import sha256_file
from exporter.onnx.contract import is_past, is_present, past_for

# backend -> (python module, extra that installs it, what to run)
BACKENDS = {
    "tensorrt-rtx": ("tensorrt_rtx", "rtx", "pip install 'export-skip[rtx]' (tensorrt-rtx==1.7.1.116)"),
    "tensorrt": ("tensorrt", "gpu", "pip install 'export-skip[gpu]' with NVIDIA's index "
                                    "(--extra-index-url https://pypi.nvidia.com) on a machine with a CUDA GPU"),
}
COMPUTE_CAPABILITIES = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")  # tensorrt-rtx targets
HARDWARE_COMPATIBILITY = {"none": "NONE", "ampere_plus": "AMPERE_PLUS",
                          "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}


class BackendMissing(UserError):
    """The requested TensorRT backend is not installed (one line, names the extra)."""


class ParseError(UserError):
    """The ONNX parser rejected the graph; the message names the node and op."""


@dataclass(frozen=True)
class BuildOptions:
    max_batch: int = 4
    max_context: int = 2048
    opt_batch: int = 1
    optimization_level: int = 3  # builder optimization level 0-5
    compute_capabilities: tuple[str, ...] = ("sm89",)  # tensorrt-rtx only; ignored by tensorrt
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    timing_cache: Path | None = None  # tensorrt only; tensorrt-rtx ignores timing caches


@dataclass
class Sidecar:
    """What the JSON beside each engine records; `check_sidecar` verifies it against the file."""

    backend: str
    backend_version: str
    precision: str
    onnx: str
    onnx_sha256: str
    engine_bytes: int
    engine_sha256: str
    profiles: dict = field(default_factory=dict)
    compute_capabilities: list[str] = field(default_factory=list)
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    optimization_level: int = 3
    timing_cache: str | None = None
    build_seconds: float = 0.0


def missing_reason(backend: str) -> str | None:
    """None if `backend` can be imported, else one line saying what to install."""
    if backend not in BACKENDS:
        return f"unknown TensorRT backend {backend!r} (choose from {', '.join(BACKENDS)})"
    module, extra, how = BACKENDS[backend]
    if importlib.util.find_spec(module) is None:
        return f"TensorRT backend {backend!r} is not installed: {how}"
    return None


def import_backend(backend: str):
    reason = missing_reason(backend)
    if reason:
        raise BackendMissing(reason)
    module = importlib.import_module(BACKENDS[backend][0])
    if backend == "tensorrt":
        major = int(module.__version__.split(".")[0])
        if major < 10:
            raise BackendMissing(f"tensorrt {module.__version__} is too old: this tool needs 10.x or 11.x")
    return module


def profile_shapes(inputs: dict[str, tuple], opts: BuildOptions) -> dict[str, dict[str, list[list[int]]]]:
    """{profile: {input: [min, opt, max]}} for the contract's inputs (name -> static dims or None).

    prefill: past 0, sequence 1..max_context; decode: sequence 1, past 1..max_context-1.
    """
    b_max, b_opt, ctx = opts.max_batch, min(opts.opt_batch, opts.max_batch), opts.max_context
    ranges = {  # (batch, sequence, past) as (min, opt, max)
        "prefill": ((1, b_opt, b_max), (1, max(1, ctx // 8), ctx), (0, 0, 0)),
        "decode": ((1, b_opt, b_max), (1, 1, 1), (1, max(1, ctx // 2), ctx - 1)),
    }
    out = {}
    for profile, (batch, seq, past) in ranges.items():
        shapes = {}
        for name, dims in inputs.items():
            if name in ("input_ids", "position_ids"):
                shapes[name] = [[batch[k], seq[k]] for k in range(3)]
            elif name == "attention_mask":
                shapes[name] = [[batch[k], past[k] + seq[k]] for k in range(3)]
            elif is_past(name):
                _, heads, _, dim = dims
                shapes[name] = [[batch[k], heads, past[k], dim] for k in range(3)]
            else:
                raise UserError(f"input {name!r} is not part of the ONNX contract; cannot build a profile for it")
        out[profile] = shapes
    return out


def _parse(trt, network, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, trt.Logger(trt.Logger.ERROR))
    if parser.parse_from_file(str(onnx_path)):
        return
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        errors.append(f"node {err.node_name() or err.node()!s} (op {err.node_operator() or '?'}): {err.desc()}")
    raise ParseError(f"{onnx_path}: TensorRT's ONNX parser failed: " + "; ".join(errors or ["no details"]))


def _graph_inputs(network) -> dict[str, tuple]:
    return {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}


def build_engine(onnx_path: Path, engine_path: Path, backend: str, precision: str,
                 opts: BuildOptions = BuildOptions()) -> Sidecar:
    """Parse `onnx_path`, build with both profiles, write the engine and `<engine>.json`; returns the sidecar."""
    trt = import_backend(backend)
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flags = 0
    if backend == "tensorrt" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # TRT 10: opt in; 11: always
    network = builder.create_network(flags)
    _parse(trt, network, onnx_path)

    config = builder.create_builder_config()
    config.builder_optimization_level = opts.optimization_level
    if backend == "tensorrt-rtx":
        config.num_compute_capabilities = len(opts.compute_capabilities)
        for i, cc in enumerate(opts.compute_capabilities):
            config.set_compute_capability(getattr(trt.ComputeCapability, cc.upper()), i)
    if opts.hardware_compatibility != "none":
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel,
                                                      HARDWARE_COMPATIBILITY[opts.hardware_compatibility])
    if opts.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    # TensorRT-RTX makes timing-cache calls no-ops (deprecated since 1.2): only tensorrt uses the cache
    cache_path = opts.timing_cache if backend == "tensorrt" else None
    cache = _load_timing_cache(config, cache_path)

    shapes = profile_shapes(_graph_inputs(network), opts)
    for per_input in shapes.values():
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in per_input.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{backend} failed to build an engine from {onnx_path} (see the log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(memoryview(serialized))
    if cache is not None:  # the recipe's cache is only read: the updated one stays inside the artifact folder
        timing_cache_out(engine_path).write_bytes(memoryview(cache.serialize()))

    sidecar = Sidecar(
        backend=backend, backend_version=trt.__version__, precision=precision,
        onnx=os.path.relpath(onnx_path, engine_path.parent), onnx_sha256=sha256_file(onnx_path),
        engine_bytes=engine_path.stat().st_size, engine_sha256=sha256_file(engine_path),
        profiles=shapes, compute_capabilities=list(opts.compute_capabilities) if backend == "tensorrt-rtx" else ["current"],
        hardware_compatibility=opts.hardware_compatibility, version_compatible=opts.version_compatible,
        optimization_level=opts.optimization_level, timing_cache=str(cache_path) if cache_path else None,
        build_seconds=round(time.perf_counter() - started, 2),
    )
    sidecar_path(engine_path).write_text(json.dumps(asdict(sidecar), indent=2) + "\n", encoding="utf-8")
    return sidecar


def _load_timing_cache(config, path: Path | None):
    if path is None:
        return None
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def timing_cache_out(engine_path: Path) -> Path:
    """Where a build writes its updated timing cache: beside the engine (recipes never name a write target)."""
    return engine_path.with_name(engine_path.name + ".timing-cache")


def sidecar_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def check_sidecar(engine_path: Path, onnx_path: Path | None = None) -> list[str]:
    """Problems between an engine, its sidecar and (optionally) its ONNX; empty when they agree."""
    meta = json.loads(sidecar_path(engine_path).read_text(encoding="utf-8"))
    problems = []
    if meta["engine_bytes"] != engine_path.stat().st_size:
        problems.append(f"engine is {engine_path.stat().st_size} bytes, sidecar says {meta['engine_bytes']}")
    if meta["engine_sha256"] != sha256_file(engine_path):
        problems.append("engine sha256 differs from the sidecar's")
    if onnx_path is not None and meta["onnx_sha256"] != sha256_file(onnx_path):
        problems.append(f"{onnx_path.name} sha256 differs from the sidecar's (engine built from another graph)")
    return problems


def engine_profiles(engine_path: Path, backend: str) -> dict[str, list]:
    """Profile shapes as the engine itself reports them (deserialising needs the backend's runtime).

    Deserialising a tensorrt-rtx engine on a machine without a supported GPU fails; callers skip then.
    """
    trt = import_backend(backend)
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise RuntimeError(f"{backend} could not load {engine_path} on this machine")
    out = {}
    for p in range(engine.num_optimization_profiles):
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                out.setdefault(name, []).append([list(s) for s in engine.get_tensor_profile_shape(name, p)])
    return out


def open_runner(engine_path: Path, backend: str):
    """An activated Polygraphy TrtRunner for an engine (needs a CUDA GPU the engine was built for).

    Polygraphy picks tensorrt or tensorrt_rtx from POLYGRAPHY_USE_TENSORRT_RTX when it is first
    imported, so one process runs engines of one backend.
    """
    import_backend(backend)
    want = "1" if backend == "tensorrt-rtx" else "0"
    if os.environ.setdefault("POLYGRAPHY_USE_TENSORRT_RTX", want) != want:
        raise UserError(f"this process already runs {'tensorrt' if want == '1' else 'tensorrt-rtx'} engines "
                        f"through Polygraphy; run {backend} engines in another process")
    if importlib.util.find_spec("polygraphy") is None:
        raise BackendMissing(f"running {backend} engines needs polygraphy: {BACKENDS[backend][2]}")
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    runner = TrtRunner(EngineFromBytes(engine_path.read_bytes()))
    runner.activate()
    return runner


class TrtRunner(DecodeRunner):
    """A TensorRT / TensorRT-RTX engine through Polygraphy's TrtRunner; the KV cache stays on the GPU.

    Profile 0 (`prefill`, empty past) serves prefill and profile 1 (`decode`, one token) serves steps,
    as `build_engine` builds them. Needs a CUDA GPU the engine was built for; not run in this
    project's CI (no GPU), so it is checked by `pytest -m gpu` / scripts/gpu_check.sh on users' GPUs.
    """

    name = "tensorrt"

    def __init__(self, engine_path: Path, backend: str = "tensorrt"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"running {engine_path} needs a CUDA GPU; none is visible to PyTorch")
        self.runner = open_runner(Path(engine_path), backend)
        self.device = torch.device("cuda")
        self.past_meta = {}  # name -> (heads, head_dim, dtype)
        for name, (dtype, shape) in self.runner.get_input_metadata().items():
            if is_past(name):
                self.past_meta[name] = (shape[1], shape[3], torch_dtype(dtype_name(dtype)))  # Polygraphy DataType: 'float16'
        self.profile = 0

    def reset(self, batch: int) -> None:
        import torch

        self.past = {name: torch.zeros((batch, heads, 0, dim), dtype=dtype, device=self.device)
                     for name, (heads, dim, dtype) in self.past_meta.items()}

    def forward(self, input_ids, attention_mask, position_ids):
        profile = 0 if input_ids.shape[1] > 1 or attention_mask.shape[1] == input_ids.shape[1] else 1
        if profile != self.profile:
            self.runner.set_profile(profile)
            self.profile = profile
        feeds = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device),
                 "position_ids": position_ids.to(self.device), **self.past}
        outputs = self.runner.infer(feeds, copy_outputs_to_host=False)
        # Polygraphy reuses its output buffers between calls: copy the presents before feeding them back.
        self.past = {past_for(name): value.clone() for name, value in outputs.items() if is_present(name)}
        return outputs["logits"].float().cpu()

    def close(self) -> None:
        self.runner.deactivate()
