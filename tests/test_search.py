"""Importance scores and mask search on tiny random models: budgets hold, runs repeat, the recipe exports."""

import pytest
import torch

from conftest import build_model
from exporter.quality import calibration as C
from exporter.quality import search as S
from exporter.commands import search as command
from exporter.quality import strategies as St
from exporter.errors import UserError
from exporter.quality.importance import calibration_windows, measure_importance
from exporter.mask import SkipMask
from exporter.model.surgery import apply_skip
from helpers import TINY_RECIPE


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["llama"]


def settings(folder, **kw):
    base = dict(budget=S.Budget(count=2), data=folder, windows=3, length=48, seed=0)
    return S.SearchSettings(**{**base, **kw})


def test_candidates_masks_and_budgets():
    assert C.candidates("attention", 4, keep_final_layer=True) == [("attention", 0), ("attention", 1), ("attention", 2)]
    assert len(C.candidates("any", 4, keep_final_layer=False)) == 8
    assert C.mask_of([("attention", 2), ("block", 1), ("mlp", 3)]) == SkipMask(attention=(1, 2), mlp=(1, 3))
    for bad in (dict(), dict(count=0), dict(match_tokens=0), dict(max_kl=-1.0)):
        with pytest.raises(UserError):
            S.Budget(**bad)
    assert S.Budget(max_ppl_increase=5).allows({"ppl_increase_pct": 4.9}) and not S.Budget(max_kl=0.1).allows({"kl": 0.2})
    both = S.Budget(max_kl=0.1, max_lambada_drop=2, match_tokens=5, count=2)  # any combination
    assert both.checks == {"lambada", "answers"}
    assert both.violated({"kl": 0.05}) == []  # LAMBADA and answers not measured yet: nothing broken yet
    assert both.violated({"kl": 0.2, "answers_matched": 4}) == ["--max-kl", "--match-tokens"]
    assert both.allows({"kl": 0.1, "lambada_drop": 2.0, "answers_matched": 5})
    with pytest.raises(KeyError):  # accepting a mask whose lazy checks never ran is a bug, not a pass
        both.allows({"kl": 0.05})
    assert "2 candidates removed" in both.describe() and "for 5 tokens" in both.describe()


def test_calibration_windows_are_seeded(llama, data_folder):
    _, tok = llama
    a = calibration_windows(tok, data_folder, 3, 48, seed=0)
    assert a == calibration_windows(tok, data_folder, 3, 48, seed=0)
    assert a != calibration_windows(tok, data_folder, 3, 48, seed=1)
    assert all(len(w) == 48 for w in a)
    with pytest.raises(UserError):
        calibration_windows(tok, data_folder, 10_000, 48, seed=0)


def test_importance_finds_a_sub_layer_that_does_nothing(data_folder):
    """Zero a sub-layer's output projection: its LLM-Drop cosine is 1 and it ranks first; a dead block has BI 0."""
    model, tok = build_model("llama", seed=3)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].self_attn.o_proj.bias.zero_() if model.model.layers[1].self_attn.o_proj.bias is not None else None
        model.model.layers[1].mlp.down_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.bias.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.bias.zero_()
    chunks = calibration_windows(tok, data_folder, 2, 40, seed=0)
    imp = measure_importance(apply_skip(model, SkipMask()), chunks)
    assert imp.attention_cosine[1] == pytest.approx(1.0, abs=1e-9)
    assert max(imp.attention_cosine[i] for i in (0, 2, 3)) < 1 - 1e-4
    assert imp.mlp_cosine[1] == pytest.approx(1.0, abs=1e-9) and imp.mlp_cosine[2] == pytest.approx(1.0, abs=1e-9)
    assert imp.block_influence[1] == pytest.approx(0.0, abs=1e-9) and min(imp.block_influence[i] for i in (0, 2, 3)) > 1e-4
    assert imp.best_run(1) == 1 and imp.angular_distance[1][1] == pytest.approx(0.0, abs=1e-6)
    pool = C.candidates("attention", 4, True)
    assert sorted(pool, key=lambda c: imp.importance(*c))[0] == ("attention", 1)


