"""Where the evaluation text lives and how it is read (WikiText-2 raw test, LAMBADA as used for GPT-2).

The folder is `--data DIR`, else $EXPORT_SKIP_DATA, else `<repo>/../shared/data`. It holds
`wikitext-2-raw/wiki.test.raw` and `lambada/lambada_test.jsonl` (see its README.md for the conventions
followed here: CRLF -> LF, no BOS, context = text up to the last space, target = the final word).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from exporter.errors import UserError

WIKITEXT = Path("wikitext-2-raw") / "wiki.test.raw"
LAMBADA = Path("lambada") / "lambada_test.jsonl"
WHERE_TO_GET = {
    WIKITEXT: "WikiText-2 raw v1 test split (Salesforce/wikitext, config wikitext-2-raw-v1, split test)",
    LAMBADA: "LAMBADA as used for GPT-2 (openai/lambada_test.jsonl, 5,153 passages)",
}


def data_dir(given: str | Path | None = None) -> Path:
    if given is not None:
        return Path(given)
    env = os.environ.get("EXPORT_SKIP_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def data_file(folder: Path, name: Path) -> Path:
    path = folder / name
    if not path.is_file():
        raise UserError(f"evaluation data not found: {path} is missing; put the {WHERE_TO_GET[name]} there, "
                        f"or point --data / EXPORT_SKIP_DATA at a folder holding {name}")
    return path


def read_wikitext(folder: Path) -> str:
    return data_file(folder, WIKITEXT).read_text(encoding="utf-8").replace("\r\n", "\n")


def read_lambada(folder: Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(context, target) pairs: the text up to its last space, and the final word (without the space)."""
    pairs = []
    path = data_file(folder, LAMBADA)
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if limit is not None and len(pairs) >= limit:
                break
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"].strip()
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{n}: not a JSON object with a 'text' field") from None
            context, _, target = text.rpartition(" ")
            pairs.append((context, target))
    return pairs
