"""docs/scale-out.md, "Measured here": the same greedy search locally, then on a 2-node Ray cluster on this machine
(tests/ray_cluster.py: two raylets of one CPU each) with 1 and with 2 search workers; wall time of each command and
whether every run wrote the same recipe bytes. Prints one JSON object.

    .venv/bin/python scripts/search_scaling.py [RECIPE] [-- SEARCH ARGS...]

Default: recipes/smollm2-135m.yaml with --count 2 --calibration-windows 2 --calibration-length 128 (KL on WikiText-2).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.ray_cluster import LocalCluster  # noqa: E402

DEFAULT_ARGS = ["--count", "2", "--calibration-windows", "2", "--calibration-length", "128"]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def timed(cmd: list[str], env: dict) -> dict:
    load = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    found = re.search(r"\((\d+) evaluations, (\d+) s\)", done.stderr)
    return {"wall_s": round(wall, 1), "search_s": int(found.group(2)) if found else None,
            "evaluations": int(found.group(1)) if found else None, "load_1min_before": round(load, 2)}


def main(argv: list[str]) -> None:
    recipe = argv[0] if argv and argv[0] != "--" else "recipes/smollm2-135m.yaml"
    extra = argv[argv.index("--") + 1:] if "--" in argv else DEFAULT_ARGS
    out = Path(tempfile.mkdtemp(prefix="es-scaling-")) / "searched.yaml"
    base = [sys.executable, "-m", "exporter.cli", "search", recipe, *extra, "--out", str(out)]
    runs, recipes = {}, {}
    with LocalCluster(nodes=2, cpus=1) as cluster:
        for name, flags in (("local (torch on both cores)", []),
                            ("ray, 1 worker of 1 CPU", ["--ray", cluster.address, "--workers", "1"]),
                            ("ray, 2 workers of 1 CPU", ["--ray", cluster.address, "--workers", "2"])):
            runs[name] = timed(base + flags, cluster.env)
            recipes[name] = out.read_bytes()
            out.unlink()
    one, two = runs["ray, 1 worker of 1 CPU"]["wall_s"], runs["ray, 2 workers of 1 CPU"]["wall_s"]
    print(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(), "recipe": recipe, "search_args": extra,
                      "runs": runs, "two_over_one_wall": round(two / one, 3),
                      "same_recipe_bytes": len(set(recipes.values())) == 1,
                      "mask": next(line for line in recipes["local (torch on both cores)"].decode().splitlines()
                                   if line.startswith("  attention:"))}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