def test_calibrator_reuses_the_residual_stream_exactly(llama, data_folder):
    model, tok = llama
    cal = C.Calibrator(model, calibration_windows(tok, data_folder, 2, 48, seed=0))
    base = SkipMask(attention=(1,))
    cal.measure(base, keep_trace=True)
    fresh = cal.measure(SkipMask(attention=(1, 2)))
    reused = cal.measure(SkipMask(attention=(1, 2)), base)
    assert reused == pytest.approx(fresh, rel=1e-6, abs=1e-9)
    assert cal.measure(SkipMask())["kl"] == pytest.approx(0.0, abs=1e-6)


def test_greedy_respects_a_kl_budget_and_repeats(llama, data_folder):
    """0.009 sits between this model's single-removal KLs (0.007-0.014): greedy removes some, not all."""
    model, tok = llama
    limit = 0.009
    first = S.search(model, tok, settings(data_folder, budget=S.Budget(max_kl=limit)))
    again = S.search(model, tok, settings(data_folder, budget=S.Budget(max_kl=limit)))
    assert first["mask"] == again["mask"] and first["steps"] == again["steps"]
    assert first["chosen"], "the budget admits at least one removal"
    assert first["final"]["kl"] <= limit and all(step["kl"] <= limit for step in first["steps"])
    # it stopped because the budget binds: every further removal would break it
    cal = C.Calibrator(model, calibration_windows(tok, data_folder, 3, 48, seed=0))
    rest = [c for c in C.candidates("attention", 4, True) if c not in first["chosen"]]
    assert rest and all(cal.measure(C.mask_of(first["chosen"] + [c]))["kl"] > limit for c in rest)


@pytest.mark.parametrize("budget", [S.Budget(count=2), S.Budget(max_kl=0.013), S.Budget(max_kl=0.0145)])
def test_oneshot_takes_the_longest_importance_prefix_within_budget(llama, data_folder, budget):
    model, tok = llama
    result = S.search(model, tok, settings(data_folder, strategy="oneshot", budget=budget))
    chunks = calibration_windows(tok, data_folder, 3, 48, seed=0)
    imp = measure_importance(apply_skip(model, SkipMask()), chunks)
    order = sorted(C.candidates("attention", 4, True), key=lambda c: (imp.importance(*c), c[1]))
    cal = C.Calibrator(model, chunks)
    expected = []
    for cand in order[: budget.count or len(order)]:
        if not budget.allows(cal.measure(C.mask_of(expected + [cand]))):
            break
        expected.append(cand)
    assert result["chosen"] == expected
    assert result == S.search(model, tok, settings(data_folder, strategy="oneshot", budget=budget)) | {"seconds": result["seconds"]}


def test_greedy_picks_the_least_harmful_candidate_first(llama, data_folder):
    model, tok = llama
    result = S.search(model, tok, settings(data_folder, budget=S.Budget(count=1), kind="any"))
    cal = C.Calibrator(model, calibration_windows(tok, data_folder, 3, 48, seed=0))
    kls = {c: cal.measure(C.mask_of([c]))["kl"] for c in C.candidates("any", 4, True)}
    assert result["chosen"] == [min(kls, key=kls.get)]
    assert len(result["mask"].attention) + len(result["mask"].mlp) == 1


def test_emitted_recipe_loads_and_exports(tmp_path, data_folder):
    from exporter.model.source import load_model
    from exporter.onnx.contract import onnx_signature
    from exporter.onnx.export import export_onnx
    from exporter.mask import resolve_mask
    from exporter.recipe import load_recipe

    source = TINY_RECIPE
    out = tmp_path / "sub" / "found.yaml"
    recipe = load_recipe(source)
    result = command.run_search(recipe, source, settings(data_folder, budget=S.Budget(count=2), kind="block"), out)
    text = out.read_text()
    assert text.startswith(f"# export-skip {out}") and "Predicted decode speedup" in text
    found = load_recipe(out)
    model, _ = load_model(found.model)
    mask = resolve_mask(found, model.config.num_hidden_layers)
    assert mask == result["mask"] and len(mask.blocks) == 2
    path = export_onnx(apply_skip(model, mask), tmp_path / "onnx", opset=found.export.opset)
    pasts = {n.split(".")[1] for n in onnx_signature(path)["inputs"] if n.startswith("past_key_values.")}
    assert pasts == {str(i) for i in range(6) if i not in mask.attention}


