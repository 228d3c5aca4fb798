"""`export-skip search`: find a skip mask under a quality budget and write it as a recipe.

Candidates are attention sub-layers by default (MLPs, whole blocks, or attention and MLP as separate
candidates when asked), final layer excluded unless allowed. Two strategies:
- oneshot: rank candidates once by importance (LLM-Drop cosine for sub-layers, ShortGPT Block
  Influence for blocks) and remove them in that order while the budget holds;
- greedy (SLEB/FinerCut style): at each step measure every remaining candidate on the calibration
  windows, remove the one that hurts least, repeat while the budget holds.
The calibration metric is KL vs the full model (or perplexity) on a few WikiText-2 windows drawn
with a seed, or LAMBADA (`--metric lambada`, or a `--max-lambada-drop` budget): greedy then ranks
candidates by the mean negative log-likelihood of the passages' final words (smoother than accuracy
on a few hundred passages), and the budget binds on last-word accuracy, both on held-out passages.
Ties break on the lower layer index, so runs are deterministic.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from exporter import data
from exporter.cluster import (RayCalibrator, Resources, alive_nodes, connect, disconnect, memory_estimate,
                              where_am_i)
from exporter.cost import kept_parameters, predicted_decode_speedup
from exporter.dtypes import itemsize
from exporter.errors import UserError
from exporter.importance import calibration_windows, measure_importance
from exporter.mask import SkipMask
from exporter.models import load_config, load_model, load_tokenizer
from exporter.progress import progress_bar
from exporter.prompts import pad_token_id
from exporter.quality import lambada_batch, lambada_batches, lambada_examples, lambada_hits
from exporter.recipe import load_recipe
from exporter.surgery import apply_skip

KINDS = ("attention", "mlp", "block", "any")
METRICS = ("kl", "ppl", "lambada")
RANK_BY = {"kl": "kl", "ppl": "ppl_increase_pct", "lambada": "lambada_nll"}  # what greedy minimises
LAMBADA_HELD_OUT = 1000  # calibration passages come after the first 1,000: `eval --limit <= 1000` never sees them


@dataclass(frozen=True)
class Budget:
    max_kl: float | None = None
    max_ppl_increase: float | None = None  # percent
    max_lambada_drop: float | None = None  # accuracy points below the full model's
    count: int | None = None

    FLAGS = ("max_kl", "max_ppl_increase", "max_lambada_drop", "count")

    def __post_init__(self):
        given = [k for k in self.FLAGS if getattr(self, k) is not None]
        if len(given) != 1:
            raise UserError("give exactly one budget: --max-kl, --max-ppl-increase, --max-lambada-drop or --count")
        value = getattr(self, given[0])
        if value < 0 or (self.count is not None and self.count < 1):
            raise UserError(f"--{given[0].replace('_', '-')} must be positive (got {value})")

    @property
    def metric(self) -> str:
        """The calibration metric this budget is stated in (a count fits any: KL unless told)."""
        if self.max_lambada_drop is not None:
            return "lambada"
        return "ppl" if self.max_ppl_increase is not None else "kl"

    def allows(self, metrics: dict) -> bool:
        if self.max_kl is not None:
            return metrics["kl"] <= self.max_kl
        if self.max_ppl_increase is not None:
            return metrics["ppl_increase_pct"] <= self.max_ppl_increase
        if self.max_lambada_drop is not None:
            return metrics["lambada_drop"] <= self.max_lambada_drop
        return True

    def describe(self) -> str:
        if self.max_kl is not None:
            return f"mean KL vs full <= {self.max_kl:g}"
        if self.max_ppl_increase is not None:
            return f"perplexity increase <= {self.max_ppl_increase:g}%"
        if self.max_lambada_drop is not None:
            return f"LAMBADA accuracy drop <= {self.max_lambada_drop:g} points"
        return f"{self.count} candidates removed"


@dataclass
class SearchSettings:
    budget: Budget
    data: Path
    strategy: str = "greedy"
    kind: str = "attention"
    windows: int = 4
    length: int = 256
    seed: int = 0
    keep_final_layer: bool = True
    metric: str | None = None  # None: the budget's
    passages: int = 200  # LAMBADA calibration passages

    def __post_init__(self):
        self.metric = self.metric or self.budget.metric
        if self.metric not in METRICS:
            raise UserError(f"--metric {self.metric!r}: choose from {', '.join(METRICS)}")
        if self.budget.count is None and (self.metric == "lambada") != (self.budget.metric == "lambada"):
            raise UserError(f"the budget ({self.budget.describe()}) is measured with --metric {self.budget.metric}, "
                            f"not {self.metric}")


Candidate = tuple[str, int]  # ("attention" | "mlp" | "block", layer)


def candidates(kind: str, num_layers: int, keep_final_layer: bool) -> list[Candidate]:
    if kind not in KINDS:
        raise UserError(f"--kind {kind!r}: choose from {', '.join(KINDS)}")
    layers = range(num_layers - 1 if keep_final_layer else num_layers)
    kinds = ("attention", "mlp") if kind == "any" else (kind,)
    return [(k, i) for k in kinds for i in layers]


def mask_of(chosen: list[Candidate]) -> SkipMask:
    attention = {i for k, i in chosen if k in ("attention", "block")}
    mlp = {i for k, i in chosen if k in ("mlp", "block")}
    return SkipMask(attention=tuple(sorted(attention)), mlp=tuple(sorted(mlp)))


class Calibrator:
    """The calibration metrics of any mask, against the full model's log-probs computed once.

    `measure(mask, base)` reuses the residual stream of `base` (a subset of `mask` that agrees with
    it below the first differing layer), so a greedy step only recomputes the layers above each candidate.
    """

    def __init__(self, model, chunks: list[list[int]]):
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        self.ids = torch.tensor(chunks, dtype=torch.long)  # [W, T]
        attn = torch.ones_like(self.ids)
        full = apply_skip(model, SkipMask())
        with torch.no_grad():
            self.h0, self.ctx = full.embed(self.ids, attn)
            logits = full.head(full.run_layers(self.h0, self.ctx)[0])
        self.full_logp = torch.log_softmax(logits, dim=-1)  # [W, T, V]
        self.full_nll = self._nll(self.full_logp)
        self.full_top1 = self.full_logp.argmax(-1)
        self.traces: dict[SkipMask, list[torch.Tensor]] = {}
        self.evaluations = 0

    def trials(self, chosen: list[Candidate], pool: list[Candidate], advance=None) -> dict[Candidate, dict]:
        """Metrics of `chosen + [c]` for every c in `pool`, each from the residual stream of `chosen`."""
        base = mask_of(chosen)
        if base not in self.traces:
            self.traces.clear()  # only the current base's stream is reused: keep memory flat
            self.measure(base, keep_trace=True)
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
        start = min(_first_difference(mask, base, self.num_layers), len(trace) - 1) if trace else 0
        h = trace[start] if trace else self.h0
        new_trace: list[torch.Tensor] | None = [] if keep_trace else None
        h, _ = skipped.run_layers(h, self.ctx, start=start, trace=new_trace)
        if keep_trace:
            self.traces[mask] = (trace[:start] if trace else []) + new_trace
        logp = torch.log_softmax(skipped.head(h), dim=-1)  # [W, T, V]
        kl = float((self.full_logp.exp() * (self.full_logp - logp)).sum(-1).double().mean())
        nll = self._nll(logp)
        self.evaluations += 1
        return {"kl": kl, "ppl": math.exp(nll), "ppl_full": math.exp(self.full_nll),
                "ppl_increase_pct": 100.0 * (math.exp(nll - self.full_nll) - 1.0),
                "top1_agreement": float((logp.argmax(-1) == self.full_top1).double().mean())}


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
            branch_at.setdefault(_first_difference(m, base, self.num_layers), []).append(key)
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
    """One model and its calibrator: local search scores candidates through one in this process; with `--ray`
    each Ray actor holds one (exporter/cluster.py), loading the model once from the recipe's source, and
    scores its share of every step's candidates (the base stream or the branched pass stays inside it)."""

    def __init__(self, model, inputs: dict):
        if not isinstance(model, torch.nn.Module):  # a recipe's ModelSource: load the weights here, once
            model = load_model(model)[0]
        self.model = model
        self.chunks = inputs["chunks"]
        if inputs["metric"] == "lambada":
            self.cal = LambadaCalibrator(model, inputs["examples"], inputs["pad_id"])
        else:
            self.cal = Calibrator(model, inputs["chunks"])

    def importance(self):
        return measure_importance(apply_skip(self.model, SkipMask()), self.chunks)

    def trials(self, chosen: list[Candidate], pool: list[Candidate]) -> tuple[dict, int]:
        """(metrics of chosen + [c] for every c in pool, evaluations so far)."""
        return self.cal.trials(chosen, pool), self.cal.evaluations

    def measure(self, mask: SkipMask) -> tuple[dict, int]:
        return self.cal.measure(mask), self.cal.evaluations

    def where(self) -> dict:
        return where_am_i()


