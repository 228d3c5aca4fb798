"""The search's measurements of candidate masks, against the full model computed once.

- `Calibrator`: KL to the full model, perplexity and top-1 agreement on calibration windows (WikiText-2
  from the second half of the test split, plus the full model's own chat answers when asked);
- `LambadaCalibrator`: LAMBADA last-word accuracy and final-word NLL on passages after the first 1,000;
- `answers.AnswerCheck`: whether a mask keeps the full model's greedy chat answers.
A `CalibrationWorker` holds one model and these: `trials`/`measure` score masks on the search's metric,
`check` runs the other measurements a constraint needs. With `--ray` each Ray actor holds one worker
(exporter/cluster.py); locally one runs in this process.
"""

from __future__ import annotations

import math
import random

import torch

from exporter.quality import data
from exporter.quality.answers import AnswerCheck, chat_windows
from exporter.cluster import where_am_i
from exporter.errors import UserError
from exporter.quality.importance import measure_importance
from exporter.mask import SkipMask
from exporter.model.source import load_model
from exporter.quality.metrics import lambada_batch, lambada_batches, lambada_examples, lambada_hits
from exporter.model.surgery import apply_skip

LAMBADA_HELD_OUT = 1000  # calibration passages come after the first 1,000: `eval --passages <= 1000` never sees them
KINDS = ("attention", "mlp", "block", "any")

Candidate = tuple[str, int]  # ("attention" | "mlp" | "block", layer)


def candidates(kind: str, num_layers: int, keep_final_layer: bool) -> list[Candidate]:
    if kind not in KINDS:
        raise UserError(f"--kind {kind!r}: choose from {', '.join(KINDS)}")
    layers = range(num_layers - 1 if keep_final_layer else num_layers)
    kinds = ("attention", "mlp") if kind == "any" else (kind,)
    return [(k, i) for k in kinds for i in layers]


def mask_of(chosen) -> SkipMask:
    attention = {i for k, i in chosen if k in ("attention", "block")}
    mlp = {i for k, i in chosen if k in ("mlp", "block")}
    return SkipMask(attention=tuple(sorted(attention)), mlp=tuple(sorted(mlp)))


def first_difference(mask: SkipMask, base: SkipMask | None, num_layers: int) -> int:
    base = base or SkipMask()
    changed = (set(mask.attention) ^ set(base.attention)) | (set(mask.mlp) ^ set(base.mlp))
    return min(changed, default=num_layers)


class Calibrator:
    """The calibration metrics of any mask, against the full model's distributions computed once.

    `measure(mask, base)` reuses the residual stream of `base` (held from an earlier `keep_trace`) below the
    first layer where the two masks differ, so a search step only recomputes the layers above each change.
    KL(P || Q) = sum P log P - sum P log Q, and sum P log Q = P . logits_Q - logsumexp(logits_Q): one batched
    dot product per position instead of a log-softmax, an exp and three temporaries of [W, T, V].
    """

    def __init__(self, model, chunks: list[list[int]]):
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        self.ids = torch.tensor(chunks, dtype=torch.long)  # [W, T]
        attn = torch.ones_like(self.ids)
        full = apply_skip(model, SkipMask())
        with torch.no_grad():
            self.h0, self.ctx = full.embed(self.ids, attn)
            logp = torch.log_softmax(full.head(full.run_layers(self.h0, self.ctx)[0]), dim=-1)  # [W, T, V]
            self.full_nll = self._nll(logp)
            self.full_top1 = logp.argmax(-1)  # [W, T]
            self.full_p = logp.exp()  # [W, T, V]
            self.full_plogp = (self.full_p * logp).sum(-1)  # [W, T]
        self.traces: dict[SkipMask, list[torch.Tensor]] = {}
        self.evaluations = 0

    def trials(self, chosen: list[Candidate], pool: list[Candidate], advance=None) -> dict[Candidate, dict]:
        """Metrics of `chosen + [c]` for every c in `pool`, each from the residual stream of `chosen`."""
        base = mask_of(chosen)
        if base not in self.traces:
            held = next(iter(self.traces), None)  # the previous base: the new one often shares its lower layers
            trace = self.traces.get(held)
            self.traces = {held: trace} if held is not None else {}
            self.measure(base, held, keep_trace=True)
            self.traces = {base: self.traces[base]}  # only the current base's stream: keep memory flat
        out = {}
        for cand in pool:
            out[cand] = self.measure(mask_of(chosen + [cand]), base)
            if advance:
                advance(1)
        return out

    def _nll(self, logp: torch.Tensor) -> float:
        return float(-logp[:, :-1].gather(-1, self.ids[:, 1:, None]).double().mean())

    @torch.no_grad()
    def measure(self, mask: SkipMask, base: SkipMask | None = None, keep_trace: bool = False) -> dict:
        skipped = apply_skip(self.model, mask)
        trace = self.traces.get(base) if base is not None else None
        start = min(first_difference(mask, base, self.num_layers), len(trace) - 1) if trace else 0
        h = trace[start] if trace else self.h0
        new_trace: list[torch.Tensor] | None = [] if keep_trace else None
        h, _ = skipped.run_layers(h, self.ctx, start=start, trace=new_trace)
        if keep_trace:
            self.traces[mask] = (trace[:start] if trace else []) + new_trace
        logits = skipped.head(h)  # [W, T, V]
        lse = torch.logsumexp(logits, dim=-1)  # [W, T]
        w, t, v = logits.shape
        p_dot = torch.bmm(self.full_p.view(w * t, 1, v), logits.view(w * t, v, 1)).view(w, t)
        kl = float((self.full_plogp - (p_dot - lse)).double().mean())
        nll = float((lse[:, :-1] - logits[:, :-1].gather(-1, self.ids[:, 1:, None]).squeeze(-1)).double().mean())
        self.evaluations += 1
        return {"kl": kl, "ppl": math.exp(nll), "ppl_full": math.exp(self.full_nll),
                "ppl_increase_pct": 100.0 * (math.exp(nll - self.full_nll) - 1.0),
                "top1_agreement": float((logits.argmax(-1) == self.full_top1).double().mean())}