def test_relative_model_paths_follow_the_emitted_recipe(tmp_path, data_folder, llama):
    """A recipe with a relative model path still points at the same folder from wherever the result goes."""
    import yaml

    model, _ = llama
    folder = tmp_path / "models" / "tiny"
    model.save_pretrained(folder)
    src = tmp_path / "recipes" / "r.yaml"
    src.parent.mkdir()
    src.write_text(yaml.safe_dump({"version": 1, "model": {"path": "../models/tiny"}}))
    out = tmp_path / "elsewhere" / "deep" / "r-searched.yaml"
    from exporter.recipe import load_recipe

    result = {"mask": SkipMask(attention=(1,)), "steps": [], "calibration": {"metric": "kl", "windows": 1, "length": 2, "seed": 0, "data": "x"},
              "final": {"kl": 0.0, "ppl": 1.0, "ppl_full": 1.0, "ppl_increase_pct": 0.0, "top1_agreement": 1.0}}
    command.write_recipe(src, out, result, settings(data_folder), model.config, ["search", str(src)])
    assert load_recipe(out).model.path == folder.resolve()


# ---------------------------------------------------------------- LAMBADA calibration (conftest's data: 30 passages)

def test_calibration_passages_are_seeded_and_held_out(llama, data_folder):
    from exporter.quality.data import read_lambada
    from exporter.quality.metrics import lambada_examples

    _, tok = llama
    a, start = C.calibration_passages(tok, data_folder, 8, seed=0)
    assert start == 15 and C.calibration_passages(tok, data_folder, 8, seed=0) == (a, 15)
    assert C.calibration_passages(tok, data_folder, 8, seed=1)[0] != a
    pairs = read_lambada(data_folder)
    first_half = lambada_examples(tok, pairs[:15])  # a 30-passage file: drawn from its second half only
    second_half = lambada_examples(tok, pairs[15:])
    assert all(e in second_half for e in a) and not any(e in first_half for e in a)
    with pytest.raises(UserError, match="cannot draw 16 LAMBADA passages"):
        C.calibration_passages(tok, data_folder, 16, seed=0)


def test_lambada_calibrator_branches_equal_separate_runs(data_folder):
    """Every candidate scored in one branched pass == that mask scored on its own, and == `eval`'s hit count."""
    from exporter.quality.metrics import FULL, TorchScorer, score_lambada

    model, tok = build_model("llama", seed=1)
    examples, _ = C.calibration_passages(tok, data_folder, 12, seed=0)
    cal = C.LambadaCalibrator(model, examples, token_budget=64)  # several left-padded batches
    assert cal.full["lambada_drop"] == 0.0 and cal.full["lambada_nll"] > 0
    chosen = [("attention", 1)]
    pool = [c for c in C.candidates("any", 4, keep_final_layer=False) if c not in chosen]
    trials = cal.trials(chosen, pool)
    masks = {c: C.mask_of(chosen + [c]) for c in pool}
    for cand, mask in masks.items():
        alone = cal.measure(mask)
        assert trials[cand]["lambada_nll"] == pytest.approx(alone["lambada_nll"], rel=1e-5)
        assert trials[cand]["lambada_accuracy"] == alone["lambada_accuracy"]
    tallies = {}
    score_lambada(TorchScorer(model, {str(c): m for c, m in masks.items()}), examples, tallies, token_budget=64)
    for cand in pool:
        assert trials[cand]["lambada_accuracy"] == tallies[str(cand)].hits / 12
    assert cal.full["lambada_accuracy"] == tallies[FULL].hits / 12