def calibration_inputs(tokenizer, settings: SearchSettings) -> tuple[dict, dict]:
    """(what a CalibrationWorker needs: token ids, no files; how the calibration set was drawn, for the recipe)."""
    chunks = calibration_windows(tokenizer, settings.data, settings.windows, settings.length, settings.seed)
    inputs = {"metric": settings.metric, "chunks": chunks}
    if settings.metric == "lambada":
        examples, start = calibration_passages(tokenizer, settings.data, settings.passages, settings.seed)
        inputs.update(examples=examples, pad_id=pad_token_id(tokenizer))
        return inputs, {"passages": settings.passages, "seed": settings.seed,
                        "data": f"LAMBADA test passages after the first {start:,}"}
    return inputs, {"windows": settings.windows, "length": settings.length, "seed": settings.seed,
                    "data": "WikiText-2 raw test split"}


def calibration_passages(tokenizer, folder, count: int, seed: int) -> tuple[list, int]:
    """`count` LAMBADA passages drawn with `seed` from those after the first 1,000 (after the first half of
    a shorter file), so an `eval --limit` subset of up to 1,000 passages stays held out; and where the
    drawn-from range starts."""
    pairs = data.read_lambada(folder)
    start = LAMBADA_HELD_OUT if len(pairs) >= 2 * LAMBADA_HELD_OUT else len(pairs) // 2
    pool = range(start, len(pairs))
    if count < 1 or count > len(pool):
        raise UserError(f"calibration: cannot draw {count} LAMBADA passages from the {len(pool)} after "
                        f"passage {start} of {len(pairs)}")
    picks = sorted(random.Random(seed).sample(pool, count))
    return lambada_examples(tokenizer, [pairs[i] for i in picks]), start


