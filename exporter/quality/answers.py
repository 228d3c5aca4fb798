"""Greedy chat answers of the full and masked models: the search's behaviour check (a mask keeps the full
model's answers to the recipe's validation prompts for their first N tokens) and its chat calibration text
(the full model's own answers to prompts from a file, packed into windows).

Prompts arrive as token ids (the driver's tokenizer applied the chat template), so a Ray worker needs no
tokenizer; `eos` ends an answer (tokens after it are not part of it).
"""

from __future__ import annotations

import torch

from exporter.backends.pytorch import TorchRunner
from exporter.mask import SkipMask
from exporter.checks.parity import greedy_tokens
from exporter.model.surgery import apply_skip


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [B, T] of token lists, shorter rows padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attn[b, width - len(row):] = 1
    return ids, attn


def cut_at_eos(tokens: list[int], eos: int | None) -> list[int]:
    """The answer up to and including its first end-of-sequence token."""
    return tokens[: tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens


def greedy_answers(model, mask: SkipMask, prompts: list[list[int]], tokens: int, pad_id: int = 0,
                   eos: int | None = None) -> list[list[int]]:
    """The masked model's first `tokens` greedy tokens after each prompt (one left-padded batch), cut at eos."""
    ids, attn = left_pad(prompts, pad_id)
    out = greedy_tokens(TorchRunner(apply_skip(model, mask)), ids, attn, tokens - 1)
    return [cut_at_eos(row, eos) for row in out]


def matching_prefix(reference: list[int], answer: list[int]) -> int:
    """How many leading tokens of `answer` equal `reference`'s (all of them when the two are equal)."""
    n = 0
    for a, b in zip(reference, answer):
        if a != b:
            break
        n += 1
    return n


class AnswerCheck:
    """The full model's greedy answers, recorded once; `measure(mask)` says how far a mask keeps them."""

    def __init__(self, model, prompts: list[list[int]], tokens: int, pad_id: int = 0, eos: int | None = None):
        self.model, self.prompts, self.tokens, self.pad_id, self.eos = model, prompts, tokens, pad_id, eos
        self.full = greedy_answers(model, SkipMask(), prompts, tokens, pad_id, eos)
        self.evaluations = 0

    @torch.no_grad()
    def measure(self, mask: SkipMask) -> dict:
        answers = greedy_answers(self.model, mask, self.prompts, self.tokens, self.pad_id, self.eos)
        self.evaluations += 1
        # an answer that ends (eos) before `tokens` counts as matched in full when it equals the full one
        matched = [self.tokens if a == f else matching_prefix(f, a) for f, a in zip(self.full, answers)]
        return {"answers_matched": min(matched), "answers_tokens": self.tokens}


@torch.no_grad()
def chat_windows(model, prompts: list[list[int]], tokens: int, length: int, pad_id: int = 0,
                 eos: int | None = None) -> list[list[int]]:
    """The full model's greedy answers to chat prompts, each after its prompt, all packed end to end and cut
    into windows of `length` tokens (a short tail is dropped): calibration text in the model's real use."""
    stream: list[int] = []
    for prompt in prompts:  # one at a time: no padding inside the packed text
        answer = greedy_answers(model, SkipMask(), [prompt], tokens, pad_id, eos)[0]
        stream += prompt + answer
    return [stream[s:s + length] for s in range(0, len(stream) - length + 1, length)]
