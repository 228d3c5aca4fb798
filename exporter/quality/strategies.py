"""How the search picks masks, given a calibrator (`trials`, `measure`, `check`, `evaluations`) and a Budget.

- oneshot: rank candidates once by importance and remove them in that order while the budget holds;
- greedy (SLEB/FinerCut style): measure every remaining candidate, remove the one that scores best and
  passes the constraints, repeat;
- local (the default): greedy, then local swaps from it and from every one-shot ranking's mask of the same
  size (LLM-Drop cosine, Block Influence, deepest-k): put one removed candidate back and remove another
  instead, first improvement, until no swap improves; without `--count`, grow by one and repeat while a
  feasible removal exists.
Candidates are ranked by `rank_by` (KL by default), ties on the lower layer, so a run repeats exactly.
Cheap metrics (KL, perplexity) come with every trial; the lazy checks (LAMBADA, chat answers) run only on a
mask about to be accepted, at most MAX_CHECKS per step.
"""

from __future__ import annotations

from exporter.quality.calibration import Candidate, mask_of
from exporter.quality.constraints import Budget

MAX_CHECKS = 6  # lazy checks per greedy step / swap group before giving up on it
EPS = 1e-9  # a swap must improve by more than this (float noise is not an improvement)


class Scorer:
    """A calibrator with memory (a mask is measured once), lazy constraint checks and an evaluation cap."""

    def __init__(self, cal, budget: Budget, rank_by: str, max_evals: int | None = None, advance=None):
        self.cal, self.budget, self.rank_by, self.max_evals, self.advance = cal, budget, rank_by, max_evals, advance
        self.metrics: dict = {}  # mask -> metrics measured so far
        self.checked: set = set()
        self.stopped = False  # the evaluation cap was reached
        self.best: float | None = None  # rank_by of the latest accepted mask (for progress)

    @property
    def evaluations(self) -> int:
        return self.cal.evaluations

    def spent(self) -> bool:
        self.stopped = self.stopped or (self.max_evals is not None and self.evaluations >= self.max_evals)
        return self.stopped

    def trials(self, chosen: list[Candidate], pool: list[Candidate]) -> dict[Candidate, dict]:
        todo = [c for c in pool if mask_of(chosen + [c]) not in self.metrics]
        if todo:
            for cand, m in self.cal.trials(chosen, todo, self.advance).items():
                self.metrics[mask_of(chosen + [cand])] = dict(m)
        return {c: self.metrics[mask_of(chosen + [c])] for c in pool}

    def measure(self, chosen: list[Candidate]) -> dict:
        mask = mask_of(chosen)
        if mask not in self.metrics:
            self.metrics[mask] = dict(self.cal.measure(mask))
            if self.advance:
                self.advance(1)
        return self.metrics[mask]

    def key(self, metrics: dict, cand: Candidate | None = None) -> tuple:
        return (metrics[self.rank_by], *((cand[1], cand[0]) if cand else ()))

    def feasible(self, chosen: list[Candidate], metrics: dict | None = None) -> bool:
        """Whether the mask meets every constraint; runs its lazy checks once if the cheap metrics pass."""
        mask = mask_of(chosen)
        metrics = self.metrics.setdefault(mask, metrics or self.measure(chosen))
        if self.budget.violated(metrics):
            return False
        if self.unmeasured(metrics):
            metrics.update(self.cal.check(mask))
            self.checked.add(mask)
        return not self.budget.violated(metrics)

    def unmeasured(self, metrics: dict) -> bool:
        """Whether a constraint's metric still needs a lazy check (a LAMBADA metric brings its own)."""
        return any(m not in metrics for m in self.budget.limits)

    def first_feasible(self, chosen: list[Candidate], ranked: list[Candidate], trials: dict) -> Candidate | None:
        """The best-ranked c whose `chosen + [c]` is feasible, trying at most MAX_CHECKS that need a lazy check."""
        tries = 0
        for cand in ranked:
            mask = mask_of(chosen + [cand])
            if self.budget.violated(trials[cand]):
                continue
            if self.unmeasured(self.metrics.get(mask, trials[cand])):
                if tries == MAX_CHECKS:
                    return None
                tries += 1
            if self.feasible(chosen + [cand], trials[cand]):
                return cand
        return None


def greedy(cal, pool: list[Candidate], budget: Budget, rank_by: str, advance=None, scorer: Scorer | None = None,
           start: list[Candidate] | None = None, size: int | None = None) -> tuple[list, list]:
    """Remove, one at a time, the best-ranked candidate whose mask meets the constraints, until `size`
    (default: the budget's count, or as many as stay feasible)."""
    scorer = scorer or Scorer(cal, budget, rank_by, advance=advance)
    chosen = list(start or [])
    pool = [c for c in pool if c not in chosen]
    size = size or budget.count
    steps: list[dict] = []
    while pool and (size is None or len(chosen) < size) and not scorer.spent():
        trials = scorer.trials(chosen, pool)
        best = scorer.first_feasible(chosen, sorted(pool, key=lambda c: scorer.key(trials[c], c)), trials)
        if best is None:
            break
        chosen.append(best)
        pool = [c for c in pool if c != best]
        steps.append({"removed": list(best), **trials[best]})
        scorer.best = trials[best][rank_by]
    return chosen, steps


