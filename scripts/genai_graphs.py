"""onnxruntime-genai on an artifact's two graphs: model.onnx vs model.opt.onnx, same prompt, interleaved.

    .venv/bin/python scripts/genai_graphs.py ARTIFACT_DIR [TOKENS] [ROUNDS] [PEER_DIR]

Each graph gets a temporary folder of links to the artifact's files with genai_config.json's decoder
filename set to it; greedy tokens are compared, then ms per generated token (prompt excluded) is timed
ROUNDS times per graph, in an order that rotates each round. onnxruntime-genai's default session settings.
PEER_DIR (e.g. artifacts/peers/genai-fp32, the builder's folder) is timed in the same rounds as is; its
tokens are not compared (it is the unskipped model).
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime_genai as og

PROMPT = "The capital of France is"


def linked_folder(artifact: Path, folder: Path, edit) -> Path:
    """`folder` (created) holding links to the artifact's files and a copy of its genai_config.json
    changed by `edit(config)`: one artifact, run by genai with another setting."""
    folder.mkdir()
    for f in artifact.iterdir():
        if f.name != "genai_config.json":
            (folder / f.name).symlink_to(f.resolve())
    config = json.loads((artifact / "genai_config.json").read_text())
    edit(config)
    (folder / "genai_config.json").write_text(json.dumps(config))
    return folder


def folder_for(artifact: Path, graph: str, root: Path) -> Path:
    return linked_folder(artifact, root / graph.replace(".", "_"),
                         lambda config: config["model"]["decoder"].update(filename=graph))


def generate(model, tokenizer, tokens: int) -> tuple[list[int], float]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=512, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(tokenizer.encode(PROMPT))
    out, start = [], time.perf_counter()
    for _ in range(tokens):
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out, (time.perf_counter() - start) / tokens


def main(artifact: Path, tokens: int, rounds: int, peer: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for graph in ("model.onnx", "model.opt.onnx"):
            model = og.Model(str(folder_for(artifact, graph, Path(tmp))))
            models[graph] = model, og.Tokenizer(model)
        if peer is not None:
            model = og.Model(str(peer))
            models["peer"] = model, og.Tokenizer(model)
        first = {g: generate(*m, tokens)[0] for g, m in models.items()}  # also a warm-up
        same = first["model.onnx"] == first["model.opt.onnx"]
        print(f"greedy tokens identical over {tokens}: {same}")
        print("text:", repr(models["model.onnx"][1].decode(first["model.opt.onnx"])[:120]))
        times = {g: [] for g in models}
        for r in range(rounds):
            names = list(models)
            for g in names[r % len(names):] + names[:r % len(names)]:
                times[g].append(generate(*models[g], tokens)[1] * 1e3)
        med = {g: statistics.median(t) for g, t in times.items()}
        for g, m in med.items():
            print(f"{g}: {m:.2f} ms/token median ({min(times[g]):.2f}-{max(times[g]):.2f})")
        print(f"model.opt.onnx / model.onnx: {med['model.opt.onnx'] / med['model.onnx']:.3f}")
        if peer is not None:
            print(f"model.opt.onnx / peer: {med['model.opt.onnx'] / med['peer']:.3f}")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 48,
         int(sys.argv[3]) if len(sys.argv) > 3 else 8, Path(sys.argv[4]) if len(sys.argv) > 4 else None)