class _Scripted:
    """A calibrator whose metrics are given per mask: greedy's choices can be checked exactly."""

    def __init__(self, nll: dict, drop: dict):
        self.nll, self.drop, self.evaluations = nll, drop, 0

    def trials(self, chosen, pool, advance=None):
        return {c: {"lambada_nll": self.nll[c] + len(chosen), "lambada_drop": self.drop[c] * (len(chosen) + 1)}
                for c in pool}


def test_greedy_on_lambada_ranks_by_nll_and_takes_the_best_feasible():
    pool = [("attention", i) for i in range(5)]
    nll = {("attention", 0): 3.0, ("attention", 1): 1.0, ("attention", 2): 2.0, ("attention", 3): 1.0, ("attention", 4): 5.0}
    drop = {("attention", 0): 0.2, ("attention", 1): 0.5, ("attention", 2): 0.8, ("attention", 3): 0.1, ("attention", 4): 0.0}
    budget = S.Budget(max_lambada_drop=1.0)
    chosen, steps = S.greedy(_Scripted(nll, drop), list(pool), budget, S.RANK_BY["lambada"])
    # step 1: NLL tie between layers 1 and 3 -> lower layer (1), drop 0.5; step 2: layer 3 (NLL 2), drop 0.2;
    # step 3: layer 2 (NLL 4) would drop 2.4 > 1.0, the next by NLL, layer 0 (NLL 5, drop 0.6), fits;
    # step 4: layer 2 (drop 3.2) fails, layer 4 (drop 0) fits; then layer 2 alone is left and fails
    assert chosen == [("attention", 1), ("attention", 3), ("attention", 0), ("attention", 4)]
    assert [s["lambada_drop"] for s in steps] == pytest.approx([0.5, 0.2, 0.6, 0.0])


def test_kl_metric_with_a_lambada_constraint_builds_both_calibrators(llama, data_folder):
    """KL is minimised; LAMBADA is measured only as a lazy check (a second calibrator on the worker)."""
    model, tok = llama
    st = S.SearchSettings(budget=S.Budget(max_lambada_drop=2, count=1), data=data_folder, windows=2, length=40,
                          passages=8)
    inputs, described = S.calibration_inputs(tok, st)
    assert st.metric == "kl" and inputs["checks"] == ["lambada"] and "after the first 15" in described["lambada"]
    worker = C.CalibrationWorker(model, inputs)
    assert isinstance(worker.cal, C.Calibrator) and isinstance(worker.checks["lambada"], C.LambadaCalibrator)
    metrics, _ = worker.check(SkipMask(attention=(1,)))
    assert metrics == worker.checks["lambada"].measure(SkipMask(attention=(1,)))


def test_search_cli_with_a_lambada_budget_writes_a_recipe(tmp_path, data_folder):
    from exporter.cli import main
    from exporter.mask import resolve_mask
    from exporter.recipe import load_recipe

    out = tmp_path / "found.yaml"
    argv = ["search", str(TINY_RECIPE), "--max-lambada-drop", "5",
            "--calibration-passages", "10", "--data", str(data_folder), "--calibration-windows", "2",
            "--calibration-length", "40", "--out", str(out)]
    assert main(argv) == 0
    text = out.read_text()
    assert "minimises kl subject to: LAMBADA accuracy drop <= 5 points." in text
    # a 30-passage file: drawn from its second half, and the comment says so
    assert "; 10 LAMBADA test passages after the first 15." in text
    steps = [line for line in text.splitlines() if line.startswith("#   attention ") and ": KL " in line]
    assert steps and all("final-word NLL" in line for line in steps)
    mask = resolve_mask(load_recipe(out), 6)
    assert mask.attention and not mask.mlp
    assert main(["search", str(TINY_RECIPE), "--data", str(data_folder), "--out", str(tmp_path / "x.yaml")]) == 2  # no budget
    assert main([*argv[:-1], str(tmp_path / "y.yaml"), "--calibration-prompts", str(tmp_path / "missing.txt")]) == 2
    assert not (tmp_path / "x.yaml").exists() and not (tmp_path / "y.yaml").exists()


