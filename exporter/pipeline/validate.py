"""Parity of every exported graph (the model's precision and each half precision) in ONNX Runtime against the
recorded masked reference (reference.npz), with no PyTorch model in memory; half graphs also report whether
their free-running greedy tokens match the reference's. A graph ONNX Runtime's CPU provider has no kernel for
(bf16) is recorded as not run, naming the op, never as passed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from exporter.model import prompts
from exporter.backends.ort import OrtRunner
from exporter.onnx.session import ort_unsupported_op
from exporter.checks.parity import check_recorded, greedy_tokens
from exporter.dtypes import PRECISION_OF
from exporter.onnx.contract import data_path
from exporter.pipeline.results import Validated
from exporter.pipeline.settings import ReferenceSettings, ValidateSettings
from exporter.recipe import Validate
from exporter.checks.reference import REFERENCE_FILE, load_reference


# ONNX Runtime's CPU provider keeps more than a half graph's own bytes resident: on Mistral-7B-shaped fp16
# graphs a parity session held 1.65x (2 layers) to 1.9x (4 layers) the graph's weights (docs/results/scale.md).
# A graph whose session would not fit in the memory available is not checked here: it is recorded as not run,
# with the figures, never as passed.
HALF_SESSION_FACTOR = 2.0
SESSION_HEADROOM = 1 << 30


def session_too_big(path: Path, precision: str) -> str | None:
    """Why a parity session for `path` would not fit in the memory available now, or None."""
    import psutil

    weights = data_path(path).stat().st_size if data_path(path).is_file() else path.stat().st_size
    factor = 1.0 if precision == "fp32" else HALF_SESSION_FACTOR
    need, available = int(weights * factor) + SESSION_HEADROOM, psutil.virtual_memory().available
    if need <= available:
        return None
    return (f"a {precision} session of ONNX Runtime's CPU provider needs about {need / 2**30:.1f} GiB here "
            f"({factor}x the graph's {weights / 2**30:.1f} GiB of weights, measured), {available / 2**30:.1f} GiB "
            "are available; check it on a larger machine with `export-skip verify DIR --parity`")


def validate_stage(v: ValidateSettings, out_dir: Path, graphs: dict[str, Path], own: str) -> Validated:
    """Parity rows per graph and batch, checks not run, and half graphs' greedy agreement; `own` is the precision
    of the recorded reference (the model's)."""
    recorded = load_reference(out_dir / REFERENCE_FILE)
    parity, not_run, greedy = [], [], {}
    for precision, path in graphs.items():
        name = f"onnx:{precision}"
        atol = v.atol if precision == own else v.half_atol
        if (too_big := session_too_big(path, precision)) is not None:
            not_run.append({"check": f"{name} parity in ONNX Runtime (CPU)", "reason": too_big})
            continue
        try:
            runner = OrtRunner(path, check=True)
        except Exception as exc:  # noqa: BLE001 - only a missing kernel is "not run"; anything else is a bug
            op = ort_unsupported_op(exc)
            if op is None:
                raise
            not_run.append({"check": f"{name} parity in ONNX Runtime (CPU)",
                            "reason": f"ONNX Runtime's CPU provider has no kernel for {op}"})
            continue
        parity += check_recorded(recorded, runner, v.decode_steps, atol.prefill, atol.decode, name)
        if precision != own:  # free-running greedy tokens of the first (batch-1) prompt
            first = recorded[0]
            own_tokens = greedy_tokens(runner, torch.from_numpy(first.input_ids),
                                       torch.from_numpy(first.attention_mask), v.decode_steps)[0]
            ref = first.tokens[0].tolist()
            differ = next((i for i, (a, b) in enumerate(zip(own_tokens, ref)) if a != b), None)
            greedy[precision] = {"tokens": len(ref), "identical": differ is None, "first_difference": differ}
        del runner  # one session at a time
    return Validated(parity=parity, not_run=not_run, greedy=greedy)


def validation_batches(v: ReferenceSettings, tokenizer) -> list[tuple[list[str], tuple]]:
    """(texts, (input_ids, attention_mask)): the first prompt alone, then a left-padded batch of 2."""
    batches = [[v.prompts[0]]]
    if v.padded_batch:
        second = v.prompts[1] if len(v.prompts) > 1 else " ".join(v.prompts[0].split()[: max(1, len(v.prompts[0].split()) // 2)])
        batches.append([v.prompts[0], second])
    out = []
    for texts in batches:
        ids, attn = prompts.left_padded(tokenizer, texts, v.chat)
        if attn.all() and len(texts) > 1:  # equal lengths: drop a token from row 1 so padding is exercised
            ids, attn = ids.clone(), attn.clone()
            ids[1, 1:], attn[1, 0] = ids[1, :-1].clone(), 0
        out.append((texts, (ids, attn)))
    return out


def verify_parity(folder: Path, manifest: dict) -> dict:
    """`export-skip verify DIR --parity`: every graph the manifest lists (plain, each half precision, optimized)
    checked in ONNX Runtime against the folder's recorded reference, with the folder's own recipe tolerances:
    the same checks as the run, on any machine, without the model."""
    resolved = manifest["recipe"]["resolved"]
    v = Validate.model_validate(resolved["validate"])
    settings = ValidateSettings(decode_steps=v.decode_steps, atol=v.atol, half_atol=v.half_atol)
    own = PRECISION_OF[resolved["model"]["dtype"]]
    graphs = {f["precision"]: folder / f["path"] for f in manifest["files"] if f["kind"] == "onnx"}
    out = validate_stage(settings, folder, graphs, own)
    for f in manifest["files"]:
        if f["kind"] == "onnx-optimized":
            out.parity += check_recorded(load_reference(folder / REFERENCE_FILE), OrtRunner(folder / f["path"], check=True),
                                         v.decode_steps, v.atol.prefill, v.atol.decode, f"onnx:{f['precision']}:optimized")
    return out.to_json()
