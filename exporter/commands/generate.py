"""`export-skip generate DIR --prompt ...`: stream greedy text from an artifact, to see it speak.

Runs the artifact's model.opt.onnx (model.onnx where there is none, or `--onnx`) in ONNX Runtime
(`OrtRunner`, the runner the parity checks use) or,
with `--runtime genai`, through onnxruntime-genai and the folder's genai_config.json. The tokenizer
comes from the folder's tokenizer files; random-weight test models have none and use the same byte
tokenizer the pipeline used (their text is token numbers, not words).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from exporter.commands.options import add_folder
from exporter.model import prompts as P
from exporter.errors import UserError
from exporter.checks.manifest import MANIFEST, read_manifest
from exporter.model.prompts import ByteTokenizer, decode


def load_tokenizer(folder: Path, manifest: dict | None):
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    model = ((manifest or {}).get("recipe") or {}).get("resolved", {}).get("model", {})
    if model.get("config"):
        return ByteTokenizer(int(model["config"].get("vocab_size") or 32000))
    fallback = ((manifest or {}).get("model") or {}).get("tokenizer")
    if fallback:  # exported with the byte tokenizer (its folder had none): the same one here
        return ByteTokenizer(int(fallback["vocab_size"]), fallback=fallback["fallback"])
    raise UserError(f"{folder}: no tokenizer files here (re-run export-skip with this version to write them)")


def _manifest(folder: Path) -> dict | None:
    return read_manifest(folder) if (folder / MANIFEST).is_file() else None


def _onnx_file(folder: Path, manifest: dict | None, name: str | None) -> Path:
    """The graph to run: `name`, else the int4 graph, else the optimized graph when the run wrote one (faster on CPU, same
    contract and parity checks as the plain one), else model.onnx."""
    graphs = list((manifest or {}).get("onnx") or [])
    preferred = [g for g in ("int4/model.onnx", "model.opt.onnx", "model.onnx") if g in graphs] + graphs + ["model.onnx"]
    path = folder / (name or preferred[0])
    if not path.is_file():
        raise UserError(f"{path}: no ONNX graph here (give an artifact folder written by export-skip)")
    return path


class _Stream:
    """Prints the text of a growing token list as it grows (decoding all of it: merges stay correct)."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out, self.tokens, self.shown = tokenizer, out, [], ""

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = decode(self.tokenizer, self.tokens)
        if text.startswith(self.shown) and not text.endswith("\ufffd"):  # wait out half a UTF-8 character
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text


def ort_greedy(onnx_path: Path, input_ids: list[int], max_new_tokens: int, eos: int | None, on_token=None,
               threads: int | None = None) -> list[int]:
    """Greedy continuation in ONNX Runtime; stops after eos (included) or max_new_tokens."""
    import torch

    from exporter.backends.ort import OrtRunner  # torch, onnxruntime: imported when a graph runs

    runner = OrtRunner(onnx_path, threads=threads)
    ids = torch.tensor([input_ids], dtype=torch.long)
    logits = runner.prefill(ids, torch.ones_like(ids))
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token == eos or len(tokens) == max_new_tokens:
            break
        logits = runner.step(torch.tensor([[token]], dtype=torch.long))
    return tokens


def generate(folder: Path, prompt: str, max_new_tokens: int = 64, chat: bool | None = None,
             runtime: str = "ort", onnx_file: str | None = None, out=sys.stdout) -> list[int]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (give an artifact folder, e.g. artifacts/smollm2-135m)")
    manifest = _manifest(folder)
    tokenizer = load_tokenizer(folder, manifest)
    if chat is None:  # the recipe's own choice (instruct models are validated with their chat template)
        chat = bool(((manifest or {}).get("recipe") or {}).get("resolved", {}).get("validate", {}).get("chat"))
    input_ids = P.encode(tokenizer, prompt, chat)
    stream = _Stream(tokenizer, out)
    if runtime == "genai":
        from exporter.backends.genai import genai_greedy

        tokens = genai_greedy(folder, input_ids, max_new_tokens, on_token=stream)
    else:
        eos = getattr(tokenizer, "eos_token_id", None)
        tokens = ort_greedy(_onnx_file(folder, manifest, onnx_file), input_ids, max_new_tokens, eos, on_token=stream)
    out.write("\n")
    out.flush()
    return tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_folder(parser)
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt text")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap the prompt in the chat template (default: what the recipe validated with)")
    parser.add_argument("--runtime", choices=("ort", "genai"), default="ort",
                        help="ONNX Runtime via export-skip's runner, or onnxruntime-genai (extra [genai])")
    parser.add_argument("--onnx", metavar="FILE",
                        help="graph file inside the folder (default: model.opt.onnx where the run wrote one, else model.onnx)")


def run(args: argparse.Namespace, console) -> int:
    generate(args.folder, args.prompt, args.max_new_tokens, args.chat, args.runtime, args.onnx)
    return 0