def _first_difference(mask: SkipMask, base: SkipMask | None, num_layers: int) -> int:
    base = base or SkipMask()
    changed = (set(mask.attention) ^ set(base.attention)) | (set(mask.mlp) ^ set(base.mlp))
    return min(changed, default=num_layers)


def greedy(cal, pool: list[Candidate], budget: Budget, rank_by: str, advance=None) -> tuple[list, list]:
    chosen: list[Candidate] = []
    steps: list[dict] = []
    while pool and (budget.count is None or len(chosen) < budget.count):
        trials = cal.trials(chosen, pool, advance)
        best = min(pool, key=lambda c: (trials[c][rank_by], c[1], c[0]))
        if not budget.allows(trials[best]):
            break
        chosen.append(best)
        pool = [c for c in pool if c != best]
        steps.append({"removed": list(best), **trials[best]})
    return chosen, steps


def oneshot(cal, pool: list[Candidate], budget: Budget, scores, advance=None) -> tuple[list, list]:
    order = sorted(pool, key=lambda c: (scores.importance(c[0], c[1]), c[1], c[0]))
    chosen: list[Candidate] = []
    steps: list[dict] = []
    for cand in order:
        if budget.count is not None and len(chosen) >= budget.count:
            break
        metrics = cal.measure(mask_of(chosen + [cand]))
        if advance:
            advance(1)
        if not budget.allows(metrics):
            break
        chosen.append(cand)
        steps.append({"removed": list(cand), "importance": scores.importance(*cand), **metrics})
    return chosen, steps


