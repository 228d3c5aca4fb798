"""docs/scale-out.md, "Measured here": the same greedy search locally, then on a 2-node Ray cluster on this machine
(tests/ray_cluster.py: two raylets of one CPU each) with 1 and with 2 search workers; wall time of each command and
whether every run wrote the same recipe bytes. Prints one JSON object.

    .venv/bin/python scripts/search_scaling.py [RECIPE] [--repeats N] [-- SEARCH ARGS...]

Default: recipes/smollm2-135m.yaml with --count 2 --calibration-windows 2 --calibration-length 128 (KL on WikiText-2),
one local run, then N (default 2) rounds of 1 worker / 2 workers in alternating order. On a shared machine each run
is preceded by `parallel_cpus`: the work two busy processes got done side by side, over the work of one alone
(2.0 on two idle cores, about 1.0 when other jobs hold one core): the speedup 2 workers can show is bounded by it.
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


def _spin(seconds: float, result) -> None:
    end, n = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        n += 1
    result.put(n)


def parallel_cpus(seconds: float = 2.0) -> float:
    """Work of two spinning processes side by side over the work of one alone."""
    import multiprocessing as mp

    def run(k: int) -> int:
        queue = mp.Queue()
        procs = [mp.Process(target=_spin, args=(seconds, queue)) for _ in range(k)]
        for p in procs:
            p.start()
        total = sum(queue.get() for _ in procs)
        for p in procs:
            p.join()
        return total

    return round(run(2) / run(1), 2)


def timed(cmd: list[str], env: dict) -> dict:
    load, cpus = os.getloadavg()[0], parallel_cpus()
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    found = re.search(r"\((\d+) evaluations, (\d+) s\)", done.stderr)
    return {"wall_s": round(wall, 1), "search_s": int(found.group(2)) if found else None,
            "evaluations": int(found.group(1)) if found else None, "load_1min_before": round(load, 2),
            "parallel_cpus_before": cpus}


def main(argv: list[str]) -> None:
    extra = argv[argv.index("--") + 1:] if "--" in argv else DEFAULT_ARGS
    argv = argv[:argv.index("--")] if "--" in argv else argv
    repeats = int(argv[argv.index("--repeats") + 1]) if "--repeats" in argv else 2
    positional = [a for i, a in enumerate(argv) if not a.startswith("--") and (i == 0 or argv[i - 1] != "--repeats")]
    recipe = positional[0] if positional else "recipes/smollm2-135m.yaml"
    out = Path(tempfile.mkdtemp(prefix="es-scaling-")) / "searched.yaml"
    base = [sys.executable, "-m", "exporter.cli", "search", recipe, *extra, "--out", str(out)]
    runs: list[dict] = []
    recipes = set()
    with LocalCluster(nodes=2, cpus=1) as cluster:
        plan = [("local", [])]
        for k in range(repeats):
            pair = [("1 worker", ["--workers", "1"]), ("2 workers", ["--workers", "2"])]
            plan += pair if k % 2 == 0 else pair[::-1]
        for name, flags in plan:
            ray = ["--ray", cluster.address] if name != "local" else []
            runs.append({"run": name, **timed(base + ray + flags, cluster.env)})
            recipes.add(out.read_bytes())
            out.unlink()
    mean = {n: sum(r["wall_s"] for r in runs if r["run"] == n) / repeats for n in ("1 worker", "2 workers")}
    text = next(iter(recipes)).decode()
    print(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(), "recipe": recipe, "search_args": extra,
                      "runs": runs, "mean_wall_s": {n: round(v, 1) for n, v in mean.items()},
                      "two_over_one_wall": round(mean["2 workers"] / mean["1 worker"], 3),
                      "same_recipe_bytes": len(recipes) == 1,
                      "mask": next(line.strip() for line in text.splitlines() if line.startswith("  attention:"))},
                     indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
