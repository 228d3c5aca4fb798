"""What a searched mask must satisfy: any combination of a calibration KL ceiling, a perplexity increase, a
LAMBADA accuracy drop, a number of removed candidates, and the full model's chat answers kept for N tokens.

The search minimises KL to the full model; these are its constraints. KL and perplexity come with every
calibration measurement (cheap); LAMBADA and the answers are measured only for masks the search is about to
accept (`needs_check`), so each is `missing` until then.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.errors import UserError

# constraint field -> (metric it reads, flag, whether the metric is a ceiling)
LIMITS = {
    "max_kl": ("kl", "--max-kl", True),
    "max_ppl_increase": ("ppl_increase_pct", "--max-ppl-increase", True),
    "max_lambada_drop": ("lambada_drop", "--max-lambada-drop", True),
    "match_tokens": ("answers_matched", "--match-tokens", False),
}
CHECKED = {"lambada_drop": "lambada", "answers_matched": "answers"}  # metric -> the lazy check that measures it


@dataclass(frozen=True)
class Budget:
    max_kl: float | None = None
    max_ppl_increase: float | None = None  # percent
    max_lambada_drop: float | None = None  # accuracy points below the full model's
    count: int | None = None  # exactly this many candidates removed (None: as many as the rest allows)
    match_tokens: int | None = None  # the full model's greedy chat answers kept for this many tokens

    FLAGS = ("max_kl", "max_ppl_increase", "max_lambada_drop", "count", "match_tokens")

    def __post_init__(self):
        given = [k for k in self.FLAGS if getattr(self, k) is not None]
        if not given:
            raise UserError("give a budget: --count and/or any of --max-kl, --max-ppl-increase, "
                            "--max-lambada-drop, --match-tokens")
        for key in given:
            value = getattr(self, key)
            if value < 0 or (key in ("count", "match_tokens") and value < 1):
                raise UserError(f"--{key.replace('_', '-')} must be positive (got {value})")

    @property
    def limits(self) -> dict[str, float]:
        """{metric: bound} of every constraint given."""
        return {LIMITS[k][0]: getattr(self, k) for k in LIMITS if getattr(self, k) is not None}

    @property
    def checks(self) -> set[str]:
        """The lazy checks (`lambada`, `answers`) this budget needs before a mask is accepted."""
        return {CHECKED[m] for m in self.limits if m in CHECKED}

    def violated(self, metrics: dict) -> list[str]:
        """Constraints that the metrics present break (a missing metric breaks nothing yet)."""
        out = []
        for key, (metric, flag, ceiling) in LIMITS.items():
            bound = getattr(self, key)
            if bound is None or metric not in metrics:
                continue
            if (metrics[metric] > bound) if ceiling else (metrics[metric] < bound):
                out.append(flag)
        return out

    def allows(self, metrics: dict) -> bool:
        missing = [m for m in self.limits if m not in metrics]
        if missing:
            raise KeyError(f"constraint metrics not measured: {missing}")
        return not self.violated(metrics)

    def describe(self) -> str:
        parts = []
        if self.max_kl is not None:
            parts.append(f"mean KL vs full <= {self.max_kl:g}")
        if self.max_ppl_increase is not None:
            parts.append(f"perplexity increase <= {self.max_ppl_increase:g}%")
        if self.max_lambada_drop is not None:
            parts.append(f"LAMBADA accuracy drop <= {self.max_lambada_drop:g} points")
        if self.match_tokens is not None:
            parts.append(f"chat answers = the full model's for {self.match_tokens} tokens")
        if self.count is not None:
            parts.append(f"{self.count} candidates removed")
        return ", ".join(parts)