class LambadaCalibrator:
    """LAMBADA last-word accuracy and final-word NLL of masks on held-out passages (`calibration_passages`).

    A greedy step scores every candidate in one pass over the batches: the base mask runs layer by
    layer and, at each candidate's first differing layer, a branch runs the candidate's model from
    the base's residual stream there. Nothing is stored per layer (passages are ~80 tokens each, a
    stored stream of a few hundred would take gigabytes).
    """

    def __init__(self, model, examples: list, pad_id: int = 0, token_budget: int = 4096):
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        self.passages = len(examples)
        self.batches = [lambada_batch(examples, rows, pad_id) for rows in lambada_batches(examples, token_budget)]
        self.evaluations = 0
        self.full = self._run(SkipMask(), {})[None]

    @torch.no_grad()
    def _run(self, base: SkipMask, masks: dict, advance=None) -> dict:
        """{key: metrics} for each mask (which must contain `base`), and the base's under key None."""
        models = {key: apply_skip(self.model, m) for key, m in masks.items()}
        branch_at: dict[int, list] = {}
        for key, m in masks.items():
            branch_at.setdefault(first_difference(m, base, self.num_layers), []).append(key)
        base_model = apply_skip(self.model, base)
        hits = {key: 0 for key in [None, *masks]}
        nll = {key: 0.0 for key in hits}
        for ids, attn, select, target in self.batches:
            rows = ids.shape[0]

            def tally(key, h, skipped):
                logits = skipped.head(h, select)  # [N, V] at the target positions
                tok_nll = -torch.log_softmax(logits, -1).gather(-1, target[:, None]).squeeze(-1)
                hits[key] += int(lambada_hits(logits, target, select[0], rows).sum())
                nll[key] += float(tok_nll.double().sum())  # summed over each passage's final-word tokens

            h, ctx = base_model.embed(ids, attn)
            for i in range(self.num_layers):
                for key in branch_at.get(i, ()):
                    tally(key, models[key].run_layers(h, ctx, start=i)[0], models[key])
                h, _ = base_model.run_layers(h, ctx, start=i, end=i + 1)
            tally(None, h, base_model)
            for key in branch_at.get(self.num_layers, ()):  # the same mask as the base
                tally(key, h, base_model)
            if advance:
                advance(len(masks) * rows / self.passages)
        self.evaluations += len(masks) + 1
        full = getattr(self, "full", None)
        out = {}
        for key in hits:
            acc = hits[key] / self.passages
            out[key] = {"lambada_accuracy": acc, "lambada_nll": nll[key] / self.passages}
            ref = full or out[key]  # the first run is the full model's
            out[key].update(lambada_accuracy_full=ref["lambada_accuracy"],
                            lambada_drop=100.0 * (ref["lambada_accuracy"] - acc),
                            lambada_nll_full=ref["lambada_nll"])
        return out

    def measure(self, mask: SkipMask, base: SkipMask | None = None, keep_trace: bool = False) -> dict:
        """One mask, branched from the full model (Calibrator's signature; `base`/`keep_trace` not needed)."""
        return self._run(SkipMask(), {0: mask})[0]

    def trials(self, chosen: list[Candidate], pool: list[Candidate], advance=None) -> dict[Candidate, dict]:
        result = self._run(mask_of(chosen), {cand: mask_of(chosen + [cand]) for cand in pool}, advance)
        return {cand: result[cand] for cand in pool}


