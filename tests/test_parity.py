"""The parity checker itself: it fails on a logit beyond atol and on a greedy mismatch, counts a near-tie without
failing, ignores left padding, and passes an identical candidate. Runners here replay hand-made logits."""

import pytest
import torch

from conftest import PROMPTS, build_model, make_mask
from exporter.backends.pytorch import TorchRunner
from exporter.checks.parity import check_parity, check_recorded
from exporter.model.prompts import left_padded
from exporter.model.surgery import apply_skip

BATCH, LENGTH, VOCAB, STEPS = 2, 4, 8, 3
ATOL = 0.01
IDS = torch.arange(BATCH * LENGTH).reshape(BATCH, LENGTH) % VOCAB
MASK = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])  # row 1 is left-padded


def reference_logits() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill [B, T, V] and STEPS decode steps [B, 1, V]: small values with one clear winner (+5) per row."""
    g = torch.Generator().manual_seed(0)
    prefill = torch.rand(BATCH, LENGTH, VOCAB, generator=g)
    prefill[0, -1, 2] += 5.0
    prefill[1, -1, 6] += 5.0
    steps = [torch.rand(BATCH, 1, VOCAB, generator=g) for _ in range(STEPS)]
    for i, step in enumerate(steps):
        step[0, 0, i] += 5.0
        step[1, 0, 7 - i] += 5.0
    return prefill, steps


class Replay:
    """A runner that returns given logits: prefill's, then one decode step's per `step` call; it keeps the
    tokens it was fed."""

    def __init__(self, prefill: torch.Tensor, steps: list[torch.Tensor]):
        self.prefill_logits, self.step_logits, self.fed = prefill, steps, []

    def prefill(self, input_ids, attention_mask):
        assert torch.equal(input_ids, IDS) and torch.equal(attention_mask, MASK)
        self.fed = []
        return self.prefill_logits.clone()

    def step(self, next_ids):
        assert next_ids.shape == (BATCH, 1)
        self.fed.append(next_ids[:, 0].tolist())
        return self.step_logits[len(self.fed) - 1].clone()


def check(prefill: torch.Tensor, steps: list[torch.Tensor], reference=None):
    """check_parity of a candidate replaying `prefill` and `steps` against the reference's logits (or the given
    `reference`: its prefill and steps); returns the prefill and decode PhaseResults and the trace."""
    reference = Replay(*(reference or reference_logits()))
    candidate = Replay(prefill, steps)
    (pre, dec), trace = check_parity(reference, candidate, IDS, MASK, STEPS, ATOL, ATOL, "fake")
    assert candidate.fed == reference.fed  # teacher forcing: both are fed the reference's greedy tokens
    return pre, dec, trace


def set_row0(steps: list[torch.Tensor], step: int, logits: dict[int, float]) -> None:
    """Decode step `step`, row 0: zero but for `logits` (token -> logit)."""
    steps[step][0, 0, :] = 0.0
    for token, value in logits.items():
        steps[step][0, 0, token] = value


def test_an_identical_candidate_passes_with_zero_difference():
    pre, dec, trace = check(*reference_logits())
    for phase in (pre, dec):
        assert phase.passed and phase.greedy_match and phase.max_abs_diff == 0.0
        assert (phase.mismatches, phase.near_ties, phase.atol, phase.artifact, phase.batch) == (0, 0, ATOL, "fake", 2)
    assert (pre.phase, pre.steps, dec.phase, dec.steps) == ("prefill", 1, "decode", STEPS)
    assert trace.tokens == [[2, 0, 1, 2], [6, 7, 6, 5]]  # the reference's greedy tokens


@pytest.mark.parametrize("row, position", [(0, 1), (1, 1), (1, LENGTH - 1)])
def test_a_prefill_logit_beyond_atol_at_a_real_position_fails(row, position):
    prefill, steps = reference_logits()
    prefill[row, position, 3] += 3 * ATOL  # not the argmax: the tokens still agree
    pre, dec, _ = check(prefill, steps)
    assert not pre.passed and pre.greedy_match and pre.mismatches == 0
    assert pre.max_abs_diff == pytest.approx(3 * ATOL, rel=1e-4) and pre.atol == ATOL
    assert dec.passed and dec.max_abs_diff == 0.0


def test_a_prefill_logit_just_within_atol_passes():
    prefill, steps = reference_logits()
    prefill[0, 1, 3] += 0.5 * ATOL
    pre, _, _ = check(prefill, steps)
    assert pre.passed and pre.max_abs_diff == pytest.approx(0.5 * ATOL, rel=1e-4)


def test_a_difference_only_at_left_padding_is_ignored():
    prefill, steps = reference_logits()
    prefill[1, 0] += 100.0  # row 1, position 0 is padding: its logits are undefined in every implementation
    pre, dec, _ = check(prefill, steps)
    assert pre.passed and pre.max_abs_diff == 0.0 and dec.passed


def test_a_decode_logit_beyond_atol_fails_the_decode_phase():
    prefill, steps = reference_logits()
    steps[1][1, 0, 0] -= 3 * ATOL
    pre, dec, _ = check(prefill, steps)
    assert pre.passed
    assert not dec.passed and dec.greedy_match and dec.max_abs_diff == pytest.approx(3 * ATOL, rel=1e-4)


def test_a_greedy_mismatch_with_a_clear_margin_fails_and_is_counted():
    prefill, steps = reference_logits()
    steps[0][0, 0, 4] += 10.0  # step 0, row 0: the candidate picks 4 where the reference's 0 leads by about 5
    steps[2][1, 0, 1] += 10.0  # step 2, row 1: 1 instead of 5
    pre, dec, trace = check(prefill, steps)
    assert pre.passed
    assert not dec.passed and not dec.greedy_match
    assert (dec.mismatches, dec.near_ties) == (2, 0)
    assert trace.tokens == [[2, 0, 1, 2], [6, 7, 6, 5]]  # the reference's tokens, whatever the candidate picks


def test_a_greedy_mismatch_in_prefill_fails_it():
    prefill, steps = reference_logits()
    prefill[1, -1, 0] += 10.0
    pre, dec, _ = check(prefill, steps)
    assert not pre.passed and not pre.greedy_match and (pre.mismatches, pre.near_ties) == (1, 0)
    assert dec.passed


def test_a_near_tie_is_counted_and_passes_within_atol():
    """The reference's top two are 0.2 atol apart; the candidate, within 0.3 atol everywhere, picks the other."""
    reference, (prefill, steps) = reference_logits(), reference_logits()
    set_row0(reference[1], 1, {1: 5.0, 3: 5.0 - 0.2 * ATOL})  # the reference: 1, by a hair
    set_row0(steps, 1, {1: 5.0 - 0.3 * ATOL, 3: 5.0})  # the candidate: 3, by a hair
    pre, dec, trace = check(prefill, steps, reference)
    assert pre.passed
    assert dec.passed and dec.greedy_match and (dec.mismatches, dec.near_ties) == (0, 1)
    assert dec.max_abs_diff == pytest.approx(0.3 * ATOL, rel=1e-3)
    assert trace.tokens[0] == [2, 0, 1, 2]  # decoding goes on with the reference's 1


