"""A serving checkpoint: the skipped model as a Hugging Face folder in NVIDIA's Nemotron-NAS / DeciLM style.

`write_checkpoint` saves model.safetensors holding only the kept weights (the base model's names minus
the removed modules) and a config.json with `block_configs[i].attention.no_op` / `ffn.no_op` per
layer: the format vLLM's DeciLMForCausalLM and TensorRT-LLM's Nemotron-NAS support read for models
with missing sub-layers (docs/serving.md; neither is run here). The Llama block is the only block
DeciLM describes, so Llama and Mistral (without attention biases or a sliding window) can be written; every
other family has a twist the format lacks (architectures.Layout.checkpoint_refusal: Qwen2's q/k/v biases,
q/k norms, sandwich or post-norms, soft-capping, multipliers, no-rope layers, fused projections), and
`check_supported` refuses those with one line before any work.

`load_checkpoint` reads such a folder back (recipe `model: {path: ...}`): the base architecture is
rebuilt with the removed sub-layers' output projections zeroed, so even the unmasked Hugging Face model
computes exactly what the skipped one does; `merge_removed` adds them to the recipe's mask, so a
re-export removes them again instead of exporting zeros.
"""

from __future__ import annotations

import json
from pathlib import Path

from exporter.architectures import layout_for, sliding_window_for
from exporter.errors import UserError
from exporter.mask import SkipMask
from exporter.model.prompts import tokenizer_or_bytes

WEIGHTS = "model.safetensors"
_DECI_FIELDS = ("block_configs", "export_skip", "auto_map", "architectures", "model_type")


def is_checkpoint(folder: Path) -> bool:
    """A folder whose config.json has DeciLM block_configs (ours, or NVIDIA's Nemotron-NAS)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    try:
        return "block_configs" in json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False


def check_supported(config) -> None:
    """Raise a UserError (one line, the reason) unless a DeciLM (Llama) block can describe this model exactly.

    The family's own twists come from the architecture table (`Layout.checkpoint_refusal`); what a config can
    turn on in any family is checked here: attention biases (TensorRT-LLM hard-codes none) and sliding windows
    (neither TensorRT-LLM's nor vLLM's DeciLM has one).
    """
    layout = layout_for(config.model_type)
    reason = layout.checkpoint_refusal
    if reason is None and getattr(config, "attention_bias", False):
        reason = "its attention has biases (attention_bias: true; TensorRT-LLM's DeciLM attention has none)"
    windows = {w for i in range(config.num_hidden_layers) if (w := sliding_window_for(config, i)) is not None}
    if reason is None and windows:
        reason = f"it uses sliding_window={min(windows)} and the format has no sliding window"
    if reason is not None:
        raise UserError(f"export.checkpoint: the Nemotron-NAS / DeciLM format describes Llama blocks only; "
                        f"{config.model_type} cannot be written in it ({reason})")


def _ffn_size(ffn_mult: float, hidden: int) -> int:
    """DeciLM's rule (vLLM, TensorRT-LLM, llama.cpp agree): int(2 * mult * hidden / 3), rounded up to 256."""
    size = int(2 * ffn_mult * hidden / 3)
    return size if size % 256 == 0 else size + 256 - size % 256


def block_configs(config, mask) -> list[dict]:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    mult = config.intermediate_size * 3 / (2 * config.hidden_size)
    # ffn_mult is what NVIDIA's own configs carry; vLLM also reads ffn.intermediate_size, used when the
    # multiplier cannot reproduce the size exactly (e.g. sizes that are not multiples of 256).
    ffn = {"ffn_mult": mult} if _ffn_size(mult, config.hidden_size) == config.intermediate_size \
        else {"intermediate_size": config.intermediate_size}
    blocks = []
    for i in range(config.num_hidden_layers):
        no_attn, no_ffn = i in mask.attention, i in mask.mlp
        blocks.append({
            "attention": {"no_op": no_attn, "replace_with_linear": False,
                          "n_heads_in_group": None if no_attn else heads // kv_heads},
            "ffn": {"no_op": no_ffn, "replace_with_linear": False, **({} if no_ffn else ffn)},
        })
    return blocks


def write_checkpoint(model, skipped, mask, folder: Path, tokenizer=None) -> list[Path]:
    """Write the folder; returns the files written."""
    from safetensors.torch import save_file

    config = model.config
    check_supported(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = skipped.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: stored once, as the embedding
    tensors = {name: t.detach().contiguous().clone() for name, t in state.items()}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})

    data = config.to_dict()
    data.update({
        "model_type": "nemotron-nas",
        "architectures": ["DeciLMForCausalLM"],
        # NVIDIA's checkpoints ship these two code files; transformers needs them (trust_remote_code),
        # vLLM and TensorRT-LLM read block_configs natively. See docs/serving.md.
        "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig",
                     "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"},
        "block_configs": block_configs(config, mask),
        "export_skip": {"base_model_type": config.model_type,
                        "removed": {"attention": list(mask.attention), "mlp": list(mask.mlp)}},
    })
    (folder / "config.json").write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    files = [folder / WEIGHTS, folder / "config.json"]
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(folder))
        files.append(folder / "generation_config.json")
    if hasattr(tokenizer, "save_pretrained"):
        files += [Path(p) for p in tokenizer.save_pretrained(str(folder)) if Path(p).is_file()]
    return sorted(set(files))


