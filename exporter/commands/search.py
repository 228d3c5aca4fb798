"""`export-skip search RECIPE`: find the mask closest to the full model that meets a quality budget, and write
it as a recipe whose comments hold the evidence (greedy steps, swaps, calibration and held-out numbers).

The search itself is exporter/quality/search.py (imported when the command runs: it needs torch); this module
holds its arguments, the candidates' dispatch to Ray actors with --ray (exporter/cluster.py), and the recipe.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from exporter.cluster import RayCalibrator, Resources, alive_nodes, connect, disconnect, memory_estimate
from exporter.commands.options import add_data, add_ray, add_recipe, positive
from exporter.cost import kept_parameters, predicted_decode_speedup
from exporter.dtypes import itemsize
from exporter.errors import UserError
from exporter.mask import SkipMask
from exporter.model.source import load_config, load_model, load_tokenizer
from exporter.quality import data
from exporter.quality.constraints import Budget
from exporter.recipe import load_recipe


# (flag, type, default, help): the sizes of the calibration and held-out sets, and the draw's seed
COUNTS = (
    ("--calibration-windows", int, 4, "WikiText windows to calibrate on (default 4)"),
    ("--calibration-length", int, 256, "tokens per calibration window (default 256)"),
    ("--calibration-passages", int, 200, "LAMBADA passages to calibrate on, drawn after the first 1,000 (default 200)"),
    ("--calibration-answer-tokens", positive, 64, "tokens of each --calibration-prompts answer (default 64)"),
    ("--held-out-windows", int, 0, "score the result against the one-shot masks on the first N WikiText-2 windows "
                                   "(default 0: no)"),
    ("--held-out-window", positive, 512, "tokens per held-out window (default 512)"),
    ("--held-out-passages", int, 0, "... and on the first N LAMBADA passages (at most 1,000; default 0: no)"),
    ("--seed", int, 0, "which calibration windows/passages are drawn (default 0)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe(parser)
    parser.add_argument("--strategy", choices=("local", "greedy", "oneshot"), default="local",
                        help="local (default): greedy, then swaps seeded by greedy and every one-shot ranking; "
                             "greedy: remove the least harmful sub-layer, re-measure, repeat; oneshot: by LLM-Drop cosine")
    parser.add_argument("--kind", choices=("attention", "mlp", "block", "any"), default="attention",
                        help="candidate sub-layers (default attention; any = attention and MLP separately)")
    budget = parser.add_argument_group("budget (any combination; at least one)")
    budget.add_argument("--max-kl", type=float, metavar="X",
                        help="largest mean KL vs the full model on the calibration windows")
    budget.add_argument("--max-ppl-increase", type=float, metavar="PCT",
                        help="largest calibration perplexity increase, in percent")
    budget.add_argument("--max-lambada-drop", type=float, metavar="POINTS",
                        help="largest LAMBADA last-word accuracy drop on calibration passages (after the first 1,000), in points")
    budget.add_argument("--count", type=int, metavar="N",
                        help="remove exactly this many candidates (default: as many as the rest allows)")
    budget.add_argument("--match-tokens", type=int, metavar="N",
                        help="greedy answers to the recipe's validation prompts must equal the full model's for N tokens")
    parser.add_argument("--metric", choices=("kl", "ppl", "lambada"), default="kl",
                        help="what the search minimises (default kl): KL or perplexity on the calibration windows, "
                             "or the final-word NLL of LAMBADA calibration passages")
    parser.add_argument("--budget-evals", type=positive, metavar="N",
                        help="stop after this many mask evaluations (best so far wins)")
    add_data(parser)
    parser.add_argument("--calibration-prompts", type=Path, metavar="FILE",
                        help="one prompt a line: the full model's chat answers to them join the calibration windows")
    for flag, kind, default, text in COUNTS:
        parser.add_argument(flag, type=kind, default=default, metavar="N", help=text)
    parser.add_argument("--include-final-layer", action="store_true", help="allow removing from the final layer")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="recipe to write (default: RECIPE's folder, <stem>-searched.yaml)")
    add_ray(parser)
    parser.add_argument("--workers", type=positive, metavar="N",
                        help="--ray: search workers (default: the cluster's CPUs / --worker-cpus)")
    parser.add_argument("--worker-cpus", type=float, default=1, metavar="N",
                        help="--ray: CPUs each worker declares (default 1)")


def run(args: argparse.Namespace, console) -> int:
    from exporter.quality.search import SearchSettings

    recipe = load_recipe(args.recipe)
    ray = None if args.ray is None else RayOptions(args.ray, args.workers, args.worker_cpus)
    settings = SearchSettings(
        budget=Budget(max_kl=args.max_kl, max_ppl_increase=args.max_ppl_increase,
                      max_lambada_drop=args.max_lambada_drop, count=args.count, match_tokens=args.match_tokens),
        strategy=args.strategy, kind=args.kind, data=data.data_dir(args.data), windows=args.calibration_windows,
        length=args.calibration_length, seed=args.seed, keep_final_layer=not args.include_final_layer,
        metric=args.metric, passages=args.calibration_passages, budget_evals=args.budget_evals,
        chat_prompts=read_prompts(args.calibration_prompts) if args.calibration_prompts else (),
        chat_tokens=args.calibration_answer_tokens, source_prompts=str(args.calibration_prompts or "") or None,
        answer_prompts=tuple(recipe.validation.prompts), chat=recipe.validation.chat,
        held_out_windows=args.held_out_windows, held_out_window=args.held_out_window,
        held_out_passages=args.held_out_passages)
    out = args.out or args.recipe.with_name(f"{args.recipe.stem}-searched.yaml")
    # where the candidates were scored does not change the result: the recipe records the search without it
    recorded = _without(args.argv, {"--ray": args.ray, "--workers": None, "--worker-cpus": None})
    run_search(recipe, args.recipe, settings, out, console, argv=["search", *recorded], ray=ray)
    console.print(f"wrote {out}")
    return 0


def _without(argv: list[str], options: dict[str, str | None]) -> list[str]:
    """`argv` less the given options and their values: `options` maps each to the value it parsed when that value
    is optional (`--ray`, `--ray auto`, `--ray=auto`), or None when the option always takes the next token."""
    out, skip = [], False
    for i, token in enumerate(argv):
        if skip:
            skip = False
            continue
        flag = token.split("=", 1)[0]
        if flag in options:
            optional = options[flag]
            skip = "=" not in token and i + 1 < len(argv) and (optional is None or argv[i + 1] == optional)
            continue
        out.append(token)
    return out


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


def run_search(recipe, source: Path, settings, out: Path, console=None, argv=None,
               ray: RayOptions | None = None) -> dict:
    """The search (here, or with `ray` on Ray actors), its held-out scores, and the recipe it writes to `out`."""
    from exporter.quality.calibration import mask_of
    from exporter.quality.heldout import SEARCHED, check_held_out, comparison_masks, evaluate_held_out, held_out_lines
    from exporter.quality.search import search

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


def _search_on_ray(recipe, settings, config, options: RayOptions, console) -> dict:
    """The same search with every step's candidates scored on Ray actors; the driver holds only the tokenizer."""
    from exporter.quality.calibration import CalibrationWorker, candidates
    from exporter.quality.search import search

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


# ---------------------------------------------------------------- the emitted recipe

def write_recipe(source: Path, out: Path, result: dict, settings, config, argv: list[str]) -> None:
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
