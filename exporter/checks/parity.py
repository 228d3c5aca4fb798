"""Compare a runner against the masked PyTorch reference: logits per phase and greedy tokens.

Both runners are fed the reference's greedy tokens (teacher forcing), so every decode step compares
logits for the same context even after a mismatch; the candidate's own argmax is compared with the
reference's at each step. Logits are compared only at real (non-padding) positions: a padding
query attends to nothing, so its logits are undefined in every implementation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from exporter.checks.reference import RecordedBatch, ReplayRunner


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


def kl_top1_sum(ref: torch.Tensor, logits: torch.Tensor, attn: torch.Tensor, chunk: int = 256) -> tuple[float, int, int]:
    """Summed KL(P_ref || P) of next-token distributions and count of equal argmaxes, at real positions
    (attn [B, T]); log-softmax in chunks of `chunk` positions bounds memory at chunk x vocab floats."""
    kl_total, agree, count = 0.0, 0, 0
    valid = attn.bool()
    for s in range(0, ref.shape[1], chunk):
        p = torch.log_softmax(ref[:, s:s + chunk].float(), dim=-1)  # [B, t, V]
        q = torch.log_softmax(logits[:, s:s + chunk].float(), dim=-1)
        kl = (p.exp() * (p - q)).sum(-1)  # [B, t]
        same = p.argmax(-1) == q.argmax(-1)
        v = valid[:, s:s + chunk]
        kl_total += float(kl[v].double().sum())
        agree += int(same[v].sum())
        count += int(v.sum())
    return kl_total, agree, count


def fit_recorded(recorded: list[RecordedBatch], candidate, steps: int, artifact: str) -> dict:
    """How close a quantized graph stays to the recorded reference (not bitwise parity): mean KL and top-1
    agreement of next-token distributions over the prompts' real positions and `steps` teacher-forced decode
    steps, and the share of the reference's greedy tokens the candidate reproduces running free (per row, the
    tokens before its first difference; a flip ends the agreement, as it changes everything after it)."""
    kl, agree, count, kept, total = 0.0, 0, 0, 0, 0
    for batch in recorded:
        ids, attn = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
        replay = ReplayRunner(batch)
        ref, cand = replay.prefill(ids, attn), candidate.prefill(ids, attn)
        sums = [kl_top1_sum(ref, cand, attn)]
        tokens = ref[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            ref, cand = replay.step(tokens), candidate.step(tokens)
            sums.append(kl_top1_sum(ref, cand, torch.ones(ref.shape[:2], dtype=torch.bool)))
            tokens = ref[:, -1].argmax(-1, keepdim=True)
        kl, agree, count = kl + sum(s[0] for s in sums), agree + sum(s[1] for s in sums), count + sum(s[2] for s in sums)
        own = greedy_tokens(candidate, ids, attn, steps)
        for row, ref_row in zip(own, batch.tokens.tolist()):
            first = next((i for i, (a, b) in enumerate(zip(row, ref_row)) if a != b), len(ref_row))
            kept, total = kept + first, total + len(ref_row)
    return {"artifact": artifact, "mean_kl": kl / count, "top1": agree / count, "greedy": kept / total,
            "positions": count, "greedy_tokens": total}
