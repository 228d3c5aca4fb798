"""`export-skip search`: the mask closest to the full model that meets the user's constraints, as a recipe.

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

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from exporter.quality import data
from exporter.quality.calibration import CalibrationWorker, calibration_passages, candidates, mask_of
from exporter.cluster import RayCalibrator, Resources, alive_nodes, connect, disconnect, memory_estimate
from exporter.quality.constraints import Budget
from exporter.cost import kept_parameters, predicted_decode_speedup
from exporter.dtypes import itemsize
from exporter.errors import UserError
from exporter.quality.heldout import SEARCHED, check_held_out, comparison_masks, evaluate_held_out, held_out_lines
from exporter.quality.importance import calibration_windows
from exporter.mask import SkipMask
from exporter.model.source import load_config, load_model, load_tokenizer
from exporter.progress import progress_bar
from exporter.model.prompts import encode, pad_token_id
from exporter.recipe import load_recipe
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


def read_prompts(path: Path) -> tuple[str, ...]:
    """One prompt a line (blank lines skipped); a missing or empty file is a one-line error."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--calibration-prompts {path}: cannot read it ({exc.__class__.__name__})") from None
    prompts = tuple(line.strip() for line in lines if line.strip())
    if not prompts:
        raise UserError(f"--calibration-prompts {path}: no prompts in it (one a line)")
    return prompts


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
    how = "; ".join(f"{cal[key]}" for key in ("chat", "lambada") if key in cal)
    how = f"{cal['windows']} windows x {cal['length']} tokens of the {cal['data']}" + (f"; {how}" if how else "")
    # no evaluation count or time here: Ray workers count their own base streams, and the recipe must not depend
    # on where the candidates were scored (the console prints both)
    evals = " Stopped by --budget-evals: the best mask found by then." if result.get("stopped_by_budget_evals") else ""
    lines = [
        f"# export-skip {out}",
        f"# Written by: export-skip {' '.join(argv)}",
        f"# Strategy {settings.strategy}, candidates {settings.kind}; minimises {cal['metric']} subject to: "
        f"{settings.budget.describe()}.{evals}",
        f"# Calibration (seed {cal['seed']}): {how}.",
        *_record_lines(result),
        f"# Measured on calibration: {_metrics_text(final, full=True)}.",
        *[f"# Same size, {name} {_candidates_text(c)}: {_metrics_text(result['baseline_metrics'][name])}"
          for name, c in result.get("baselines", {}).items()],
        f"# Predicted decode speedup (cost model, exporter/cost.py; batch 1, fp32): {speed}.",
        *(result["held_out"]["lines"] if result.get("held_out") else
          ["# Held-out numbers: search --held-out-windows N --held-out-passages N, or export-skip eval on this file."]),
        *_importance_lines(result.get("importance")),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n" + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True, default_flow_style=None, width=110), encoding="utf-8")


def _candidates_text(chosen) -> str:
    return ", ".join(f"{k} {i}" for k, i in sorted(chosen, key=lambda c: (c[1], c[0])))


def _record_lines(result: dict) -> list[str]:
    """The greedy steps, then each seed's local swaps, in the order they happened."""
    lines = ["# Greedy, in order (calibration metrics after each removal):"] if result["steps"] else []
    lines += [f"#   {s['removed'][0]} {s['removed'][1]}: {_metrics_text(s)}" for s in result["steps"]]
    for seed in result.get("seeds", []):
        head = f"# Swaps from {seed['seed']} ({_candidates_text(seed['start'])}; {_metrics_text(seed['start_metrics'])})"
        if seed.get("infeasible"):
            lines.append(head + ": breaks a constraint, not searched")
            continue
        lines.append(head + ":" + ("" if seed["swaps"] else " none improves"))
        lines += [f"#   {s['out'][0]} {s['out'][1]} back, {s['in'][0]} {s['in'][1]} out: {_metrics_text(s)}"
                  for s in seed["swaps"]]
    return lines


def _metrics_text(m: dict, full: bool = False) -> str:
    parts = []
    if "kl" in m:
        ppl = (f"{m['ppl_full']:.2f} -> " if full else "") + f"{m['ppl']:.2f}"
        parts.append(f"KL {m['kl']:.4f}, perplexity {ppl} ({m['ppl_increase_pct']:+.1f}%), "
                     f"top-1 agreement {m['top1_agreement']:.1%}")
    if "lambada_accuracy" in m:
        acc = (f"{m['lambada_accuracy_full']:.1%} -> " if full else "") + f"{m['lambada_accuracy']:.1%}"
        nll = (f"{m['lambada_nll_full']:.3f} -> " if full else "") + f"{m['lambada_nll']:.3f}"
        parts.append(f"LAMBADA accuracy {acc} ({-m['lambada_drop']:+.1f} points), final-word NLL {nll}")
    if "answers_matched" in m:
        parts.append(f"chat answers match the full model's for {m['answers_matched']} of {m['answers_tokens']} tokens")
    return "; ".join(parts)


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
    if settings.metric == "lambada" or settings.budget.max_lambada_drop is not None or settings.held_out_passages:
        data.data_file(settings.data, data.LAMBADA)
    held_out = settings.held_out_windows or settings.held_out_passages
    model = None
    if ray is None or held_out:
        model, tokenizer = load_model(recipe.model)
        check_held_out(tokenizer, settings.data, settings.held_out_windows, settings.held_out_window,
                       settings.held_out_passages)
    if ray is None:
        result = search(model, tokenizer, settings, console)
    else:
        result = _search_on_ray(recipe, settings, config, ray, console)
    if held_out and result["chosen"]:
        masks = comparison_masks(result["mask"], result["baselines"], mask_of)
        evaluated = evaluate_held_out(model, tokenizer, masks, settings.data, settings.held_out_windows,
                                      settings.held_out_window, settings.held_out_passages, console)
        names = {n: f"{n} ({_candidates_text(result['chosen'] if n == SEARCHED else result['baselines'][n])})"
                 for n in masks}
        result["held_out"] = {"result": evaluated, "lines": held_out_lines(evaluated, names)}
    write_recipe(source, out, result, settings, config, argv or ["search", str(source)])
    load_recipe(out)  # the emitted recipe must load
    if console is not None:
        mask = result["mask"]
        console.print(f"mask: attention {list(mask.attention) or 'none'}, MLP {list(mask.mlp) or 'none'}; "
                      f"calibration {_metrics_text(result['final'], full=True)} "
                      f"({result['evaluations']} evaluations, {result['seconds']:.0f} s)")
        for line in result.get("held_out", {}).get("lines", []):
            console.print(line[2:], highlight=False)
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
