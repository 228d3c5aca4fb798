"""Tiny random models built from configs (no downloads), the masks every test parametrises over, and the
fixtures several files share: a data folder, and one tiny artifact built by the real pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import settings

from helpers import TINY_RECIPE

# CI gates a landing, so the generated-input tests draw the same examples on every run there; a bug they can
# find by chance is hunted with `pytest --hypothesis-profile=explore tests/test_reliability.py` (fresh seed).
settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("default")

# Four layers each; every config turns on what its architecture can vary (see exporter/architectures.py).
CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, mlp_bias=True,
                  tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(model_type="mistral", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                    sliding_window=5),  # shorter than the test prompts
    "qwen2": dict(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  use_sliding_window=True, sliding_window=6, max_window_layers=2),  # layers 2-3 slide; q/k/v biases
    "qwen3": dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                  attention_bias=True, tie_word_embeddings=True),  # q/k norms, head_dim != hidden/heads
}

MASKS = {
    "none": dict(),
    "attention": dict(attention=(1, 2)),
    "mlp": dict(mlp=(1, 2)),
    "both": dict(attention=(1,), mlp=(2,)),
    "block": dict(attention=(2,), mlp=(2,)),
}

PROMPTS = ["The capital of France is", "Hi there"]


def build_model(arch: str, seed: int = 0):
    from exporter.model.source import load_model
    from exporter.recipe import ModelSource

    return load_model(ModelSource(config=CONFIGS[arch], seed=seed))


def make_mask(name: str):
    from exporter.mask import SkipMask

    return SkipMask(**MASKS[name])


@pytest.fixture(scope="session")
def tiny_models():
    """arch -> (model, tokenizer), built once per session."""
    return {arch: build_model(arch) for arch in CONFIGS}


# A few lines of WikiText-2 as the raw files have them (CRLF line ends, " @-@ " tokens).
WIKITEXT = ("The tower is 324 metres tall , about the same height as an 81 @-@ storey building .\n"
            " = Valkyria Chronicles III = \n Senjo no Valkyria 3 is a tactical role @-@ playing video game .\n")
LAMBADA_WORDS = ["Paris", "him", "door", "Shane", "dreams", "backup"]


@pytest.fixture(scope="session")
def data_folder(tmp_path_factory) -> Path:
    """A stand-in for EXPORT_SKIP_DATA (read only): wikitext-2-raw/wiki.test.raw and 30 LAMBADA passages,
    passage i ending in LAMBADA_WORDS[i % 6]."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "wikitext-2-raw").mkdir()
    (folder / "lambada").mkdir()
    (folder / "wikitext-2-raw" / "wiki.test.raw").write_bytes((WIKITEXT * 8).replace("\n", "\r\n").encode())
    with open(folder / "lambada" / "lambada_test.jsonl", "w") as fh:
        for i in range(30):
            text = f"Passage {i} says that {'word ' * (i % 5)}the answer was {LAMBADA_WORDS[i % 6]}"
            fh.write(json.dumps({"text": text}) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    """recipes/tiny-llama.yaml run once by the real pipeline (`exporter.pipeline.run.run`): the published folder,
    beside its stage cache. Tests only read it; a test that changes files takes `tiny_artifact_copy`.
    At the end of the session the folder must still match its manifest."""
    from exporter.checks.verify import verify
    from exporter.pipeline.run import run
    from exporter.recipe import load_recipe

    out = tmp_path_factory.mktemp("tiny-artifact") / "tiny-llama"
    report = run(load_recipe(TINY_RECIPE), out)
    assert report.passed, report
    yield out
    assert verify(out) == [], "a test changed the shared tiny artifact (use tiny_artifact_copy)"


@pytest.fixture
def tiny_artifact_copy(tiny_artifact, tmp_path) -> Path:
    """A private copy of the tiny artifact to change, with a copy of its stage cache beside it (so a rerun into
    it resumes as a rerun into the original would). New inodes: the cache may hard-link the original's files."""
    parent = shutil.copytree(tiny_artifact.parent, tmp_path / "artifacts")
    return Path(parent) / tiny_artifact.name