# ---------------------------------------------------------------- local search, lazy checks, answers, held-out split

class _Table:
    """A calibrator over a table of KL per set of layers (attention candidates), counting what it measures."""

    def __init__(self, kl: dict, bad: set = frozenset()):
        self.kl, self.bad, self.evaluations, self.checked = kl, bad, 0, []

    def _m(self, chosen):
        self.evaluations += 1
        return {"kl": self.kl[frozenset(i for _, i in chosen)]}

    def trials(self, chosen, pool, advance=None):
        return {c: self._m(chosen + [c]) for c in pool}

    def measure(self, mask):
        return self._m([("attention", i) for i in mask.attention])

    def check(self, mask):
        self.checked.append(mask.attention)
        return {"answers_matched": 0 if frozenset(mask.attention) in self.bad else 9, "answers_tokens": 9}


class _Scores:
    """One-shot rankings: LLM-Drop cosine prefers layer 3 then 2, Block Influence layer 0 then 1."""

    block_influence = [0.1, 0.2, 0.3, 0.4]

    def importance(self, kind, layer):
        return {3: 0.01, 2: 0.02, 1: 0.03, 0: 0.04}[layer]


# greedy takes 0 (the best single) and is then stuck with pairs of 0 (KL 10); the best pair is {1, 2}
PAIRS = {frozenset({0}): 1.0, frozenset({1}): 2.0, frozenset({2}): 2.0, frozenset({3}): 3.0,
         frozenset({0, 1}): 10.0, frozenset({0, 2}): 10.0, frozenset({0, 3}): 10.0,
         frozenset({1, 2}): 3.0, frozenset({1, 3}): 9.0, frozenset({2, 3}): 9.0}


def test_local_swaps_escape_the_greedy_trap_and_repeat():
    pool = C.candidates("attention", 5, keep_final_layer=True)
    greedy_chosen, _ = St.greedy(_Table(PAIRS), list(pool), S.Budget(count=2), "kl")
    assert sorted(greedy_chosen) == [("attention", 0), ("attention", 1)]  # 10.0
    chosen, record = St.local(_Table(PAIRS), list(pool), S.Budget(count=2), "kl", _Scores())
    assert chosen == [("attention", 1), ("attention", 2)]  # 3.0: the optimum
    assert [s["seed"] for s in record["seeds"]] == ["greedy", "LLM-Drop cosine", "Block Influence", "deepest"][:len(record["seeds"])]
    assert record["seeds"][0]["swaps"][0]["kl"] < 10.0
    again = St.local(_Table(PAIRS), list(pool), S.Budget(count=2), "kl", _Scores())
    assert (chosen, record) == again


def test_budget_evals_stops_the_search_with_the_best_so_far():
    pool = C.candidates("attention", 5, keep_final_layer=True)
    cal = _Table(PAIRS)
    scorer = St.Scorer(cal, S.Budget(count=2), "kl", max_evals=7)
    chosen, _ = St.local(cal, list(pool), S.Budget(count=2), "kl", _Scores(), scorer=scorer)
    assert scorer.stopped and cal.evaluations <= 7 + len(pool)  # stops at the first check after the cap
    assert len(chosen) == 2  # greedy's mask, not improved


def test_lazy_checks_run_only_on_masks_about_to_be_accepted():
    """The answers check rejects {1, 2}: the search must settle for the best pair that keeps the answers, and
    check only masks that would otherwise be taken."""
    pool = C.candidates("attention", 5, keep_final_layer=True)
    cal = _Table(PAIRS, bad={frozenset({1, 2})})
    budget = S.Budget(count=2, match_tokens=9)
    chosen, _ = St.local(cal, list(pool), budget, "kl", _Scores())
    assert chosen not in ([("attention", 1), ("attention", 2)],)
    assert C.mask_of(chosen).attention in cal.checked and (1, 2) in cal.checked
    assert len(cal.checked) == len(set(cal.checked)) < 10  # each mask checked once, far fewer than measured


