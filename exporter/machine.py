"""The machine a speed figure was measured on: CPU model, the ISA flags ONNX Runtime's kernels (MLAS) choose by,
core count, ONNX Runtime's version and the load average. Kernel choice depends on the ISA, so a figure or a
tuned choice means nothing without it (docs/results/speed.md)."""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata

# the flags MLAS dispatches on (x86: AVX2/FMA, AVX-512 and its VNNI/BF16 extensions, AMX; Arm: NEON dot products)
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimddp", "i8mm", "sve")


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def machine_info(threads: int | None = None) -> dict:
    """{cpu, isa, cpus, onnxruntime, threads, load_average}: what a timing depends on besides the graph."""
    info = _cpuinfo()
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", info, re.M)
    have = set(flags[1].split()) if flags else set()
    try:
        ort = metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        ort = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {"cpu": model[1].strip() if model else platform.processor() or platform.machine(),
            "isa": [f for f in ISA_FLAGS if f in have], "cpus": os.cpu_count(), "onnxruntime": ort,
            "threads": threads, "load_average": load}


def machine_key() -> dict:
    """What a tuned choice is valid for (a stage-cache key part): CPU model, ISA flags, ONNX Runtime version."""
    info = machine_info()
    return {k: info[k] for k in ("cpu", "isa", "onnxruntime")}


def describe_machine(info: dict) -> str:
    """One line: 'AMD EPYC (avx2 fma avx512f ...), 2 CPUs, onnxruntime 1.32.0, 1 thread, load 1.1'."""
    threads = f", {info['threads']} thread{'s' if info['threads'] != 1 else ''}" if info.get("threads") else ""
    load = f", load {info['load_average'][0]}" if info.get("load_average") else ""
    return (f"{info['cpu']} ({' '.join(info['isa']) or 'no listed ISA flags'}), {info['cpus']} CPUs, "
            f"onnxruntime {info['onnxruntime']}{threads}{load}")
