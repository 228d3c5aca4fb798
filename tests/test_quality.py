"""Quality metrics on tiny random models and hand-made logits: perplexity, KL / top-1, LAMBADA, eval CLI."""

import json
import math

import pytest
import torch

from exporter.quality import metrics as Q
from exporter.commands import eval as command
from exporter.quality.data import read_lambada
from exporter.mask import SkipMask
from exporter.progress import progress_bar
from exporter.model.surgery import masked
from helpers import TINY_RECIPE, cli


# ---------------------------------------------------------------- metrics on known logits

def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    vocab = 50
    scorer = lambda ids, attn, select=None: {Q.FULL: torch.zeros(*ids.shape, vocab), "same": torch.zeros(*ids.shape, vocab)}
    tallies = {}
    Q.score_windows(scorer, [list(range(30)), list(range(7))], tallies)
    assert tallies[Q.FULL].tokens == 29 + 6
    assert tallies[Q.FULL].perplexity() == pytest.approx(vocab, rel=1e-6)
    assert tallies["same"].kl == pytest.approx(0.0, abs=1e-9)
    assert tallies["same"].agree == tallies["same"].compared == 37


def test_nll_matches_cross_entropy_and_skips_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 17)
    ids = torch.randint(0, 17, (2, 9))
    attn = torch.ones_like(ids)
    attn[1, :3] = 0  # left padding: pairs touching it are not scored
    total, count = Q.nll_sum(logits, ids, attn)
    row0 = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
    row1 = torch.nn.functional.cross_entropy(logits[1, 3:-1], ids[1, 4:], reduction="sum")
    assert count == 8 + 5
    assert total == pytest.approx(float(row0 + row1), rel=1e-6)


def test_kl_and_top1_against_a_hand_computation():
    p = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]).log()
    q = torch.tensor([[[0.5, 0.25, 0.25], [0.6, 0.2, 0.2]]]).log()
    kl, agree, count = Q.kl_top1_sum(p, q, torch.ones(1, 2, dtype=torch.long))
    expected = sum(float((a * (a / b).log()).sum()) for a, b in zip(p.exp()[0], q.exp()[0]))
    assert kl == pytest.approx(expected, rel=1e-5)
    assert (agree, count) == (1, 2)  # argmax 0 vs 0, then 2 vs 0


def test_windows_are_non_overlapping_and_keep_a_partial_tail():
    assert Q.windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert Q.windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token tail predicts nothing
    assert Q.windows(list(range(10)), 4, limit=1) == [[0, 1, 2, 3]]


# ---------------------------------------------------------------- LAMBADA

def _oracle(wrong_last: bool):
    """Logits that predict each true next token (optionally not the very last one of each row)."""
    def scorer(ids, attn, select=None):
        logits = torch.zeros(*ids.shape, 300)
        logits[:, :-1].scatter_(-1, ids[:, 1:, None], 10.0)
        if wrong_last:
            logits[:, -2] = 0.0
            logits[:, -2, 299] = 10.0  # the final target token is never 299 here
        return {Q.FULL: logits[select]}
    return scorer


def test_lambada_needs_every_token_of_the_target():
    examples = [([1, 2, 3], [4, 5]), ([7, 8], [9]), ([1, 1, 1, 1, 1], [6, 6, 6])]
    for wrong_last, hits in ((False, 3), (True, 0)):
        tallies = {}
        Q.score_lambada(_oracle(wrong_last), examples, tallies, token_budget=8)
        assert (tallies[Q.FULL].hits, tallies[Q.FULL].passages) == (hits, 3)


def test_lambada_split_and_batching_do_not_change_the_result(tiny_models, data_folder):
    pairs = read_lambada(data_folder)
    assert pairs[0] == ("Passage 0 says that the answer was", "Paris")
    model, tok = tiny_models["llama"]
    examples = Q.lambada_examples(tok, pairs)
    scorer = Q.TorchScorer(model, {"attn": SkipMask(attention=(2,))})
    one, many = {}, {}
    Q.score_lambada(scorer, examples, one, token_budget=1)  # one passage a batch, no padding
    Q.score_lambada(scorer, examples, many, token_budget=10_000)  # all at once, left-padded
    for name in (Q.FULL, "attn"):
        assert (one[name].hits, one[name].passages) == (many[name].hits, many[name].passages)