def _removed(data: dict, where: Path) -> tuple[list[int], list[int]]:
    """Layers whose attention / ffn are no_op; anything DeciLM-specific a Llama cannot hold is refused."""
    attention, mlp, groups, ffn = [], [], set(), set()
    for i, block in enumerate(data["block_configs"]):
        a, f = block.get("attention", {}), block.get("ffn", {})
        if a.get("replace_with_linear") or f.get("replace_with_linear"):
            raise UserError(f"{where}: layer {i} replaces a sub-layer with a linear map; export-skip only loads no_op")
        if a.get("no_op"):
            attention.append(i)
        else:
            groups.add(a.get("n_heads_in_group"))
        if f.get("no_op"):
            mlp.append(i)
        else:
            ffn.add(f.get("intermediate_size") or _ffn_size(f["ffn_mult"], data["hidden_size"]))
    if len(groups) > 1 or len(ffn) > 1:
        raise UserError(f"{where}: layers differ in KV heads or MLP width (a NAS-searched model); "
                        "export-skip loads checkpoints whose kept layers are all alike")
    return attention, mlp


def load_base_config(folder: Path):
    """The base architecture's config, with `export_skip_removed` = (attention, mlp) no_op layers."""
    from transformers import AutoConfig

    where = Path(folder) / "config.json"
    data = json.loads(where.read_text(encoding="utf-8"))
    attention, mlp = _removed(data, where)
    base = data.get("export_skip", {}).get("base_model_type", "llama")
    kwargs = {k: v for k, v in data.items() if k not in _DECI_FIELDS}
    groups = {b["attention"].get("n_heads_in_group") for b in data["block_configs"] if not b["attention"].get("no_op")}
    if groups and None not in groups:
        kwargs["num_key_value_heads"] = data["num_attention_heads"] // groups.pop()
    sizes = [b["ffn"] for b in data["block_configs"] if not b["ffn"].get("no_op")]
    if sizes:
        kwargs["intermediate_size"] = sizes[0].get("intermediate_size") or _ffn_size(sizes[0]["ffn_mult"], data["hidden_size"])
    config = AutoConfig.for_model(base, **kwargs)
    config.export_skip_removed = (tuple(attention), tuple(mlp))
    return config


def load_checkpoint(folder: Path, dtype, config=None):
    """(model, tokenizer) from a checkpoint folder; removed sub-layers output exactly zero. `config`: the folder's
    config (load_base_config) where the caller has it already."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    config = config or load_base_config(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise UserError(f"{folder}: no *.safetensors weights in this checkpoint folder")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {}
    for path in weights:
        state.update(load_file(str(path)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    layout = layout_for(config.model_type)
    attention, mlp = config.export_skip_removed
    removed = tuple(f"model.layers.{i}.{m}." for i in attention for m in layout.branch("attention")) + \
        tuple(f"model.layers.{i}.{m}." for i in mlp for m in layout.branch("mlp"))
    tied = ("lm_head.weight",) if config.tie_word_embeddings else ()
    bad = [k for k in missing if not k.startswith(removed) and k not in tied]
    if bad or unexpected:
        raise UserError(f"{folder}: weights do not match block_configs (missing {bad[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():  # a removed sub-layer adds 0 to the residual: its output projection is zero
        for i in attention:
            for p in getattr(model.model.layers[i], layout.attention).o_proj.parameters():
                p.zero_()
        for i in mlp:
            for p in getattr(model.model.layers[i], layout.mlp).down_proj.parameters():
                p.zero_()
    if config.tie_word_embeddings:
        model.tie_weights()
    # config= keeps transformers from reading config.json, whose auto_map would ask to run remote code
    tokenizer = tokenizer_or_bytes(lambda: AutoTokenizer.from_pretrained(str(folder), config=config), config.vocab_size)
    return model.eval(), tokenizer


def merge_removed(mask, config):
    """The recipe's mask plus the layers a loaded checkpoint no longer has (so they are removed, not zeros)."""
    removed = getattr(config, "export_skip_removed", None)
    if not removed:
        return mask

    return SkipMask(attention=tuple(sorted(set(mask.attention) | set(removed[0]))),
                    mlp=tuple(sorted(set(mask.mlp) | set(removed[1]))))
