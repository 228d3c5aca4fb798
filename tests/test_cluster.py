"""Search and sweeps on a real 2-node Ray cluster on this machine, and the sweep's pieces without one.

The cluster fixture (tests/ray_cluster.py) runs `ray start --head` and a second `ray start --address`: two
separate raylets of one CPU each, with their own temp dir, ports and auth token, stopped in the teardown. The CLI
runs as a subprocess, as a user runs it, joining through 127.0.0.1:PORT.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from exporter import cluster

from exporter.commands import sweep
from exporter.errors import UserError
from exporter.checks.verify import verify
from tests.ray_cluster import LocalCluster, free_port

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The tower is 324 metres tall , about the same height as an 81 @-@ storey building .\n"
        " = Valkyria Chronicles III = \n Senjo no Valkyria 3 is a tactical role @-@ playing video game .\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small WikiText-2 / LAMBADA folder in their files' formats (no downloads)."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "wikitext-2-raw").mkdir()
    (folder / "wikitext-2-raw" / "wiki.test.raw").write_bytes((TEXT * 12).replace("\n", "\r\n").encode())
    (folder / "lambada").mkdir()
    words = ["Paris", "him", "door", "Shane", "dreams", "backup"]
    with open(folder / "lambada" / "lambada_test.jsonl", "w") as fh:
        for i in range(80):  # calibration draws from the second half (a file under 2,000 passages)
            fh.write(json.dumps({"text": f"Passage {i} says that {'word ' * (i % 5)}the answer was {words[i % 6]}"}) + "\n")
    return folder


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray")
    cluster = LocalCluster(nodes=2, cpus=1).start()
    try:
        yield {"address": cluster.address, "env": cluster.env, "temp": cluster.temp}
    finally:
        cluster.stop()
        assert not cluster.leftover, f"Ray processes outlived the fixture: {cluster.leftover}"


def _cli(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


TINY = """\
version: 1
{name}
model:
  config: {{model_type: llama, vocab_size: 256, hidden_size: 64, intermediate_size: 96, num_hidden_layers: 4,
           num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256}}
  seed: 0
skip:
  attention: [{layer}]
validate:
  prompts: ["The capital of France is", "Hi"]
  decode_steps: 4
  speed: false
  atol: {{prefill: 1.0e-4, decode: 1.0e-4}}