def test_a_near_tie_with_logits_beyond_atol_still_fails():
    """A near-tie excuses the different token, not the difference in logits."""
    reference, (prefill, steps) = reference_logits(), reference_logits()
    set_row0(reference[1], 0, {1: 5.0, 3: 5.0 - 0.2 * ATOL})
    set_row0(steps, 0, {1: 5.0, 3: 5.0 + 2 * ATOL})  # picks 3, by more than atol
    _, dec, _ = check(prefill, steps, reference)
    assert (dec.mismatches, dec.near_ties) == (0, 1)
    assert not dec.passed and dec.max_abs_diff == pytest.approx(2.2 * ATOL, rel=1e-3)


def test_check_recorded_gives_one_row_per_phase_and_batch(tiny_models, tmp_path):
    from exporter.backends.pytorch import HFRunner
    from exporter.checks.reference import load_reference, record_batch, save_reference
    from exporter.model.surgery import masked

    model, tok = tiny_models["llama"]
    mask = make_mask("both")
    with masked(model, mask):
        recorded = [record_batch(HFRunner(model), *left_padded(tok, texts), 4) for texts in (PROMPTS[:1], PROMPTS)]
    recorded = load_reference(save_reference(recorded, tmp_path / "reference.npz"))  # as a later stage reads it
    rows = check_recorded(recorded, TorchRunner(apply_skip(model, mask)), 4, 1e-4, 1e-4, "pytorch:skipped")
    assert [(r["phase"], r["batch"]) for r in rows] == [("prefill", 1), ("decode", 1), ("prefill", 2), ("decode", 2)]
    assert all(r["passed"] and r["artifact"] == "pytorch:skipped" and r["max_abs_diff"] <= 1e-4 for r in rows), rows
    assert [r["steps"] for r in rows] == [1, 4, 1, 4]
    # the same weights with nothing skipped are not the masked reference: every phase fails
    full, _ = build_model("llama")
    unmasked = check_recorded(recorded, TorchRunner(apply_skip(full, make_mask("none"))), 4, 1e-4, 1e-4, "full")
    assert len(unmasked) == 4 and not any(r["passed"] for r in unmasked)
    assert all(r["max_abs_diff"] > 1e-4 for r in unmasked)
