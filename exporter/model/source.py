"""load_model(source) -> (model, tokenizer) from a hub id, a local HF folder, a GGUF file or a config.

GGUF files are de-quantised once and cached as a plain HF folder (reloads take ~1.5 s instead of
~20 s). Random-weight models built from a config get a byte tokenizer, since they ship none; a model
whose folder (or hub repo) has no usable tokenizer gets it too, with the reason (`ByteTokenizer.fallback`,
stated in the report).
"""

from __future__ import annotations

import functools
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from exporter.architectures import check_config, layout_for
from exporter.model.checkpoint import is_checkpoint, load_base_config, load_checkpoint
from exporter.dtypes import torch_dtype
from exporter.errors import UserError
from exporter.files import digest, json_digest, publish_folder, sha256_file, temporary_sibling
from exporter.model.prompts import ByteTokenizer, tokenizer_or_bytes
from exporter.recipe import ModelSource, PackageFile


def cache_dir() -> Path:
    return Path(os.environ.get("EXPORT_SKIP_CACHE", Path.home() / ".cache" / "export-skip"))


def gguf_path(source: ModelSource) -> Path:
    return source.gguf.locate() if isinstance(source.gguf, PackageFile) else Path(source.gguf)


def describe_source(source: ModelSource) -> dict:
    """The base model's identity, for the report."""
    if source.kind == "hub":
        return {"kind": "hub", "id": source.hub, "revision": source.revision or "main"}
    if source.kind == "path":  # the files' hashes: replaced weights must not restore a cached export
        folder = Path(source.path)
        patterns = ("config.json", "*.safetensors", "*.bin", "*.pt", "*.gguf")
        found = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
        return {"kind": "path", "path": str(source.path),
                "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in found}}
    if source.kind == "gguf":
        path = gguf_path(source)
        return {"kind": "gguf", "path": str(path), "sha256": sha256_file(path)}
    return {"kind": "config", "config_sha256": json_digest(source.config), "seed": source.seed}


def _hub_unreachable(hub_id: str) -> UserError:
    return UserError(
        f"cannot load {hub_id!r}: the Hugging Face Hub is unreachable from here and the model is not in "
        f"the local HF cache; download it where there is network (huggingface-cli download {hub_id} "
        f"--local-dir DIR) and set `model: {{path: DIR}}` in the recipe instead of `hub:`"
    )


def _hub_reachable(timeout: float = 5.0) -> bool:
    """A quick connect check, so an offline machine gets one clear line instead of ~30 s of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_hub(loader, source: ModelSource, **kwargs):
    """Call a transformers `from_pretrained`, preferring the local HF cache, mapping offline to a UserError."""
    common = dict(revision=source.revision, trust_remote_code=source.trust_remote_code, **kwargs)
    try:
        return loader(source.hub, local_files_only=True, **common)
    except OSError:
        pass
    if not _hub_reachable():
        raise _hub_unreachable(source.hub)
    try:
        return loader(source.hub, **common)
    except OSError as exc:
        raise UserError(f"cannot load {source.hub!r} from the Hugging Face Hub: {str(exc).splitlines()[0]}") from None


def _is_serving_checkpoint(folder: Path) -> bool:
    """A Nemotron-NAS / DeciLM folder (`export.checkpoint`): read by exporter/model/checkpoint.py."""
    return is_checkpoint(folder)


def load_config(source: ModelSource):
    """The model's config, without loading weights (used to validate the mask before any work)."""
    from transformers import AutoConfig

    if source.kind == "config":
        kwargs = {k: v for k, v in source.config.items() if k != "model_type"}
        layout_for(source.config["model_type"])
        try:
            config = AutoConfig.for_model(source.config["model_type"], **kwargs)
        except Exception as exc:  # noqa: BLE001 - transformers' strict config fields raise their own error kinds
            if not isinstance(exc, (ValueError, TypeError)) and "Validation" not in type(exc).__name__:
                raise
            raise UserError("model.config: " + " ".join(str(exc).split())) from None
    elif source.kind == "hub":
        config = _from_hub(AutoConfig.from_pretrained, source)
    elif source.kind == "path" and _is_serving_checkpoint(source.path):
        config = load_base_config(source.path)
    elif source.kind == "path":
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=source.trust_remote_code)
    else:
        folder = _converted_gguf_folder(source)
        if (folder / "config.json").is_file():
            config = AutoConfig.from_pretrained(folder)
        else:
            path = gguf_path(source)
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    layout_for(config.model_type)
    check_config(config)
    return config


def _converted_gguf_folder(source: ModelSource) -> Path:
    path = gguf_path(source)
    stat = path.stat()
    key = digest(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}", length=16)
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


_PARSING_ONCE = False


