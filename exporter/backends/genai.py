"""genai_config.json beside the ONNX, so onnxruntime-genai drives the skipped graph unchanged.

The graph already follows onnxruntime-genai's naming (the contract's past and present names); its
runtime looks the per-layer names up with the base model's layer count and tolerates gaps (layers
whose attention was removed have no cache entry) as long as `past_present_share_buffer` is false,
so only this config (and the tokenizer files) are needed. The runtime itself is the optional extra
`[genai]` (onnxruntime-genai==0.18.0); writing the config does not need it.
"""

from __future__ import annotations

import json
from pathlib import Path

from exporter.architectures import head_dim, layout_for
from exporter.errors import UserError
from exporter.onnx.contract import past_name, present_name

CONFIG_FILE = "genai_config.json"


def _token_id(value):
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value] if len(value) > 1 else int(value[0])
    return None if value is None else int(value)


def genai_unsupported(config) -> str | None:
    """Why onnxruntime-genai 0.18 cannot take this family's model (it has no model type for it), or None."""
    if layout_for(config.model_type).genai_type is None:
        return (f"onnxruntime-genai 0.18 has no model type for {config.model_type}; the ONNX graphs run in "
                "ONNX Runtime directly")
    return None


def genai_config(config, generation_config, onnx_file: str, context_length: int, kv_layers: int) -> dict:
    """The config onnxruntime-genai reads; `kv_layers` is the base model's layer count (names keep gaps)."""
    head = head_dim(config)
    eos = _token_id(getattr(generation_config, "eos_token_id", None) or config.eos_token_id)
    bos = _token_id(getattr(generation_config, "bos_token_id", None) or config.bos_token_id)
    # Random-weight test models have no special tokens; 0 (the byte tokenizer's pad) stands in.
    eos = 0 if eos is None else eos
    pad = _token_id(getattr(config, "pad_token_id", None))
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    return {
        "model": {
            "bos_token_id": 0 if bos is None else bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "context_length": context_length,
            "type": layout_for(config.model_type).genai_type,
            "vocab_size": config.vocab_size,
            "decoder": {
                "filename": onnx_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": head,
                "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": config.num_key_value_heads,
                "num_hidden_layers": kv_layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": past_name("%d", "key"),
                           "past_value_names": past_name("%d", "value")},
                "outputs": {"logits": "logits", "present_key_names": present_name("%d", "key"),
                            "present_value_names": present_name("%d", "value")},
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context_length,
            "min_length": 0, "top_k": 1, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0, "length_penalty": 1.0, "diversity_penalty": 0.0, "early_stopping": True,
            # A shared buffer assumes a cache for every layer index; skipped layers have none.
            "past_present_share_buffer": False,
        },
    }


def save_tokenizer(tokenizer, folder: Path) -> list[Path]:
    """The tokenizer's files beside the ONNX (for `generate` and onnxruntime-genai); none for test models."""
    if not hasattr(tokenizer, "save_pretrained"):
        return []
    return [Path(p) for p in tokenizer.save_pretrained(str(folder)) if Path(p).is_file()]


def write_genai_config(config, generation_config, folder: Path, onnx_file: str, context_length: int) -> Path:
    reason = genai_unsupported(config)
    if reason is not None:
        raise UserError(f"export.genai: {reason}")
    path = folder / CONFIG_FILE
    data = genai_config(config, generation_config, onnx_file, context_length, config.num_hidden_layers)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def require_genai():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise UserError("onnxruntime-genai is not installed: pip install -e '.[genai]' "
                        "(onnxruntime-genai==0.18.0)") from None
    return og


def genai_greedy(folder: Path, input_ids: list[int], max_new_tokens: int, on_token=None) -> list[int]:
    """Greedy continuation of one prompt by onnxruntime-genai (stops at eos or after max_new_tokens)."""
    og = require_genai()
    if not (Path(folder) / CONFIG_FILE).is_file():
        raise UserError(f"{folder}: no {CONFIG_FILE} (set export.genai: true in the recipe and re-run)")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(input_ids) + max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens([list(input_ids)])
    tokens: list[int] = []
    while not generator.is_done() and len(tokens) < max_new_tokens:
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        tokens.append(token)
        if on_token is not None:
            on_token(token)
    return tokens
