"""Tokens: the byte tokenizer fallback, prompt strings as left-padded batches (the layout every runner
takes), their positions, and generated ids back to text."""

from __future__ import annotations

from dataclasses import dataclass

from exporter.errors import UserError


@dataclass
class ByteTokenizer:
    """Stand-in tokenizer for random-weight models, and the fallback for a model folder without a usable
    tokenizer (`fallback` says why; the report states it): one token per UTF-8 byte, modulo the vocabulary."""

    vocab_size: int
    pad_token_id: int = 0
    fallback: str | None = None

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")] or [1 % self.vocab_size]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(str(int(i)) for i in ids)


def tokenizer_or_bytes(load, vocab_size: int):
    """`load()`'s tokenizer if it works, else the byte tokenizer with the reason as `fallback`.

    Works means: it loads and encodes a plain sentence to at least one token that is not a special or unknown
    token. transformers raises for some folders without tokenizer files (Llama) but returns an empty tokenizer
    for others (Qwen2/3: every text encodes to no tokens; Gemma: every text encodes to <unk>), which would
    otherwise fail much later as an index error, or validate on prompts of nothing but <unk>.
    """
    try:
        tokenizer = load()
    except Exception as exc:  # noqa: BLE001 - no files, a missing converter library, a broken file: no tokenizer
        first = str(exc).strip().splitlines()[0].rstrip(" :")[:120] if str(exc).strip() else ""
        return ByteTokenizer(vocab_size, fallback=f"no usable tokenizer files ({type(exc).__name__}: {first})")
    try:
        ids = encode_plain(tokenizer, "Hello world")
    except Exception as exc:  # noqa: BLE001
        return ByteTokenizer(vocab_size, fallback=f"the tokenizer fails to encode text ({type(exc).__name__})")
    if not ids:
        return ByteTokenizer(vocab_size, fallback="the tokenizer found is empty (it encodes text to no tokens)")
    special = set(getattr(tokenizer, "all_special_ids", None) or ()) | {getattr(tokenizer, "unk_token_id", None)}
    if all(i in special for i in ids):
        return ByteTokenizer(vocab_size, fallback="the tokenizer found has no vocabulary (it encodes text to "
                                                  "special or unknown tokens only)")
    if len(tokenizer) > vocab_size:  # e.g. special tokens added past the embedding (padding would index past it)
        extra = [t for t in getattr(tokenizer, "all_special_tokens", ()) if tokenizer.convert_tokens_to_ids(t) >= vocab_size]
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab_size}"
                        + (f" ({', '.join(extra[:3])} lie past it)" if extra else "")
                        + ": give the model's own tokenizer files, or none (one token per byte is used then)")
    return tokenizer


def encode(tokenizer, text: str, chat: bool = False) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def encode_plain(tokenizer, text: str) -> list[int]:
    """Token ids with no BOS/EOS added (the evaluation data's convention)."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # the byte tokenizer of random-weight models adds nothing anyway
        return list(tokenizer.encode(text))


def pad_token_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad or 0)


def left_padded(tokenizer, texts: list[str], chat: bool = False):
    """(input_ids, attention_mask) int64 tensors [B, T], shorter prompts padded on the left."""
    import torch

    rows = [encode(tokenizer, t, chat) for t in texts]
    width = max(len(r) for r in rows)
    pad = pad_token_id(tokenizer)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[b, width - len(row):] = 1
    return ids, mask


def decode(tokenizer, ids) -> str:
    """Text of generated ids, cut at the first end-of-sequence token, special tokens dropped."""
    ids = [int(i) for i in ids]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)
