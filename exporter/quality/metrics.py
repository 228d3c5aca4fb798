"""Quality cost of a skip mask: WikiText-2 perplexity, LAMBADA last-word accuracy, and, against the
unskipped model on the same tokens, the mean KL divergence of next-token distributions and top-1
agreement.

Every metric is computed from a *scorer*: `scorer(ids, attn, select=None) -> {name: logits}` with
"full" (the unskipped model) and one entry per evaluated model, so the full model's numbers sit next
to the skipped ones and come from the very same batches. `TorchScorer` runs the physically skipped
models (`surgery.apply_skip`) and shares the layers before a mask's first removed sub-layer with the
full model (they compute the same thing), which makes deep masks cheap to evaluate side by side;
`WithRunners` adds any `runners.DecodeRunner` (e.g. the exported ONNX in ONNX Runtime).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from exporter.quality import data
from exporter.quality.bootstrap import exp_ratio, paired_difference, standard_error
from exporter.mask import SkipMask
from exporter.checks.parity import kl_top1_sum
from exporter.progress import progress_bar
from exporter.model.prompts import encode_plain, pad_token_id
from exporter.model.surgery import apply_skip

FULL = "full"


class TorchScorer:
    """Logits of the full model and of each masked model (physically skipped) on the same batch."""

    backend = "pytorch"

    def __init__(self, model, masks: dict[str, SkipMask]):
        self.num_layers = model.config.num_hidden_layers
        self.full = apply_skip(model, SkipMask())
        self.masks = dict(masks)
        self.skipped = {name: apply_skip(model, mask) for name, mask in masks.items()}

    @torch.no_grad()
    def __call__(self, ids, attn, select=None) -> dict[str, torch.Tensor]:
        h, ctx = self.full.embed(ids, attn)
        trace: list[torch.Tensor] = []
        h_full, _ = self.full.run_layers(h, ctx, trace=trace)
        out = {FULL: self.full.head(h_full, select)}
        for name, skipped in self.skipped.items():
            start = self.masks[name].first_removed(self.num_layers)
            h_s = skipped.run_layers(trace[start], ctx, start=start)[0] if start < self.num_layers else h_full
            out[name] = skipped.head(h_s, select)
        return out


class WithRunners:
    """A scorer plus extra runners (e.g. `runners.OrtRunner` on an exported graph), fed the same batches."""

    def __init__(self, scorer, runners: dict):
        self.scorer, self.runners = scorer, runners

    def __call__(self, ids, attn, select=None) -> dict[str, torch.Tensor]:
        out = self.scorer(ids, attn, select)
        for name, runner in self.runners.items():
            logits = runner.prefill(ids, attn)
            out[name] = logits[select] if select is not None else logits
        return out


# ---------------------------------------------------------------- metrics

CHUNK = 256  # positions per log-softmax chunk: bounds memory at CHUNK x vocab floats per tensor


def nll_sum(logits: torch.Tensor, ids: torch.Tensor, attn: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood of each next token, over pairs where both tokens are real."""
    total, count = 0.0, 0
    valid = (attn[:, :-1] * attn[:, 1:]).bool()  # [B, T-1]
    for s in range(0, ids.shape[1] - 1, CHUNK):
        e = min(s + CHUNK, ids.shape[1] - 1)
        logp = torch.log_softmax(logits[:, s:e].float(), dim=-1)  # [B, t, V]
        nll = -logp.gather(-1, ids[:, s + 1:e + 1, None]).squeeze(-1)  # [B, t]
        total += float(nll[valid[:, s:e]].double().sum())
        count += int(valid[:, s:e].sum())
    return total, count


@dataclass
class Tally:
    nll: float = 0.0
    tokens: int = 0
    kl: float = 0.0
    agree: int = 0
    compared: int = 0
    hits: int = 0
    passages: int = 0
    windows: list = field(default_factory=list)  # per window: [nll, tokens, kl, agree, compared] (bootstrap units)
    passage_hits: list = field(default_factory=list)  # per passage: 1 hit / 0 miss

    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


