"""The found mask against other masks on data the search did not see, every number with its standard error.

Held out: the first WikiText-2 windows (within the first half of the test split's tokens; the search draws
its windows from the second half) and the first LAMBADA passages (up to 1,000; the search draws after them).
All masks are scored in one pass over the same batches (`quality.TorchScorer`), so each can be compared
with the searched one paired: the difference, its bootstrap SE, and whether the two are distinguishable.
"""

from __future__ import annotations

from pathlib import Path

from exporter.quality import data
from exporter.quality.calibration import LAMBADA_HELD_OUT
from exporter.errors import UserError
from exporter.quality.importance import held_out_tokens
from exporter.mask import SkipMask
from exporter.model.prompts import encode_plain
from exporter.quality.metrics import Settings, TorchScorer, compare, evaluate

SEARCHED = "searched"


def check_held_out(tokenizer, folder: Path, windows: int, window: int, passages: int) -> None:
    """Refuse held-out sets that would overlap the search's calibration data."""
    if windows:
        total = len(encode_plain(tokenizer, data.read_wikitext(folder)))
        if windows * window > held_out_tokens(total):
            raise UserError(f"--held-out-windows {windows} x {window} tokens reaches past the first half of WikiText-2 "
                            f"({held_out_tokens(total):,} tokens), where the search calibrates")
    if passages > LAMBADA_HELD_OUT:
        raise UserError(f"--held-out-passages {passages}: at most {LAMBADA_HELD_OUT:,} (the search calibrates after them)")


def evaluate_held_out(model, tokenizer, masks: dict[str, SkipMask], folder: Path, windows: int, window: int,
                      passages: int, console=None) -> dict:
    """eval.json-style result for every mask (and the full model) on the held-out sets, plus each mask's
    paired comparison with SEARCHED (when present) under "vs_searched"."""
    check_held_out(tokenizer, folder, windows, window, passages)
    tasks = tuple(t for t, n in (("wikitext", windows), ("lambada", passages)) if n)
    settings = Settings(data=folder, window=window, windows=windows or None, passages=passages or None, tasks=tasks)
    result = evaluate(TorchScorer(model, masks), tokenizer, settings, console)
    result["masks"] = {name: m.describe() for name, m in masks.items()}
    if SEARCHED in masks:
        result["vs_searched"] = {name: compare(result, name, SEARCHED) for name in result["models"] if name != SEARCHED}
    return result


def held_out_lines(result: dict, names: dict[str, str] | None = None) -> list[str]:
    """Recipe comment lines: each model's held-out numbers ± SE, and whether it differs from the searched mask."""
    wiki, lamb = result.get("wikitext"), result.get("lambada")
    what = []
    if wiki:
        what.append(f"first {wiki['windows']} WikiText-2 windows of {result['window']} tokens")
    if lamb:
        what.append(f"first {lamb['passages']} LAMBADA passages")
    lines = [f"# Held out ({' and '.join(what)}; ± one bootstrap SE; paired differences vs the searched mask):"]
    for name, m in result["models"].items():
        parts = []
        if "kl" in m:
            parts.append(f"KL {m['kl']:.4f} ± {m['kl_se']:.4f}")
        if "perplexity" in m:
            parts.append(f"perplexity {m['perplexity']:.2f} ± {m['perplexity_se']:.2f}")
        if "lambada_accuracy" in m:
            parts.append(f"LAMBADA {m['lambada_accuracy']:.1%} ± {m['lambada_accuracy_se']:.1%}")
        vs = result.get("vs_searched", {}).get(name, {})
        diffs = [f"{metric} {d['difference']:+.4g} ± {d['se']:.2g} ({'differs' if d['distinguishable'] else 'not distinguishable'})"
                 for metric, d in vs.items()]
        label = (names or {}).get(name, name)
        lines.append(f"#   {label}: " + ", ".join(parts) + (f"; vs searched: {'; '.join(diffs)}" if diffs else ""))
    return lines


def comparison_masks(searched: SkipMask, baselines: dict[str, list], mask_of) -> dict[str, SkipMask]:
    """The searched mask and the one-shot masks of its size, by name (a baseline equal to another is kept:
    the reader sees which rankings agree)."""
    return {SEARCHED: searched, **{name: mask_of(c) for name, c in baselines.items()}}