def test_fast_kl_equals_the_evaluation_kl(llama, data_folder):
    """Calibrator's KL (P . logits - logsumexp) against quality.kl_top1_sum (log-softmax both) on the same windows."""
    from exporter.quality.metrics import FULL, TorchScorer, kl_top1_sum

    model, tok = llama
    chunks = calibration_windows(tok, data_folder, 2, 48, seed=0)
    mask = SkipMask(attention=(1, 2))
    got = C.Calibrator(model, chunks).measure(mask)
    ids = torch.tensor(chunks)
    logits = TorchScorer(model, {"m": mask})(ids, torch.ones_like(ids))
    kl, agree, count = kl_top1_sum(logits[FULL], logits["m"], torch.ones_like(ids))
    assert got["kl"] == pytest.approx(kl / count, rel=1e-4) and got["top1_agreement"] == pytest.approx(agree / count)


def test_calibration_windows_come_from_the_second_half(llama, data_folder):
    from exporter.quality.data import read_wikitext
    from exporter.quality.heldout import check_held_out
    from exporter.quality.importance import held_out_tokens
    from exporter.model.prompts import encode_plain

    _, tok = llama
    ids = encode_plain(tok, read_wikitext(data_folder))
    half = held_out_tokens(len(ids))
    second = ids[half:]
    for w in calibration_windows(tok, data_folder, 5, 20, seed=3):
        assert any(second[s:s + 20] == w for s in range(0, len(second) - 19, 20))
    check_held_out(tok, data_folder, half // 40, 40, 1000)
    with pytest.raises(UserError, match="first half"):
        check_held_out(tok, data_folder, half // 40 + 1, 40, 0)
    with pytest.raises(UserError, match="at most 1,000"):
        check_held_out(tok, data_folder, 0, 40, 1001)


def test_answer_check_sees_a_mask_that_changes_the_answers(llama):
    from exporter.quality.answers import AnswerCheck, chat_windows, matching_prefix
    from exporter.model.prompts import encode

    model, tok = llama
    prompts = [encode(tok, p) for p in ("The capital of France is", "Hi")]
    check = AnswerCheck(model, prompts, 8)
    assert check.measure(SkipMask()) == {"answers_matched": 8, "answers_tokens": 8}
    changed = [check.measure(SkipMask(attention=(i,), mlp=(i,)))["answers_matched"] for i in range(4)]
    assert min(changed) < 8  # removing a whole block of a random model changes some greedy answer
    assert matching_prefix([1, 2, 3], [1, 2, 4]) == 2 and matching_prefix([1, 2], [1, 2]) == 2
    windows = chat_windows(model, prompts, 6, 10)
    stream = prompts[0] + check.full[0][:6] + prompts[1] + check.full[1][:6]
    assert windows == [stream[s:s + 10] for s in range(0, len(stream) - 9, 10)]


def test_search_with_chat_prompts_and_answers_writes_its_evidence(tmp_path, data_folder):
    from exporter.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is red?\n\nName a city.\n")
    out = tmp_path / "found.yaml"
    assert main(["search", str(TINY_RECIPE), "--max-kl", "0.5", "--calibration-prompts",
                 str(prompts), "--calibration-answer-tokens", "30", "--data", str(data_folder),
                 "--calibration-windows", "2", "--calibration-length", "40", "--held-out-windows", "2",
                 "--held-out-window", "40", "--out", str(out)]) == 0
    text = out.read_text()
    assert "answers (30 tokens at most) to 2 prompts of" in text
    assert "Swaps from greedy" in text and "Same size, LLM-Drop cosine" in text
    assert "# Held out (first 2 WikiText-2 windows of 40 tokens;" in text
    assert "vs searched: perplexity" in text and ("not distinguishable" in text or "differs" in text)