"""


def _tiny(folder: Path, stem: str, layer: int, name: str | None = None) -> Path:
    path = folder / f"{stem}.yaml"
    path.write_text(TINY.format(layer=layer, name=f"name: {name}" if name else ""))
    return path


# ---------------------------------------------------------------- on the 2-node cluster

@pytest.mark.parametrize("metric", ["kl", pytest.param("lambada", marks=pytest.mark.slow)])
def test_search_on_ray_writes_the_local_recipe(ray_cluster, data, tmp_path, metric):
    """Greedy on recipes/tiny-llama.yaml (6 layers): local, then on 2 workers on 2 nodes; same bytes, same mask.
    KL keeps each actor's base residual stream; LAMBADA runs each actor's branched pass over its candidates."""
    out = tmp_path / "searched.yaml"
    calibration = (["--calibration-windows", "3", "--calibration-length", "64"] if metric == "kl"
                   else ["--metric", "lambada", "--calibration-passages", "30"])
    args = ["search", str(ROOT / "recipes" / "tiny-llama.yaml"), "--count", "3", *calibration, "--data", str(data),
            "--out", str(out)]
    local = _cli(args, ray_cluster["env"])
    assert local.returncode == 0, local.stderr[-3000:]
    expected = out.read_bytes()
    out.unlink()
    remote = _cli([*args, "--ray", ray_cluster["address"], "--workers", "2"], ray_cluster["env"])
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert "2 search worker(s) ready on 2 Ray node(s)" in remote.stderr
    assert out.read_bytes() == expected
    assert "skip:\n  attention: [" in expected.decode()


@pytest.mark.slow
def test_search_on_ray_writes_the_local_recipe_for_smollm2(ray_cluster, data, tmp_path):
    """Real SmolLM2-135M weights, a small calibration set (KL on 1 window of 64 tokens), one removal out of 29
    candidates: local and on 2 workers write the same bytes."""
    pytest.importorskip("gguf")
    out = tmp_path / "searched.yaml"
    args = ["search", str(ROOT / "recipes" / "smollm2-135m.yaml"), "--count", "1", "--calibration-windows", "1",
            "--calibration-length", "64", "--data", str(data), "--out", str(out)]
    local = _cli(args, ray_cluster["env"])
    assert local.returncode == 0, local.stderr[-3000:]
    expected = out.read_bytes()
    out.unlink()
    remote = _cli([*args, "--ray", ray_cluster["address"]], ray_cluster["env"])
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert "2 search worker(s) ready on 2 Ray node(s)" in remote.stderr
    assert out.read_bytes() == expected


@pytest.mark.slow
def test_sweep_on_ray_survives_a_bad_recipe_and_a_killed_worker(ray_cluster, tmp_path):
    """Three recipes on 2 nodes: BAD names a layer the model lacks; the worker running the first good item is
    SIGKILLed mid-run (found by its `.NAME.partial-PID` folder) and Ray reruns that item. A and B publish folders
    that verify, BAD is named with its one-line error, the exit code is 1; a rerun redoes nothing."""
    recipes = [_tiny(tmp_path, "a", 1), _tiny(tmp_path, "b", 2), _tiny(tmp_path, "bad", 99)]
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "exporter.cli", "sweep", *map(str, recipes), "--out", str(out),
           "--ray", ray_cluster["address"]]
    driver = subprocess.Popen(cmd, cwd=ROOT, env=ray_cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    killed, seen = None, {}
    deadline = time.monotonic() + 300
    while killed is None and driver.poll() is None and time.monotonic() < deadline:
        for partial in out.glob(".*.partial-*") if out.is_dir() else []:
            if time.monotonic() - seen.setdefault(partial, time.monotonic()) < 5:  # past loading: exporting
                continue
            pid = int(partial.name.rsplit("-", 1)[1])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}").exists() else b""
            assert b"ray" in cmdline, f"{partial} belongs to pid {pid}, which is not a Ray worker: {cmdline[:200]}"
            os.kill(pid, signal.SIGKILL)
            killed = (partial.name.split(".")[1], pid)
            break
        time.sleep(0.2)
    log, _ = driver.communicate(timeout=600)
    assert killed is not None, "no item was caught mid-run:\n" + log[-3000:]
    assert driver.returncode == 1, log[-3000:]
    summary = json.loads((out / "sweep.json").read_text())
    rows = {r["name"]: r for r in summary["items"]}
    assert rows["a"]["passed"] and rows["b"]["passed"], log[-3000:]
    assert rows["a"]["hashes_ok"] and rows["b"]["hashes_ok"]
    assert verify(out / "a") == [] and verify(out / "b") == []
    assert rows[killed[0]]["pid"] != killed[1]  # finished by another worker process
    assert not rows["bad"]["passed"] and "layer 99 is out of range" in rows["bad"]["error"]
    assert re.search(r"FAILED bad: .*layer 99 is out of range", log)
    assert "| bad | **no** |" in (out / "sweep.md").read_text()
    assert not list(out.glob(".*.partial-*"))

    again = _cli(["sweep", *map(str, recipes), "--out", str(out)], ray_cluster["env"])  # local rerun: nothing redone
    assert again.returncode == 1
    rows = {r["name"]: r for r in json.loads((out / "sweep.json").read_text())["items"]}
    assert rows["a"].get("reused") and rows["b"].get("reused") and not rows["bad"]["passed"]


# ---------------------------------------------------------------- without a cluster

def test_plan_names_a_bad_recipe_and_refuses_shared_names(tmp_path):
    good, bad = _tiny(tmp_path, "good", 1), _tiny(tmp_path, "bad", 99)
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nmodel: {config: {model_type: llama}}\nunknown: 1\n")
    items = sweep.plan_items([good, bad, broken], cpus=1)
    assert [i.name for i in items] == ["good", "bad", "broken"]
    assert items[0].row is None and items[0].resources.memory > 512 << 20
    assert "layer 99 is out of range" in items[1].row["error"] and not items[1].row["passed"]
    assert "unknown" in items[2].row["error"] and "\n" not in items[2].row["error"]
    with pytest.raises(UserError, match="same artifact folder: x"):
        sweep.plan_items([_tiny(tmp_path, "p", 1, name="x"), _tiny(tmp_path, "q", 2, name="x")], cpus=1)
    assert sweep.expand([str(tmp_path / "g*.yaml"), str(good)]) == [good]
    with pytest.raises(UserError, match="matches no recipe"):
        sweep.expand([str(tmp_path / "nothing-*.yaml")])


def test_a_folder_the_driver_cannot_see_or_other_code_fails_the_item(tmp_path):
    item = sweep.plan_items([_tiny(tmp_path, "a", 1)], cpus=1)[0]
    here = cluster.where_am_i()
    result = {"passed": True, "folder": str(tmp_path / "elsewhere" / "a"), "worst_parity": None, "seconds": 1.0,
              "worker": here}
    row = sweep.finish(item, result)
    assert not row["passed"] and not row["hashes_ok"] and "every node shares" in row["error"]
    row = sweep.finish(item, {**result, "worker": {**here, "code": "0" * 16, "exporter": "/elsewhere/exporter"}})
    assert not row["passed"] and "not the driver's" in row["error"]


def test_summary_rows_and_table():
    report = {"passed": False, "checks": [{"name": "c", "value": 1, "limit": "0", "passed": False}],
              "parity": [{"artifact": "onnx:fp32", "phase": "prefill", "max_abs_diff": 2e-5, "atol": 1e-4, "passed": True},
                         {"artifact": "onnx:fp32", "phase": "decode", "max_abs_diff": 5e-5, "atol": 1e-4, "passed": True}],
              "speed": {"prediction": {"decode": [{"batch": 1, "context": 128, "speedup": 1.1},
                                                  {"batch": 1, "context": 512, "speedup": 1.2}]}, "measured": None}}
    s = sweep.summarise(report)
    assert s["worst_parity"]["phase"] == "decode" and s["predicted_speedup"] == {"context": 512, "speedup": 1.2}
    assert s["error"] == "c: 1 (limit 0)" and s["measured_speedup"] is None
    row = {"name": "a", "passed": False, "error": "x | y", "worst_parity": s["worst_parity"],
           "predicted_speedup": s["predicted_speedup"], "folder": "/d/a.failed", "hashes_ok": True}
    md = sweep.render_markdown({"out": "/d", "ray": None, "cluster": None, "seconds": 3, "passed": 0, "failed": 1,
                                "items": [row]})
    assert "| a | **no** | 5.0e-05 / 1e-04 (onnx:fp32 decode) | 1.200x at 512 |  | /d/a.failed | ok | x \\| y |" in md


def test_shares_balance_the_layers_each_candidate_reruns():
    pool = [("attention", i) for i in range(8)]
    shares = cluster._balanced_shares(pool, 2, num_layers=9)
    assert sorted(c for s in shares for c in s) == pool
    cost = [sum(9 - c[1] + 1 for c in s) for s in shares]
    assert abs(cost[0] - cost[1]) <= 2
    assert cluster._balanced_shares(pool[:1], 4, 9) == [[("attention", 0)]]


def test_the_recorded_command_drops_where_it_ran():
    from exporter.commands.search import _without

    opts = {"--ray": "auto", "--workers": None, "--worker-cpus": None}
    assert _without(["r.yaml", "--ray", "--count", "2"], opts) == ["r.yaml", "--count", "2"]
    assert _without(["r.yaml", "--ray", "auto", "--workers", "2", "--count", "2"], opts) == ["r.yaml", "--count", "2"]
    assert _without(["r.yaml", "--ray=auto", "--worker-cpus=2", "--count", "2"], opts) == ["r.yaml", "--count", "2"]


def test_an_address_nobody_answers_fails_in_seconds():
    pytest.importorskip("ray")
    with pytest.raises(UserError, match="nothing answers there"):
        cluster.connect(f"127.0.0.1:{free_port()}")
    with pytest.raises(UserError, match="expected HOST:PORT"):
        cluster.connect("nonsense")


def test_local_commands_do_not_import_ray():
    code = textwrap.dedent("""
        import sys, exporter.cli, exporter.quality.search, exporter.commands.search, exporter.commands.sweep, exporter.cluster
        print('ray' in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
