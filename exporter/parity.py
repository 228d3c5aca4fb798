"""Compare a runner against the masked PyTorch reference: logits per phase and greedy tokens.

Both runners are fed the reference's greedy tokens (teacher forcing), so every decode step compares
logits for the same context even after a mismatch; the candidate's own argmax is compared with the
reference's at each step. Logits are compared only at real (non-padding) positions: a padding
query attends to nothing, so its logits are undefined in every implementation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from exporter.reference import RecordedBatch, ReplayRunner


@dataclass
class PhaseResult:
    artifact: str
    phase: str  # "prefill" or "decode"
    batch: int
    max_abs_diff: float
    atol: float
    greedy_match: bool
    passed: bool
    steps: int = 1
    mismatches: int = 0
    near_ties: int = 0  # mismatches where the reference's top-2 logits differ by <= atol

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Trace:
    """The reference's greedy continuation, per batch row (for the report)."""

    tokens: list[list[int]] = field(default_factory=list)


def _compare_tokens(ref_logits: torch.Tensor, cand_logits: torch.Tensor, atol: float):
    """(mismatches, near_ties) between argmaxes of [B, V] logits."""
    ref_tok, cand_tok = ref_logits.argmax(-1), cand_logits.argmax(-1)
    differ = ref_tok != cand_tok
    if not differ.any():
        return 0, 0
    rows = differ.nonzero().flatten()
    margin = ref_logits[rows, ref_tok[rows]] - ref_logits[rows, cand_tok[rows]]
    ties = int((margin <= atol).sum())
    return int(differ.sum()) - ties, ties


def check_parity(reference, candidate, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int,
                 atol_prefill: float, atol_decode: float, artifact: str) -> tuple[list[PhaseResult], Trace]:
    """Prefill then `steps` greedy decode steps on both runners; one PhaseResult per phase."""
    batch = input_ids.shape[0]
    valid = attention_mask.bool()
    ref = reference.prefill(input_ids, attention_mask)
    cand = candidate.prefill(input_ids, attention_mask)
    prefill_diff = float((ref - cand).abs()[valid].max())
    mism, ties = _compare_tokens(ref[:, -1], cand[:, -1], atol_prefill)
    prefill = PhaseResult(artifact, "prefill", batch, prefill_diff, atol_prefill, mism == 0,
                          passed=mism == 0 and prefill_diff <= atol_prefill, mismatches=mism, near_ties=ties)

    tokens = ref[:, -1].argmax(-1, keepdim=True)  # [B, 1]
    trace = Trace(tokens=[[int(t)] for t in tokens[:, 0]])
    decode_diff, decode_mism, decode_ties = 0.0, 0, 0
    for _ in range(steps):
        ref = reference.step(tokens)
        cand = candidate.step(tokens)
        decode_diff = max(decode_diff, float((ref - cand).abs().max()))
        mism, ties = _compare_tokens(ref[:, -1], cand[:, -1], atol_decode)
        decode_mism, decode_ties = decode_mism + mism, decode_ties + ties
        tokens = ref[:, -1].argmax(-1, keepdim=True)
        for b in range(batch):
            trace.tokens[b].append(int(tokens[b, 0]))
    decode = PhaseResult(artifact, "decode", batch, decode_diff, atol_decode, decode_mism == 0,
                         passed=decode_mism == 0 and decode_diff <= atol_decode, steps=steps,
                         mismatches=decode_mism, near_ties=decode_ties)
    return [prefill, decode], trace


def greedy_tokens(runner, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int) -> list[list[int]]:
    """A runner's own greedy continuation (prefill's next token plus `steps` more)."""
    logits = runner.prefill(input_ids, attention_mask)
    tokens = logits[:, -1].argmax(-1, keepdim=True)
    out = [[int(t)] for t in tokens[:, 0]]
    for _ in range(steps):
        tokens = runner.step(tokens)[:, -1].argmax(-1, keepdim=True)
        for b, t in enumerate(tokens[:, 0]):
            out[b].append(int(t))
    return out


def check_recorded(recorded: list[RecordedBatch], candidate, steps: int, atol_prefill: float, atol_decode: float,
                   artifact: str) -> list[dict]:
    """`check_parity` of `candidate` on each recorded validation batch against the recorded masked reference;
    one report row per phase and batch."""
    rows = []
    for batch in recorded:
        ids, attn = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
        phases, _ = check_parity(ReplayRunner(batch), candidate, ids, attn, steps, atol_prefill, atol_decode, artifact)
        rows += [p.as_dict() for p in phases]
    return rows