def search(model, tokenizer, settings: SearchSettings, console=None, config=None, remote=None) -> dict:
    """Run the search; returns the mask, the steps with their calibration metrics, and the settings.
    `remote(inputs)`: a calibrator on other processes (cluster.RayCalibrator; `model` may then be None and
    `config` gives the layer count) instead of one on `model` here. Either way the picks happen here."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    n = (config or model.config).num_hidden_layers
    pool = candidates(settings.kind, n, settings.keep_final_layer)
    if settings.budget.count is not None and settings.budget.count > len(pool):
        raise UserError(f"--count {settings.budget.count}: only {len(pool)} candidates ({settings.kind}, "
                        f"final layer {'kept' if settings.keep_final_layer else 'allowed'})")
    inputs, calibration = calibration_inputs(tokenizer, settings)
    if remote is None:
        worker = CalibrationWorker(model, inputs)
        cal, scores = worker.cal, worker.importance()
    else:
        cal = remote(inputs)
        scores = cal.importance()
    with progress_bar(console) as progress:
        if settings.strategy == "greedy":
            total = sum(len(pool) - s for s in range(settings.budget.count or len(pool)))
            task = progress.add_task(f"greedy search ({settings.budget.describe()})", total=total)
            label = progress.tasks[task].description
            status = getattr(cal, "status", None)  # Ray: candidates running on how many workers

            def advance(k):
                progress.update(task, advance=k, description=f"{label}, {status()}" if status else label)

            chosen, steps = greedy(cal, list(pool), settings.budget, RANK_BY[settings.metric], advance)
            progress.update(task, total=progress.tasks[task].completed)  # a budget may stop it early
        elif settings.strategy == "oneshot":
            task = progress.add_task(f"one-shot search ({settings.budget.describe()})",
                                     total=settings.budget.count or len(pool))
            chosen, steps = oneshot(cal, list(pool), settings.budget, scores, lambda k: progress.advance(task, k))
        else:
            raise UserError(f"--strategy {settings.strategy!r}: choose greedy or oneshot")
    mask = mask_of(chosen)
    final = steps[-1] if steps else cal.measure(mask)
    return {"mask": mask, "chosen": chosen, "steps": steps, "final": final, "importance": scores.as_dict(),
            "calibration": {"metric": settings.metric, **calibration},
            "evaluations": cal.evaluations, "seconds": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------- the emitted recipe

def write_recipe(source: Path, out: Path, result: dict, settings: SearchSettings, config, argv: list[str]) -> None:
    """The source recipe with the found mask, and the search's evidence in comments."""
    import yaml

    raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    model = raw.get("model", {})
    for key in ("path", "gguf"):  # keep relative model paths pointing at the same place
        value = model.get(key)
        if isinstance(value, str) and not Path(value).expanduser().is_absolute():
            model[key] = os.path.relpath((source.parent / value).resolve(), out.parent.resolve())
    raw.pop("name", None)
    mask = result["mask"]
    raw["skip"] = {"attention": list(mask.attention), "mlp": list(mask.mlp)}
    raw["description"] = (f"the model of {source.name}, mask found by export-skip search: attention "
                          f"{list(mask.attention) or 'none'}, MLP {list(mask.mlp) or 'none'}")
    final, cal = result["final"], result["calibration"]
    speed = ", ".join(f"{predicted_decode_speedup(config, mask, ctx):.3f}x at {ctx}" for ctx in (128, 512, 2048))
    how = (f"{cal['passages']} {cal['data']}" if "passages" in cal
           else f"{cal['windows']} windows x {cal['length']} tokens of the {cal['data']}")
    lines = [
        f"# export-skip {out}",
        f"# Written by: export-skip {' '.join(argv)}",
        f"# Strategy {settings.strategy}, candidates {settings.kind}, budget: {settings.budget.describe()};",
        f"# calibration ({cal['metric']}, seed {cal['seed']}): {how}.",
        "# Removed, in order (calibration metrics after each removal):",
        *[f"#   {s['removed'][0]} {s['removed'][1]}: {_metrics_text(s)}" for s in result["steps"]],
        f"# Measured on calibration: {_metrics_text(final, full=True)}.",
        f"# Predicted decode speedup (cost model, exporter/cost.py; batch 1, fp32): {speed}.",
        "# Held-out numbers: export-skip eval on this file.",
        *_importance_lines(result.get("importance")),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n" + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True, default_flow_style=None, width=110), encoding="utf-8")


def _metrics_text(m: dict, full: bool = False) -> str:
    if "lambada_accuracy" in m:
        acc = (f"{m['lambada_accuracy_full']:.1%} -> " if full else "") + f"{m['lambada_accuracy']:.1%}"
        nll = (f"{m['lambada_nll_full']:.3f} -> " if full else "") + f"{m['lambada_nll']:.3f}"
        return f"LAMBADA accuracy {acc} ({-m['lambada_drop']:+.1f} points), final-word NLL {nll}"
    ppl = (f"{m['ppl_full']:.2f} -> " if full else "") + f"{m['ppl']:.2f}"
    return f"KL {m['kl']:.4f}, perplexity {ppl} ({m['ppl_increase_pct']:+.1f}%), top-1 agreement {m['top1_agreement']:.1%}"


def _importance_lines(imp: dict | None) -> list[str]:
    """The one-shot scores, for comparison: LLM-Drop's attention ranking and Gromov et al.'s best runs."""
    if not imp:
        return []
    cos = imp["attention_cosine"]
    top = sorted(range(len(cos)), key=lambda i: (-cos[i], i))[:8]
    lines = ["# LLM-Drop attention cosine, most redundant first: " + ", ".join(f"{i} ({cos[i]:.3f})" for i in top)]
    runs = []
    for n in (1, 2, 4, 8):
        dist = imp["angular_distance"].get(str(n))
        if dist:
            start = min(range(len(dist)), key=lambda l: (dist[l], l))
            runs.append(f"{n} blocks from layer {start} (d={dist[start]:.3f})")
    return lines + ["# Gromov angular distance, best run of: " + "; ".join(runs)]


def run_search(recipe, source: Path, settings: SearchSettings, out: Path, console=None, argv=None,
               ray: RayOptions | None = None) -> dict:
    config = load_config(recipe.model)

    data.data_file(settings.data, data.WIKITEXT)  # fail before loading the model
    if settings.metric == "lambada":
        data.data_file(settings.data, data.LAMBADA)
    if ray is None:
        model, tokenizer = load_model(recipe.model)
        result = search(model, tokenizer, settings, console)
    else:
        result = _search_on_ray(recipe, settings, config, ray, console)
    write_recipe(source, out, result, settings, config, argv or ["search", str(source)])
    load_recipe(out)  # the emitted recipe must load
    if console is not None:
        mask = result["mask"]
        console.print(f"mask: attention {list(mask.attention) or 'none'}, MLP {list(mask.mlp) or 'none'}; "
                      f"calibration {_metrics_text(result['final'], full=True)} "
                      f"({result['evaluations']} evaluations, {result['seconds']:.0f} s)")
    return result


@dataclass(frozen=True)
class RayOptions:
    """`search --ray`: where the candidates are scored (exporter/cluster.py)."""

    address: str = "auto"  # a cluster address, `auto` (this machine's cluster, else a new local one) or `local`
    workers: int | None = None  # default: the cluster's CPUs / `cpus`, at most one per candidate of the first step
    cpus: float = 1  # CPUs each worker declares (torch runs that many threads)


def _search_on_ray(recipe, settings: SearchSettings, config, options: RayOptions, console) -> dict:
    """The same search with every step's candidates scored on Ray actors; the driver holds only the tokenizer."""
    tokenizer = load_tokenizer(recipe.model)
    cluster = connect(options.address)
    actors: list[RayCalibrator] = []
    try:
        first_step = len(candidates(settings.kind, config.num_hidden_layers, settings.keep_final_layer))
        cpus = sum(n.get("CPU", 0) for n in alive_nodes())
        workers = min(options.workers or max(1, int(cpus // options.cpus)), first_step)
        if workers * options.cpus > cpus:  # Ray would wait for CPUs that are not there
            raise UserError(f"--workers {workers} x --worker-cpus {options.cpus:g} needs {workers * options.cpus:g} "
                            f"CPUs; the cluster has {cpus:g}")
        memory = memory_estimate(kept_parameters(config, SkipMask()), itemsize(recipe.model.dtype))
        resources = Resources(num_cpus=options.cpus, memory=memory)
        if console is not None:
            console.print(f"Ray cluster: {cluster}; {workers} search worker(s) of {options.cpus:g} CPU(s) and "
                          f"{memory / 2**30:.1f} GiB each")

        def remote(inputs: dict) -> RayCalibrator:
            actors.append(RayCalibrator(CalibrationWorker, (recipe.model, inputs), workers, resources,
                                        config.num_hidden_layers))
            if console is not None:
                console.print(f"{workers} search worker(s) ready on {actors[-1].nodes} Ray node(s), each with the model loaded")
            return actors[-1]

        return search(None, tokenizer, settings, console, config=config, remote=remote)
    finally:
        for cal in actors:
            cal.close()
        disconnect()