def windows(ids: list[int], length: int, limit: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of `length` tokens; a trailing partial window of >= 2 tokens is kept."""
    out = [ids[s:s + length] for s in range(0, len(ids), length)]
    out = [w for w in out if len(w) >= 2]
    return out[:limit] if limit is not None else out


def score_windows(scorer, chunks: list[list[int]], tallies: dict[str, Tally], advance=None) -> None:
    for chunk in chunks:
        ids = torch.tensor(chunk, dtype=torch.long)[None]  # [1, T]
        attn = torch.ones_like(ids)
        logits = scorer(ids, attn)
        ref = logits[FULL]
        for name, lg in logits.items():
            t = tallies.setdefault(name, Tally())
            nll, n = nll_sum(lg, ids, attn)
            t.nll, t.tokens = t.nll + nll, t.tokens + n
            kl, agree, count = kl_top1_sum(ref, lg, attn) if name != FULL else (0.0, 0, 0)
            t.kl, t.agree, t.compared = t.kl + kl, t.agree + agree, t.compared + count
            t.windows.append([nll, n, kl, agree, count])
        del logits, ref
        if advance:
            advance(1)


def lambada_examples(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, target ids): the target is " word", tokenised separately so its tokens are exact."""
    return [(encode_plain(tokenizer, context), encode_plain(tokenizer, " " + target)) for context, target in pairs]


def lambada_batches(examples, token_budget: int = 4096) -> list[list[int]]:
    """Indices grouped longest first so that rows x longest row stays within `token_budget`."""
    order = sorted(range(len(examples)), key=lambda i: -(len(examples[i][0]) + len(examples[i][1])))
    batches, current, width = [], [], 0
    for i in order:
        length = len(examples[i][0]) + len(examples[i][1])
        width = max(width, length)
        if current and width * (len(current) + 1) > token_budget:
            batches.append(current)
            current, width = [], length
        current.append(i)
    if current:
        batches.append(current)
    return batches


def lambada_batch(examples, rows: list[int], pad_id: int = 0):
    """One left-padded batch of passages: ids [B, T], attn [B, T], the (row, position) pairs that predict
    target tokens, and those tokens."""
    seqs = [examples[i][0] + examples[i][1] for i in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    b_idx, t_idx, target = [], [], []
    for b, (i, seq) in enumerate(zip(rows, seqs)):
        offset = width - len(seq)
        ids[b, offset:] = torch.tensor(seq)
        attn[b, offset:] = 1
        ctx, tgt = examples[i]
        for j, token in enumerate(tgt):  # token j is predicted at the position before it
            b_idx.append(b)
            t_idx.append(offset + len(ctx) + j - 1)
            target.append(token)
    select = (torch.tensor(b_idx), torch.tensor(t_idx))
    return ids, attn, select, torch.tensor(target)


def lambada_hits(logits: torch.Tensor, target: torch.Tensor, owner: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows] bool: the argmax reproduces every target token of the passage (with the true ones fed);
    `owner` is the row of each target token (the first index of `lambada_batch`'s select)."""
    wrong = (logits.argmax(-1) != target).float()
    return torch.zeros(rows).index_add_(0, owner, wrong) == 0


def score_lambada(scorer, examples, tallies: dict[str, Tally], pad_id: int = 0, token_budget: int = 4096,
                  advance=None) -> None:
    """A hit is when the argmax reproduces every target token with the true ones fed (= greedy decoding)."""
    for rows in lambada_batches(examples, token_budget):
        ids, attn, select, target = lambada_batch(examples, rows, pad_id)
        for name, lg in scorer(ids, attn, select).items():  # lg: [N, V]
            t = tallies.setdefault(name, Tally())
            hit = lambada_hits(lg, target, select[0], len(rows))
            t.hits += int(hit.sum())
            t.passages += len(rows)
            t.passage_hits += [(i, int(h)) for i, h in zip(rows, hit)]
        if advance:
            advance(len(rows))


# ---------------------------------------------------------------- the evaluation

@dataclass
class Settings:
    data: Path
    window: int = 1024
    windows: int | None = None  # None: every window of the test split
    passages: int | None = None  # None: all 5,153
    token_budget: int = 4096  # LAMBADA batch size in tokens (rows x longest row)
    tasks: tuple[str, ...] = ("wikitext", "lambada")
    extra: dict = field(default_factory=dict)


def evaluate(scorer, tokenizer, settings: Settings, console=None) -> dict:
    """Score every model of `scorer` on the data; returns {task: {...}, model name: metrics} (JSON-ready)."""
    started = time.perf_counter()
    result: dict = {"data": str(settings.data), "window": settings.window}
    wiki: dict[str, Tally] = {}
    lamb: dict[str, Tally] = {}
    with progress_bar(console) as progress:
        if "wikitext" in settings.tasks:
            ids = encode_plain(tokenizer, data.read_wikitext(settings.data))
            chunks = windows(ids, settings.window, settings.windows)
            all_chunks = len(windows(ids, settings.window))
            task = progress.add_task(f"WikiText-2, {len(chunks)} windows of {settings.window}", total=len(chunks))
            score_windows(scorer, chunks, wiki, lambda n: progress.advance(task, n))
            result["wikitext"] = {"windows": len(chunks), "of_windows": all_chunks,
                                  "tokens_scored": wiki[FULL].tokens, "subset": len(chunks) < all_chunks}
        if "lambada" in settings.tasks:
            pairs = data.read_lambada(settings.data, settings.passages)
            examples = lambada_examples(tokenizer, pairs)
            task = progress.add_task(f"LAMBADA, {len(examples)} passages", total=len(examples))
            score_lambada(scorer, examples, lamb, pad_token_id(tokenizer), settings.token_budget,
                          lambda n: progress.advance(task, n))
            result["lambada"] = {"passages": len(examples), "subset": settings.passages is not None}
    result["models"] = {}
    result["units"] = {}
    for name in dict.fromkeys([*wiki, *lamb]):
        m: dict = {}
        units: dict = {}
        if name in wiki:
            t = wiki[name]
            m["perplexity"] = t.perplexity()
            m["perplexity_se"] = standard_error([[w[0], w[1]] for w in t.windows], exp_ratio)
            units["windows"] = t.windows
            if name != FULL:
                m["kl"] = t.kl / t.compared
                m["kl_se"] = standard_error([[w[2], w[4]] for w in t.windows])
                m["top1_agreement"] = t.agree / t.compared
                m["top1_agreement_se"] = standard_error([[w[3], w[4]] for w in t.windows])
        if name in lamb:
            hits = [h for _, h in sorted(lamb[name].passage_hits)]  # in passage order, as read
            m["lambada_accuracy"] = lamb[name].hits / lamb[name].passages
            m["lambada_accuracy_se"] = standard_error([[h, 1] for h in hits])
            units["hits"] = hits
        result["models"][name] = m
        result["units"][name] = units
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def compare(result: dict, a: str, b: str) -> dict:
    """Model a minus model b on the same windows / passages, paired bootstrap: {metric: difference, se,
    distinguishable} for KL, perplexity and LAMBADA accuracy where both were scored."""
    ua, ub = result["units"][a], result["units"][b]
    out = {}
    if "windows" in ua and "windows" in ub:
        wa, wb = ua["windows"], ub["windows"]
        out["perplexity"] = paired_difference([[w[0], w[1]] for w in wa], [[w[0], w[1]] for w in wb], exp_ratio)
        if FULL not in (a, b):
            out["kl"] = paired_difference([[w[2], w[4]] for w in wa], [[w[2], w[4]] for w in wb])
    if "hits" in ua and "hits" in ub:
        out["lambada_accuracy"] = paired_difference([[h, 1] for h in ua["hits"]], [[h, 1] for h in ub["hits"]])
    return out


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