# ---------------------------------------------------------------- the scorer against the HF reference

@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_torch_scorer_matches_the_masked_reference(tiny_models, arch):
    model, _ = tiny_models[arch]
    masks = {"attn": SkipMask(attention=(1, 2)), "mlp": SkipMask(mlp=(3,)), "none": SkipMask()}
    ids = torch.randint(0, 256, (2, 12))
    attn = torch.ones_like(ids)
    attn[1, :4] = 0
    out = Q.TorchScorer(model, masks)(ids, attn)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    for name, mask in {Q.FULL: SkipMask(), **masks}.items():
        with torch.no_grad(), masked(model, mask):
            ref = model(input_ids=ids, attention_mask=attn, position_ids=positions).logits
        real = attn.bool()
        assert torch.allclose(out[name][real], ref[real], atol=1e-4), name


def test_identical_model_has_zero_kl_and_full_agreement(tiny_models, data_folder):
    model, tok = tiny_models["qwen2"]
    scorer = Q.TorchScorer(model, {"same": SkipMask(), "attn": SkipMask(attention=(0, 1))})
    r = Q.evaluate(scorer, tok, Q.Settings(data=data_folder, window=64, windows=3, passages=5))
    same, full, attn = r["models"]["same"], r["models"][Q.FULL], r["models"]["attn"]
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    assert same["perplexity"] == pytest.approx(full["perplexity"], rel=1e-6)
    assert attn["kl"] > 1e-4  # removing attention changes the distributions
    assert r["wikitext"]["windows"] == 3 and r["wikitext"]["subset"] is True and r["lambada"]["passages"] == 5
    # every number has its bootstrap SE; a model against itself is never distinguishable, paired
    assert attn["kl_se"] > 0 and full["perplexity_se"] > 0 and "lambada_accuracy_se" in attn
    assert len(r["units"]["attn"]["windows"]) == 3 and len(r["units"]["attn"]["hits"]) == 5
    assert all(not d["distinguishable"] and d["difference"] == 0 for d in Q.compare(r, "same", "same").values())
    assert Q.compare(r, "attn", "same")["kl"]["difference"] == pytest.approx(attn["kl"] - same["kl"])


def test_bootstrap_se_of_an_accuracy_is_the_binomial_one_and_paired_differences_are_tighter():
    import numpy as np

    from exporter.quality.bootstrap import paired_difference, standard_error

    rng = np.random.default_rng(1)
    hits = (rng.random(1000) < 0.3).astype(float)
    p = hits.mean()
    assert standard_error([[h, 1] for h in hits]) == pytest.approx((p * (1 - p) / 1000) ** 0.5, rel=0.1)
    flipped = hits.copy()
    flipped[:10] = 1 - flipped[:10]  # two models that disagree on 10 passages of 1,000
    d = paired_difference([[h, 1] for h in flipped], [[h, 1] for h in hits])
    assert d["se"] < standard_error([[h, 1] for h in hits]) / 2  # pairing removes the shared passages' noise
    assert standard_error([[1.0, 1.0]] * 50) == 0.0
    moved = paired_difference([[h, 1] for h in np.maximum(hits, rng.random(1000) < 0.2)], [[h, 1] for h in hits])
    assert moved["difference"] > 0.1 and moved["distinguishable"]


# ---------------------------------------------------------------- data and the CLI

