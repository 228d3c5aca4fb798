"""The search behind `export-skip search`: the mask closest to the full model that meets the user's
constraints (its arguments, Ray dispatch and the recipe it writes: exporter/commands/search.py).

Objective: the mean KL to the full model on calibration text (`--metric ppl|lambada` ranks by perplexity
or LAMBADA final-word NLL instead); constraints: any combination of `--max-kl`, `--max-ppl-increase`,
`--max-lambada-drop`, `--count` and `--match-tokens` (exporter/quality/constraints.py). Strategies
(exporter/quality/strategies.py): local (greedy, then local swaps seeded by greedy and every one-shot ranking; the
default), greedy, oneshot. Calibration (exporter/quality/calibration.py): WikiText-2 windows from the second half
of the test split, plus the full model's chat answers to `--calibration-prompts`; LAMBADA passages after
the first 1,000. The first half and the first 1,000 passages stay held out: `--held-out-windows` /
`--held-out-passages` score the found mask there against the one-shot masks of the same size, with
bootstrap standard errors (exporter/quality/heldout.py), and the recipe's comments keep those numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from exporter.quality.calibration import CalibrationWorker, calibration_passages, candidates, mask_of
from exporter.quality.constraints import Budget
from exporter.errors import UserError
from exporter.quality.importance import calibration_windows
from exporter.mask import SkipMask
from exporter.progress import progress_bar
from exporter.model.prompts import encode, pad_token_id
from exporter.quality.strategies import Scorer, greedy, local, oneshot, rankings

METRICS = ("kl", "ppl", "lambada")
STRATEGIES = ("local", "greedy", "oneshot")
RANK_BY = {"kl": "kl", "ppl": "ppl_increase_pct", "lambada": "lambada_nll"}  # what the search minimises


@dataclass
class SearchSettings:
    budget: Budget
    data: Path
    strategy: str = "local"
    kind: str = "attention"
    windows: int = 4
    length: int = 256
    seed: int = 0
    keep_final_layer: bool = True
    metric: str = "kl"
    passages: int = 200  # LAMBADA calibration passages
    budget_evals: int | None = None  # stop after this many mask evaluations (the best found so far wins)
    chat_prompts: tuple[str, ...] = ()  # the full model's answers to these join the calibration windows
    chat_tokens: int = 64  # tokens per such answer
    answer_prompts: tuple[str, ...] = ()  # the recipe's validation prompts, for --match-tokens
    chat: bool = True  # apply the chat template to prompts (the recipe's validate.chat)
    held_out_windows: int = 0  # 0: no held-out evaluation
    held_out_window: int = 512
    held_out_passages: int = 0
    source_prompts: str | None = None  # where chat_prompts came from, for the recipe's comments
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.metric not in METRICS:
            raise UserError(f"--metric {self.metric!r}: choose from {', '.join(METRICS)}")
        if self.strategy not in STRATEGIES:
            raise UserError(f"--strategy {self.strategy!r}: choose from {', '.join(STRATEGIES)}")
        if self.budget.match_tokens is not None and not self.answer_prompts:
            raise UserError("--match-tokens needs the recipe's validate.prompts (the recipe has none)")
        if self.budget_evals is not None and self.budget_evals < 1:
            raise UserError(f"--budget-evals must be positive (got {self.budget_evals})")


def calibration_inputs(tokenizer, settings: SearchSettings) -> tuple[dict, dict]:
    """(what a CalibrationWorker needs: token ids, no files; how the calibration set was drawn, for the recipe)."""
    chunks = calibration_windows(tokenizer, settings.data, settings.windows, settings.length, settings.seed)
    checks = set(settings.budget.checks)
    if settings.metric == "lambada" and {"kl", "ppl_increase_pct"} & set(settings.budget.limits):
        checks.add("windows")
    eos = getattr(tokenizer, "eos_token_id", None)
    inputs = {"metric": settings.metric, "chunks": chunks, "checks": sorted(checks),
              "pad_id": pad_token_id(tokenizer), "eos_id": eos}
    described = {"windows": settings.windows, "length": settings.length, "seed": settings.seed,
                 "data": "WikiText-2 raw test split (second half)"}
    if settings.chat_prompts:
        inputs.update(chat=[encode(tokenizer, p, chat=settings.chat) for p in settings.chat_prompts],
                      chat_tokens=settings.chat_tokens)
        described["chat"] = (f"the full model's greedy answers ({settings.chat_tokens} tokens at most) to "
                             f"{len(settings.chat_prompts)} prompts of {settings.source_prompts or 'a file'}")
    if "answers" in checks:
        inputs.update(answers=[encode(tokenizer, p, chat=settings.chat) for p in settings.answer_prompts],
                      answer_tokens=settings.budget.match_tokens)
    if settings.metric == "lambada" or "lambada" in checks:
        examples, start = calibration_passages(tokenizer, settings.data, settings.passages, settings.seed)
        inputs["examples"] = examples
        described["lambada"] = f"{settings.passages} LAMBADA test passages after the first {start:,}"
    return inputs, described


class LocalCalibrator:
    """The calibrator interface (`trials`, `measure`, `check`, `importance`, `evaluations`) over a worker here."""

    def __init__(self, worker: CalibrationWorker):
        self.worker = worker

    @property
    def evaluations(self) -> int:
        return self.worker.evaluations

    def trials(self, chosen, pool, advance=None) -> dict:
        return self.worker.cal.trials(chosen, pool, advance)

    def measure(self, mask: SkipMask) -> dict:
        return self.worker.cal.measure(mask)

    def check(self, mask: SkipMask) -> dict:
        return self.worker.check(mask)[0]

    def importance(self):
        return self.worker.importance()


def search(model, tokenizer, settings: SearchSettings, console=None, config=None, remote=None) -> dict:
    """Run the search; returns the mask, its record (steps, seeds, swaps) with calibration metrics, and the
    settings. `remote(inputs)`: a calibrator on other processes (cluster.RayCalibrator; `model` may then be None
    and `config` gives the layer count) instead of one on `model` here. Either way the picks happen here."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    budget = settings.budget
    n = (config or model.config).num_hidden_layers
    pool = candidates(settings.kind, n, settings.keep_final_layer)
    if budget.count is not None and budget.count > len(pool):
        raise UserError(f"--count {budget.count}: only {len(pool)} candidates ({settings.kind}, "
                        f"final layer {'kept' if settings.keep_final_layer else 'allowed'})")
    inputs, calibration = calibration_inputs(tokenizer, settings)
    cal = LocalCalibrator(CalibrationWorker(model, inputs)) if remote is None else remote(inputs)
    scores = cal.importance()
    rank_by = RANK_BY[settings.metric]
    record: dict = {"steps": [], "seeds": []}
    with progress_bar(console) as progress:
        estimate = sum(len(pool) - s for s in range(budget.count or len(pool)))
        total = settings.budget_evals or (estimate * (3 if settings.strategy == "local" else 1))
        task = progress.add_task(f"{settings.strategy} search ({budget.describe()})", total=total)
        label = progress.tasks[task].description
        status = getattr(cal, "status", None)  # Ray: candidates running on how many workers
        scorer = None

        def advance(k):
            best = f", best {rank_by} {scorer.best:.4f}" if scorer is not None and scorer.best is not None else ""
            progress.update(task, advance=k, description=f"{label}{best}" + (f", {status()}" if status else ""))

        scorer = Scorer(cal, budget, rank_by, settings.budget_evals, advance)
        if settings.strategy == "local":
            chosen, record = local(cal, pool, budget, rank_by, scores, scorer=scorer)
        elif settings.strategy == "greedy":
            chosen, record["steps"] = greedy(cal, pool, budget, rank_by, scorer=scorer)
        else:
            chosen, record["steps"] = oneshot(cal, pool, budget, scores, scorer=scorer)
        progress.update(task, total=progress.tasks[task].completed)  # a budget may stop it early
    if budget.count is not None and len(chosen) < budget.count:
        raise UserError(f"no mask of {budget.count} candidates meets the constraints ({budget.describe()}); "
                        f"the largest found removes {len(chosen)}")
    mask = mask_of(chosen)
    final = scorer.metrics.get(mask) if chosen else None
    if final is None:
        final = scorer.measure(chosen)
    if scorer.unmeasured(final):
        final.update(cal.check(mask))
    k = len(chosen)
    baselines = {name: order[:k] for name, order in rankings(pool, scores).items()} if k else {}
    return {"mask": mask, "chosen": chosen, "steps": record["steps"], "seeds": record.get("seeds", []),
            "final": final, "importance": scores.as_dict(), "baselines": baselines,
            "baseline_metrics": {name: scorer.measure(c) for name, c in baselines.items()},
            "stopped_by_budget_evals": scorer.stopped,
            "calibration": {"metric": settings.metric, **calibration},
            "evaluations": cal.evaluations, "seconds": round(time.perf_counter() - started, 1)}

