"""What each stage returns, typed: the stage cache serialises these (pipeline/cache.py) and the report is assembled
from them (pipeline/run.py). Nested records stay plain JSON as report.json has them: files (files.describe_file),
parity rows (checks.parity), checks ({name, value, limit, passed}) and checks not run ({check, reason}).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TypeVar

R = TypeVar("R", bound="StageResult")


@dataclass
class StageResult:
    """What every stage may add to the run's findings (Findings, below)."""

    artifacts: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    parity: list[dict] = field(default_factory=list)
    not_run: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls: type[R], data: dict) -> R:
        return cls(**data)


@dataclass
class Removed(StageResult):
    parameters: dict = field(default_factory=dict)  # full, skipped, removed, removed_modules
    kv_cache: dict = field(default_factory=dict)  # layers and bytes per token, full and skipped


@dataclass
class Referenced(StageResult):
    samples: list[dict] = field(default_factory=list)  # greedy answers of the full and the skipped model


@dataclass
class Exported(StageResult):
    onnx: dict = field(default_factory=dict)  # the plain graph's I/O signature

    @property
    def data_bytes(self) -> int:
        return next(a["bytes"] for a in self.artifacts if a["kind"] == "onnx-external-data")


@dataclass
class Validated(StageResult):
    greedy: dict = field(default_factory=dict)  # half graphs: free-running greedy tokens against the reference


@dataclass
class Engines(StageResult):
    built: list[dict] = field(default_factory=list)
    not_built: list[dict] = field(default_factory=list)


@dataclass
class Optimized(StageResult):
    fused: dict | None = None  # what the rewrite fused (None: no optimized graph)
    tuning: dict | None = None  # the variants timed here and the choice
    serve: str = ""  # the graph genai_config.json names


@dataclass
class Quantized(StageResult):
    int4: dict = field(default_factory=dict)  # what was quantized, and its fit to the fp32 reference


@dataclass
class Speed(StageResult):
    prediction: dict = field(default_factory=dict)  # the cost model
    measured: dict | None = None  # a short interleaved ORT ratio, full vs skipped
    not_measured: str | None = None  # why nothing was timed
    full_graph: str | None = None  # the unskipped model's plain graph that was timed

    def to_report(self) -> dict:
        out = {"prediction": self.prediction, "measured": self.measured}
        if self.not_measured is not None:
            out["not_measured"] = self.not_measured
        if self.full_graph is not None:
            out["full_graph"] = self.full_graph
        return out


@dataclass
class Packaged(StageResult):
    pass


@dataclass
class Findings(StageResult):
    """What the stages found, accumulated in stage order: files, parity rows, checks and checks not run."""

    def add(self, result: R) -> R:
        for key in ("artifacts", "parity", "checks", "not_run"):
            getattr(self, key).extend(getattr(result, key))
        return result

    @property
    def passed(self) -> bool:
        return all(p["passed"] for p in self.parity) and all(c["passed"] for c in self.checks)