def improve(scorer: Scorer, chosen: list[Candidate], pool: list[Candidate]) -> tuple[list, list]:
    """First-improvement swaps from a feasible `chosen`: for each removed candidate a (lowest layer first), score
    every outside b in `chosen - a + b` from one shared stream, take the best-ranked feasible b that improves."""
    chosen = sorted(chosen, key=lambda c: (c[1], c[0]))
    current = scorer.measure(chosen)
    swaps: list[dict] = []
    improved = True
    while improved and not scorer.spent():
        improved = False
        for a in chosen:
            rest = [c for c in chosen if c != a]
            outside = [c for c in pool if c not in chosen]
            trials = scorer.trials(rest, outside)
            better = [b for b in sorted(outside, key=lambda c: scorer.key(trials[c], c))
                      if trials[b][scorer.rank_by] < current[scorer.rank_by] - EPS]
            b = scorer.first_feasible(rest, better, trials)
            if b is not None:
                chosen = sorted(rest + [b], key=lambda c: (c[1], c[0]))
                current = scorer.metrics[mask_of(chosen)]
                swaps.append({"out": list(a), "in": list(b), **current})
                scorer.best = min(scorer.best if scorer.best is not None else float("inf"), current[scorer.rank_by])
                improved = True
                break
            if scorer.spent():
                break
    return chosen, swaps


def rankings(pool: list[Candidate], scores) -> dict[str, list[Candidate]]:
    """The one-shot orders: LLM-Drop cosine (sub-layers), ShortGPT Block Influence (of each candidate's
    block), the paper's deepest first."""
    return {
        "LLM-Drop cosine": sorted(pool, key=lambda c: (scores.importance(*c), c[1], c[0])),
        "Block Influence": sorted(pool, key=lambda c: (scores.block_influence[c[1]], c[1], c[0])),
        "deepest": sorted(pool, key=lambda c: (-c[1], c[0])),
    }


def local(cal, pool: list[Candidate], budget: Budget, rank_by: str, scores, advance=None,
          scorer: Scorer | None = None) -> tuple[list, dict]:
    """Greedy, then swaps from greedy's mask and every one-shot ranking's mask of that size; the best feasible
    mask wins. Returns (chosen, record: the greedy steps, and each seed's start, end and swaps)."""
    scorer = scorer or Scorer(cal, budget, rank_by, advance=advance)
    chosen, steps = greedy(cal, pool, budget, rank_by, scorer=scorer)
    seeds: list[dict] = []
    best = chosen
    while best and not scorer.spent():
        k = len(best)
        starts = {"greedy": best, **{name: order[:k] for name, order in rankings(pool, scores).items()}}
        for name, seed in starts.items():
            if scorer.spent():
                break
            if any(mask_of(seed) == mask_of(s["start"]) for s in seeds if len(s["start"]) == k):
                continue  # the same mask as an earlier seed: its swaps would repeat exactly
            entry = {"seed": name, "start": list(seed), "start_metrics": scorer.measure(list(seed))}
            seeds.append(entry)
            if not scorer.feasible(list(seed)):
                entry["infeasible"] = True
                continue
            end, swaps = improve(scorer, list(seed), pool)
            entry.update(end=end, swaps=swaps, end_metrics=scorer.metrics[mask_of(end)])
            if scorer.key(entry["end_metrics"]) < scorer.key(scorer.metrics[mask_of(best)]):
                best = end
        if budget.count is not None or scorer.spent():
            break
        grown, more = greedy(cal, pool, budget, rank_by, scorer=scorer, start=best, size=k + 1)
        if len(grown) == k:
            break  # no feasible removal beyond the best mask of this size
        steps += more
        best = grown
    return sorted(best, key=lambda c: (c[1], c[0])), {"steps": steps, "seeds": seeds}


def oneshot(cal, pool: list[Candidate], budget: Budget, scores, advance=None, scorer: Scorer | None = None
            ) -> tuple[list, list]:
    order = rankings(pool, scores)["LLM-Drop cosine"]
    scorer = scorer or Scorer(cal, budget, "kl", advance=advance)
    chosen: list[Candidate] = []
    steps: list[dict] = []
    for cand in order:
        if budget.count is not None and len(chosen) >= budget.count:
            break
        if scorer.spent() or not scorer.feasible(chosen + [cand]):
            break
        chosen.append(cand)
        steps.append({"removed": list(cand), "importance": scores.importance(*cand), **scorer.measure(chosen)})
    return chosen, steps