@contextmanager
def gguf_parsed_once():
    """Within this block, each GGUF file is parsed once and gguf's tensor-name map built once.

    transformers 5 parses the file for the config, again for the weights and again for the tokenizer, and rebuilds
    the name map for every module it walks (397 times on SmolLM2). The load stage wraps reading the config and the
    conversion in one block, so the config's parse is reused too. Measured on the default recipe with an empty
    cache: the load stage took 32.5 s before, 15.5 s after (docs/results/pipeline.md).
    Both are pure functions of their arguments; the patch is undone when the outermost block ends (nested blocks
    are part of it).
    """
    global _PARSING_ONCE
    if _PARSING_ONCE:
        yield
        return
    import gguf

    originals = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map")}
    for name, original in originals.items():
        setattr(gguf, name, functools.lru_cache(maxsize=None)(original))
    _PARSING_ONCE = True
    try:
        yield
    finally:
        _PARSING_ONCE = False
        for name, original in originals.items():
            setattr(gguf, name, original)


def _convert_gguf(source: ModelSource) -> Path:
    """De-quantise a GGUF once into a plain HF folder (transformers refuses to save the GGUF-loaded model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _converted_gguf_folder(source)
    if (folder / "model.safetensors").is_file():
        return folder
    path = gguf_path(source)
    with gguf_parsed_once():
        quantised = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is overwritten next: a random init of the copy cost ~4 s on SmolLM2
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.tie_weights()  # as from_config does with initialisation on (a tied LM head is saved once)
    plain.load_state_dict(quantised.state_dict())
    tmp = temporary_sibling(folder)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_folder(tmp, folder)
    return folder


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickle_only(folder: Path, source: ModelSource) -> None:
    """A folder whose weights exist only as pickles is refused unless the recipe allows pickle."""
    if source.allow_pickle or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"model.path: {folder} holds weights only as pickle files ({', '.join(pickles[:3])}), "
                        "which can run code when loaded; convert them to safetensors or set "
                        "model.allow_pickle: true if you trust them")


def load_model(source: ModelSource, config=None):
    """(model, tokenizer): an eval-mode causal LM in the recipe's dtype, and its tokenizer. `config`: the source's
    config (load_config) where the caller has it already: the model is built from it, not read again."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch_dtype(source.dtype)
    given = {} if config is None else {"config": config}
    if source.kind == "config":
        config = config or load_config(source)
        torch.manual_seed(source.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tokenizer = ByteTokenizer(config.vocab_size)
    elif source.kind == "hub":
        config or load_config(source)  # fails fast (one line) when offline
        model = _from_hub(AutoModelForCausalLM.from_pretrained, source, dtype=dtype, **given,
                          use_safetensors=None if source.allow_pickle else True)
        tokenizer = tokenizer_or_bytes(lambda: _from_hub(AutoTokenizer.from_pretrained, source),
                                       model.config.vocab_size)
    elif source.kind == "path" and _is_serving_checkpoint(source.path):
        model, tokenizer = load_checkpoint(source.path, dtype, config)
    else:
        folder = _convert_gguf(source) if source.kind == "gguf" else source.path
        _refuse_pickle_only(folder, source)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=source.trust_remote_code, **given,
                                                     use_safetensors=None if source.allow_pickle else True)
        tokenizer = tokenizer_or_bytes(lambda: AutoTokenizer.from_pretrained(folder), model.config.vocab_size)
    layout_for(model.config.model_type)
    check_config(model.config)
    return model.eval(), tokenizer


def load_tokenizer(source: ModelSource):
    """The tokenizer alone, as load_model returns it (a `search --ray` driver: the weights load on the workers)."""
    from transformers import AutoTokenizer

    if source.kind == "config":
        return ByteTokenizer(load_config(source).vocab_size)
    if source.kind == "hub":
        return _from_hub(AutoTokenizer.from_pretrained, source)
    if source.kind == "path" and _is_serving_checkpoint(source.path):
        folder, kwargs, errors = source.path, {"config": load_base_config(source.path)}, (OSError, ValueError, TypeError)
    else:
        folder = _convert_gguf(source) if source.kind == "gguf" else source.path
        kwargs, errors = {}, (OSError, ValueError)
    try:
        return AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except errors:
        return ByteTokenizer(load_config(source).vocab_size)


# --- a config without the weights: `plan` and `sweep` size a recipe from a shipped copy of a public config -------

SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"


def shipped_config_path(hub_id: str) -> Path:
    """recipes/configs/<repo name, lower case>.json, e.g. mistralai/Mistral-7B-v0.1 -> mistral-7b-v0.1.json."""
    return SHIPPED_CONFIGS / (hub_id.split("/")[-1].lower() + ".json")


def config_from_json(path: Path):
    """A config object (attribute access) from a config.json, without transformers."""
    from types import SimpleNamespace

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read a config.json: {exc}") from None
    missing = [k for k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "vocab_size") if k not in data]
    if missing:
        raise UserError(f"{path}: config.json lacks {', '.join(missing)}")
    data.setdefault("num_key_value_heads", data["num_attention_heads"])
    return SimpleNamespace(**data)


def config_for_recipe(recipe, config_path: Path | None = None):
    """(config, where it came from). Hub models use a shipped public config when it exists (no network)."""
    if config_path is not None:
        return config_from_json(config_path), str(config_path)
    source = recipe.model
    if source.kind == "hub":
        shipped = shipped_config_path(source.hub)
        if shipped.is_file():
            return config_from_json(shipped), f"shipped copy {shipped.relative_to(SHIPPED_CONFIGS.parents[1])}"
    return load_config(source), f"model source ({source.kind})"
