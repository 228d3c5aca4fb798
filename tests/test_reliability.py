"""Reliability: bad input -> one clear line; killed runs lose nothing; reruns resume; locks; no code from data.

Each test records what it tried in RESULTS; `scripts/reliability_report.sh` runs this file and writes
the table in docs/results/reliability.md from those records (EXPORT_SKIP_RELIABILITY_REPORT).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.errors import UserError
from exporter.mask import resolve_mask
from exporter.recipe import load_recipe
from helpers import TINY_RECIPE, cli, start_cli

RESULTS: list[dict] = []

TINY = """\
# export-skip {path}
version: 1
model:
  config: {{model_type: llama, vocab_size: 128, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 3,
           num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 128}}
skip:
  attention: {attention}
validate:
  prompts: {prompts}
  decode_steps: 4
  atol: {{prefill: 1.0e-4, decode: 1.0e-4}}
  speed: false  # many runs here; the timing itself is tested in tests/test_bench.py
"""


def record(kind: str, tried: str, result: str, ok: bool) -> None:
    RESULTS.append({"kind": kind, "tried": tried, "result": result, "ok": ok})
    assert ok, f"{kind}: {tried}: {result}"


@pytest.fixture(scope="module", autouse=True)
def write_table():
    yield
    out = os.environ.get("EXPORT_SKIP_RELIABILITY_REPORT")
    if out:
        lines = ["| kind | what was tried | result | as required |", "|---|---|---|:---:|"]
        lines += [f"| {r['kind']} | {r['tried']} | {r['result']} | {'yes' if r['ok'] else 'NO'} |" for r in RESULTS]
        Path(out).write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- bad input, generated


def _values():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 50), st.floats(allow_nan=True),
                        st.text(max_size=12), st.sampled_from(["21-30", "3-1", "-2", "x-y", "1e3", "llama", "fp16"]))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=12)


KEYS = {
    "model": st.fixed_dictionaries({}, optional={
        "config": st.one_of(_values(), st.fixed_dictionaries({"model_type": st.sampled_from(["llama", "gpt2", 3])},
                                                             optional={"num_hidden_layers": st.integers(-1, 8)})),
        "hub": _values(), "path": _values(), "gguf": _values(), "dtype": _values(), "seed": _values(),
        "revision": _values()}),
    "skip": st.one_of(_values(), st.fixed_dictionaries({}, optional={
        "attention": _values(), "mlp": _values(), "attention_deepest_fraction": _values(),
        "keep_final_layer": _values()})),
    "export": _values(), "validate": _values(), "version": st.one_of(st.just(1), _values()),
    "name": _values(), "extra_key": _values(),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipe=st.fixed_dictionaries({}, optional=KEYS), layers=st.integers(1, 40))
def test_generated_recipes_load_or_fail_with_a_clear_line(tmp_path, recipe, layers):
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(recipe))
    try:
        loaded = load_recipe(path)
        resolve_mask(loaded, layers)
    except UserError as err:
        text = str(err)
        assert text and "Traceback" not in text
        assert not any(tag in text for tag in PYDANTIC_INTERNALS), text  # keys read as the user wrote them
        assert all(line.startswith(str(path)) or line.startswith("model") for line in text.splitlines()), text
        _count("recipes", "errors")
    else:
        _count("recipes", "loaded")


# what each generated-input test drew in this session: test -> {"loaded": n, "errors": n}
_GENERATED: dict[str, dict[str, int]] = {}
PYDANTIC_INTERNALS = ("function-before", "function-after", "lax-or-strict", "json-or-python", "is-instance[")


def _count(test: str, outcome: str) -> None:
    _GENERATED.setdefault(test, {"loaded": 0, "errors": 0})[outcome] += 1


def _layer_items(layers: int):
    index = st.integers(0, layers - 1)
    span = st.tuples(index, index).map(lambda ab: f"{min(ab)}-{max(ab)}")
    return st.lists(st.one_of(index, span), max_size=5)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), layers=st.integers(2, 40))
def test_generated_valid_recipes_load_with_the_mask_they_say(tmp_path, data, layers):
    attention, mlp = data.draw(_layer_items(layers)), data.draw(_layer_items(layers))
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "model": {"config": {"model_type": "llama"}},
                                    "skip": {"attention": attention, "mlp": mlp}}))
    mask = resolve_mask(load_recipe(path), layers)

    def expand(items):
        out = set()
        for item in items:
            lo, _, hi = str(item).partition("-")
            out |= set(range(int(lo), int(hi or lo) + 1))
        return sorted(out)

    assert list(mask.attention) == expand(attention) and list(mask.mlp) == expand(mlp)
    _count("valid recipes", "loaded")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_arbitrary_text_never_crashes_the_loader(tmp_path, text):
    path = tmp_path / "junk.yaml"
    path.write_text(text)
    try:
        load_recipe(path)
    except UserError as err:
        assert str(err).startswith(str(path))
        _count("texts", "errors")
    else:
        _count("texts", "loaded")


CLEAR_ERRORS = {  # kind -> (recipe text, what the one line must say); every kind the issue names
    "malformed YAML": ("version: 1\nmodel: {config: {model_type: llama}\n", "not valid YAML"),
    "wrong type": ("version: 1\nmodel: {config: {model_type: llama}}\nexport: {opset: eighteen}\n", "export.opset"),
    "unknown key": ("version: 1\nmodel: {config: {model_type: llama}}\nskip: {atention: [1]}\n", "skip.atention"),
    "impossible mask": ("version: 1\nmodel: {config: {model_type: llama, num_hidden_layers: 4}}\n"
                        "skip: {attention: [\"2-9\"]}\n", "skip.attention"),
    "empty range": ("version: 1\nmodel: {config: {model_type: llama}}\nskip: {attention: [\"3-1\"]}\n", "skip.attention"),
    "missing file": ("version: 1\nmodel: {gguf: no-such-model.gguf}\n", "no-such-model.gguf"),
    "unreachable hub": ("version: 1\nmodel: {hub: someone/not-cached-model}\n", "model: {path: DIR}"),
    "unsupported architecture": ("version: 1\nmodel: {config: {model_type: gpt2}}\n", "gpt2"),
    "backend not installed": ("version: 1\nmodel: {config: {model_type: llama, num_hidden_layers: 2}}\n"
                              "tensorrt: {backends: [tensorrt], required: true}\n", "tensorrt"),
}


@pytest.mark.parametrize("kind", list(CLEAR_ERRORS))
def test_each_kind_of_bad_input_is_one_line_exit_2(tmp_path, kind):
    text, says = CLEAR_ERRORS[kind]
    if kind == "backend not installed" and _importable("tensorrt"):
        pytest.skip("tensorrt is installed here: the missing-backend case needs a machine without it")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = cli(path, "--out", tmp_path / "art" / "bad")
    code, err = result.returncode, result.stderr
    lines = [line for line in err.splitlines() if line.startswith("error:")]  # the header may wrap; errors do not
    ok = code == 2 and len(lines) == 1 and says in lines[0] and "Traceback" not in err
    record("bad input", f"{kind}: `{text.strip().splitlines()[-1][:60]}`",
           f"exit {code}: {lines[0].replace(str(tmp_path) + '/', '')[:200]}" if ok else f"exit {code}, stderr {err[-400:]!r}", ok)
    assert not (tmp_path / "art" / "bad").exists()


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


GENERATED_TESTS = {"recipes": test_generated_recipes_load_or_fail_with_a_clear_line,
                   "valid recipes": test_generated_valid_recipes_load_with_the_mask_they_say,
                   "texts": test_arbitrary_text_never_crashes_the_loader}


def test_record_generated_inputs(tmp_path):
    """One row for the three generated-input tests. A test that has not run in this session (this one run alone,
    or picked by -k) draws its examples here first, so the row never depends on what ran before."""
    for name, test in GENERATED_TESTS.items():
        if name not in _GENERATED:
            test(tmp_path=tmp_path)
    loaded = sum(t["loaded"] for t in _GENERATED.values())
    errors = sum(t["errors"] for t in _GENERATED.values())
    record("bad input", f"{loaded + errors} generated recipes and YAML texts (hypothesis)",
           f"{loaded} loaded, {errors} clear one-line errors, 0 crashes", loaded + errors >= 400)


# ---------------------------------------------------------------- runs killed at several points


def _recipe(tmp_path: Path, attention="[1]", prompts='["The capital of France is", "Hi"]') -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(path=path, attention=attention, prompts=prompts))
    return path


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _visible(parent: Path) -> set[str]:
    return {p.name for p in parent.iterdir() if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def good_artifact(tmp_path_factory):
    base = tmp_path_factory.mktemp("kill")
    recipe = _recipe(base)
    out = base / "art" / "tiny"
    result = cli(recipe, "--out", out)
    assert result.returncode == 0, result.stderr
    return recipe, out


KILLS = [  # (signal, when, line to wait for, seconds after it); the default run tries two, -m slow all
    pytest.param("SIGINT", "while loading the model", None, 2.0, marks=pytest.mark.slow, id="SIGINT-load"),
    pytest.param("SIGTERM", "while exporting ONNX", "✓ load", 0.5, id="SIGTERM-export"),
    pytest.param("SIGKILL", "while validating parity", "✓ export", 0.2, id="SIGKILL-validate"),
    pytest.param("SIGINT", "while exporting ONNX", "✓ load", 1.0, marks=pytest.mark.slow, id="SIGINT-export"),
    pytest.param("SIGTERM", "while validating parity", "✓ export", 0.2, marks=pytest.mark.slow, id="SIGTERM-validate"),
]


@pytest.mark.parametrize("sig, when, after_line, delay", KILLS)
def test_killed_run_leaves_the_previous_artifact_untouched(good_artifact, sig, when, after_line, delay):
    recipe, out = good_artifact
    before = _snapshot(out)
    # a different mask, so the run really redoes the export and validation
    changed = recipe.with_name(f"kill-{sig}.yaml")
    changed.write_text(recipe.read_text().replace("attention: [1]", "attention: [0]"))
    proc = start_cli(changed, "--out", out, "--force")
    start = time.monotonic()
    if after_line:
        for line in proc.stderr:
            if after_line in line:
                break
    time.sleep(delay)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(getattr(signal, sig))
    proc.communicate(timeout=120)
    survived = _snapshot(out) == before
    leftovers = _visible(out.parent) - {out.name, out.name + ".failed"}
    partial = [p.name for p in out.parent.glob(f".{out.name}.partial-*")]
    clean = sig == "SIGKILL" or not partial  # SIGKILL cannot be caught: the next run removes its folder
    record("kill", f"{sig} {when} ({time.monotonic() - start:.1f} s in)",
           "previous artifact intact" if survived and not leftovers and clean else
           f"intact={survived} leftovers={leftovers} partial={partial}", survived and not leftovers and clean)


def test_rerun_after_a_kill_resumes_and_cleans_up(good_artifact):
    recipe, out = good_artifact
    resumed = recipe.with_name("resume.yaml")
    resumed.write_text(recipe.read_text().replace("attention: [1]", "attention: [2]"))
    proc = start_cli(resumed, "--out", out)
    for line in proc.stderr:
        if "✓ export" in line:
            break
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    code = cli(resumed, "--out", out).returncode
    report = json.loads((out / "report.json").read_text())
    stages = {s["name"]: s["cached"] for s in report["stages"]}
    ok = code == 0 and stages["export"] and not stages["validate"] and report["mask"]["attention"] == [2]
    leftovers = list(out.parent.glob(f".{out.name}.partial-*"))
    record("resume", "SIGKILL after the export finished, then the same command again",
           "export restored from the stage cache, validation redone, stale work folder removed"
           if ok and not leftovers else f"exit {code}, stages {stages}, leftovers {leftovers}", ok and not leftovers)


def test_changed_input_invalidates_exactly_its_stages(good_artifact):
    recipe, out = good_artifact
    cli(recipe, "--out", out)  # make sure the cache holds this recipe's stages
    code = cli(recipe, "--out", out).returncode
    r = json.loads((out / "report.json").read_text())
    same = {s["name"]: s["cached"] for s in r["stages"]}
    prompts = recipe.with_name("prompts.yaml")
    prompts.write_text(recipe.read_text().replace('"Hi"', '"Hello there"'))
    code2 = cli(prompts, "--out", out).returncode
    new_prompts = {s["name"]: s["cached"] for s in json.loads((out / "report.json").read_text())["stages"]}
    code3 = cli(prompts, "--out", out, "--force").returncode
    forced = {s["name"]: s["cached"] for s in json.loads((out / "report.json").read_text())["stages"]}
    ok = (code == code2 == code3 == 0 and same["export"] and same["validate"]
          and new_prompts["export"] and not new_prompts["validate"] and not any(forced.values()))
    record("resume", "unchanged rerun; changed validate.prompts; --force",
           f"cached: unchanged {same}, prompts changed {new_prompts}, forced {forced}", ok)


def test_engines_are_cached_by_their_graphs_and_tensorrt_section(tmp_path):
    """Changed prompts redo the checks, not the engine build; a changed tensorrt section rebuilds only engines."""
    pytest.importorskip("tensorrt_rtx", reason="extra [rtx] (tensorrt-rtx) not installed: no engine to cache")
    recipe = _recipe(tmp_path)
    recipe.write_text(recipe.read_text() + "tensorrt: {backends: [tensorrt-rtx], max_context: 64}\n")
    out = tmp_path / "art" / "tiny"

    def cached_stages(path: Path) -> dict:
        result = cli(path, "--out", out)
        assert result.returncode == 0, result.stderr
        return {s["name"]: s["cached"] for s in json.loads((out / "report.json").read_text())["stages"]}

    first = cached_stages(recipe)
    prompts = recipe.with_name("prompts.yaml")
    prompts.write_text(recipe.read_text().replace('"Hi"', '"Hello there"'))
    new_prompts = cached_stages(prompts)
    level = recipe.with_name("level.yaml")
    level.write_text(prompts.read_text().replace("max_context: 64}", "max_context: 64, optimization_level: 2}"))
    new_level = cached_stages(level)
    sidecar = json.loads((out / "engines" / "tensorrt-rtx.fp32.engine.json").read_text())
    ok = (not any(first.values()) and new_prompts["export"] and new_prompts["engines"]
          and not new_prompts["validate"] and not new_prompts["optimize"]
          and new_level["export"] and new_level["validate"] and not new_level["engines"]
          and sidecar["optimization_level"] == 2)
    record("resume", "tensorrt-rtx engine: changed validate.prompts, then changed tensorrt.optimization_level",
           f"cached: prompts changed {new_prompts}; optimization level changed {new_level}", ok)


# ---------------------------------------------------------------- concurrency


def test_same_name_is_locked_and_different_names_run_side_by_side(good_artifact, tmp_path):
    recipe, out = good_artifact
    with open(out.parent / f".{out.name}.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        locked = cli(recipe, "--out", out, "--no-wait")
        refused = locked.returncode == 2 and "another export-skip run is writing" in locked.stderr
        other = out.parent / "other"
        code_other = cli(recipe, "--out", other, "--no-wait").returncode
        waiting = start_cli(recipe, "--out", out)
        first = waiting.stderr.readline() + waiting.stderr.readline()
        time.sleep(1.0)
        still_waiting = waiting.poll() is None
    rest = waiting.communicate(timeout=600)[1]
    ok = refused and code_other == 0 and "waiting" in first + rest and still_waiting and waiting.returncode == 0
    record("concurrency", "second run on a locked name (--no-wait, then waiting); a different name meanwhile",
           "--no-wait: exit 2 with one line; waiting run proceeded after release; other name ran" if ok else
           f"refused={refused} other={code_other} waited={still_waiting} rc={waiting.returncode}", ok)


# ---------------------------------------------------------------- no code from data, disk guard


def test_pickle_only_weights_are_refused_unless_allowed(tmp_path):
    import torch

    from conftest import build_model
    from exporter.model.source import load_model
    from exporter.recipe import ModelSource

    model, _ = build_model("llama")
    folder = tmp_path / "pickled"
    model.save_pretrained(folder)
    state = {k: v for k, v in model.state_dict().items()}
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="only as pickle files") as err:
        load_model(ModelSource(path=folder))
    loaded, _ = load_model(ModelSource(path=folder, allow_pickle=True))
    ok = torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    record("no code from data", "a model folder with only pytorch_model.bin (pickle)",
           "refused with one line; loads with model.allow_pickle: true" if ok else "allow_pickle load differs",
           ok and "allow_pickle" in str(err.value))


def test_yaml_tags_that_would_run_code_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("version: 1\nmodel: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(path)
    ok = not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    record("no code from data", "a recipe with a !!python/object/apply tag", "refused as not valid YAML, nothing ran", ok)


def test_recipe_name_cannot_escape_the_artifacts_folder(tmp_path):
    path = tmp_path / "esc.yaml"
    path.write_text("version: 1\nname: ../../etc\nmodel: {config: {model_type: llama}}\n")
    with pytest.raises(UserError, match="name"):
        load_recipe(path)
    record("no code from data", "recipe name '../../etc'", "refused: names are [A-Za-z0-9._-] only", True)


def test_not_enough_disk_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil as sh

    from exporter.pipeline import run as pipeline

    recipe = load_recipe(_recipe(tmp_path))
    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=1024))
    out = tmp_path / "art" / "tiny"
    with pytest.raises(UserError, match="not enough disk space for the export"):
        pipeline.run(recipe, out)
    ok = not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))
    record("disk guard", "1 KiB free on the artifacts' file system", "refused with one line, nothing left behind", ok)


def test_a_full_disk_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """ENOSPC while writing (another job filled the disk after the disk guard looked) is the environment, not a
    bug: one line naming the file, exit 2, no traceback log."""
    import errno

    from exporter.pipeline import run as pipeline
    from exporter.cli import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.onnx.data"))

    monkeypatch.setattr(pipeline, "run", full)
    assert main([str(TINY_RECIPE), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "no space left on the device while writing" in err and "model.onnx.data" in err
    assert "internal error" not in err and "Traceback" not in err


def test_a_run_that_received_a_signal_does_not_publish(tmp_path, monkeypatch):
    """A SIGTERM/SIGINT whose KeyboardInterrupt was dropped on the way (raised inside a finaliser: Python prints
    and ignores it) is remembered, and publish() refuses: the previous artifact stays as it was."""
    import pytest

    from exporter.pipeline import workdir

    target = tmp_path / "art"
    target.mkdir()
    (target / "report.json").write_text("previous")
    monkeypatch.setattr(workdir, "_interrupted", [])
    with workdir.WorkDir(target) as work:
        (work.path / "report.json").write_text("new")
        workdir._interrupted.append(15)  # what the handler records before raising
        with pytest.raises(KeyboardInterrupt):
            work.publish()
    assert (target / "report.json").read_text() == "previous"
    assert not list(tmp_path.glob(".art.partial-*")) and not list(tmp_path.glob(".art.old-*"))
    with workdir.WorkDir(target) as work:  # no signal: the next run publishes
        workdir._interrupted.clear()
        (work.path / "report.json").write_text("new")
        work.publish()
    assert (target / "report.json").read_text() == "new"