class CalibrationWorker:
    """One model and its calibrators: local search scores candidates through one in this process; with `--ray`
    each Ray actor holds one (exporter/cluster.py), loading the model once from the recipe's source, and
    scores its share of every step's candidates (the base stream or the branched pass stays inside it).

    `inputs` (from `calibration_inputs`): token ids only. "chat" prompts are answered by the full model here
    and their answers join the calibration windows; "answers" prompts feed the behaviour check."""

    def __init__(self, model, inputs: dict):
        if not isinstance(model, torch.nn.Module):  # a recipe's ModelSource: load the weights here, once
            model = load_model(model)[0]
        self.model = model
        pad, eos = inputs.get("pad_id", 0), inputs.get("eos_id")
        self.chunks = list(inputs["chunks"])
        if inputs.get("chat"):
            self.chunks += chat_windows(model, inputs["chat"], inputs["chat_tokens"], len(self.chunks[0]), pad, eos)
        windows = lambda: Calibrator(model, self.chunks)  # noqa: E731
        lambada = lambda: LambadaCalibrator(model, inputs["examples"], pad)  # noqa: E731
        self.cal = lambada() if inputs["metric"] == "lambada" else windows()
        self.checks = {}  # check name -> a calibrator measuring what a constraint needs beyond self.cal
        for name in inputs.get("checks", ()):
            if name == "lambada" and inputs["metric"] != "lambada":
                self.checks[name] = lambada()
            elif name == "windows" and inputs["metric"] == "lambada":
                self.checks[name] = windows()
            elif name == "answers":
                self.checks[name] = AnswerCheck(model, inputs["answers"], inputs["answer_tokens"], pad, eos)

    @property
    def evaluations(self) -> int:
        return self.cal.evaluations + sum(c.evaluations for c in self.checks.values())

    def importance(self):
        return measure_importance(apply_skip(self.model, SkipMask()), self.chunks)

    def trials(self, chosen: list[Candidate], pool: list[Candidate]) -> tuple[dict, int]:
        """(metrics of chosen + [c] for every c in pool, evaluations so far)."""
        return self.cal.trials(chosen, pool), self.evaluations

    def measure(self, mask: SkipMask) -> tuple[dict, int]:
        return self.cal.measure(mask), self.evaluations

    def check(self, mask: SkipMask) -> tuple[dict, int]:
        """The metrics of every lazy check (LAMBADA, chat answers, windows under a LAMBADA metric) for one mask."""
        out: dict = {}
        for name in sorted(self.checks, key=lambda n: n != "answers"):  # the cheap one first
            out.update(self.checks[name].measure(mask))
            if out.get("answers_matched", 1) < out.get("answers_tokens", 0):
                break  # the mask fails already: LAMBADA's minute is not spent on it
        return out, self.evaluations

    def where(self) -> dict:
        return where_am_i()


def calibration_passages(tokenizer, folder, count: int, seed: int) -> tuple[list, int]:
    """`count` LAMBADA passages drawn with `seed` from those after the first 1,000 (after the first half of
    a shorter file), so an `eval --passages` subset of up to 1,000 passages stays held out; and where the
    drawn-from range starts."""
    pairs = data.read_lambada(folder)
    start = LAMBADA_HELD_OUT if len(pairs) >= 2 * LAMBADA_HELD_OUT else len(pairs) // 2
    pool = range(start, len(pairs))
    if count < 1 or count > len(pool):
        raise UserError(f"calibration: cannot draw {count} LAMBADA passages from the {len(pool)} after "
                        f"passage {start} of {len(pairs)}")
    picks = sorted(random.Random(seed).sample(pool, count))
    return lambada_examples(tokenizer, [pairs[i] for i in picks]), start