def test_missing_data_is_a_one_line_user_error(tmp_path, capsys):
    from exporter.cli import main

    assert main(["eval", str(TINY_RECIPE), "--data", str(tmp_path), "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "wiki.test.raw is missing" in err and "WikiText-2" in err and "Traceback" not in err


def test_eval_of_the_exported_onnx_matches_pytorch(tiny_artifact_copy, data_folder):
    """The exported graph in ONNX Runtime scores like the PyTorch skipped model; results land in both files."""
    from exporter.recipe import load_recipe

    recipe, art = load_recipe(TINY_RECIPE), tiny_artifact_copy
    settings = Q.Settings(data=data_folder, window=128, windows=2, passages=6)
    result, path = command.run_eval(recipe, settings, artifact=art)
    assert path == art / "eval.json" and json.loads(path.read_text())["models"] == result["models"]
    assert result["mask"] == {"attention": [3, 4], "mlp": [4], "blocks": [4]}
    models = result["models"]
    assert set(models) == {"full", "skipped", "onnx"}
    assert models["onnx"]["perplexity"] == pytest.approx(models["skipped"]["perplexity"], rel=1e-4)
    assert models["onnx"]["lambada_accuracy"] == models["skipped"]["lambada_accuracy"]
    assert result["onnx_vs_pytorch"]["passed"] is True
    assert math.isfinite(models["full"]["perplexity"]) and models["skipped"]["kl"] > 0
    assert json.loads((art / "report.json").read_text())["quality"]["models"] == models


def test_eval_of_a_published_folder_keeps_its_manifest_valid(tiny_artifact_copy, data_folder):
    """Regression: eval rewrote report.json and added eval.json without recording them, so
    `export-skip verify` failed on every folder that had been evaluated."""
    from exporter.checks.verify import verify
    from exporter.recipe import load_recipe

    art = tiny_artifact_copy  # a published folder, as the pipeline wrote it
    assert verify(art) == []
    command.run_eval(load_recipe(TINY_RECIPE), Q.Settings(data=data_folder, window=128, windows=1, passages=2), artifact=art)
    assert verify(art) == []
    files = {f["path"] for f in json.loads((art / "manifest.json").read_text())["files"]}
    assert {"eval.json", "report.json"} <= files


def test_artifact_with_another_mask_is_refused(tiny_artifact_copy, data_folder, capsys):
    from exporter.cli import main

    art = tiny_artifact_copy
    report = json.loads((art / "report.json").read_text())
    (art / "report.json").write_text(json.dumps({**report, "mask": {"attention": [1], "mlp": []}}))
    rc = main(["eval", str(TINY_RECIPE), "--artifact", str(art), "--data", str(data_folder), "--limit", "1"])
    assert rc == 2 and "exported with mask" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_cli_end_to_end_after_the_pipeline(tmp_path, data_folder):
    art = tmp_path / "tiny"
    assert cli(TINY_RECIPE, "--out", art).returncode == 0
    r = cli("eval", TINY_RECIPE, "--artifact", art, "--windows", "2", "--passages", "6", "--window", "128",
            env={"EXPORT_SKIP_DATA": str(data_folder)})
    assert r.returncode == 0, r.stderr
    assert "ONNX vs PyTorch perplexity" in r.stderr
    assert json.loads((art / "report.json").read_text())["quality"]["onnx_vs_pytorch"]["passed"] is True


def test_progress_in_a_log_prints_plain_lines(capsys):
    """Without a terminal (nohup, CI) the bar is replaced by lines: the first at once, then the final count."""
    import io

    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=False)
    with progress_bar(console) as progress:
        task = progress.add_task("LAMBADA, 7 passages", total=7)
        for _ in range(7):
            progress.advance(task, 1)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("LAMBADA, 7 passages: 1/7 (") and lines[-1].startswith("LAMBADA, 7 passages: 7/7 (")
    assert len(lines) == 2  # the 30 s interval holds back the five in between
    with progress_bar(None) as progress:  # no console: nothing anywhere
        progress.advance(progress.add_task("x", total=1), 1)
    assert capsys.readouterr() == ("", "")


def test_progress_in_a_log_also_prints_when_advanced_through_update():
    """search advances its bar with update(advance=..., description=...): that must log too."""
    import io

    from rich.console import Console

    out = io.StringIO()
    with progress_bar(Console(file=out, force_terminal=False)) as progress:
        task = progress.add_task("search", total=3)
        progress.update(task, advance=1, description="search, best kl 0.1")
    assert out.getvalue().splitlines()[0].startswith("search, best kl 0.1: 1/3 (")
