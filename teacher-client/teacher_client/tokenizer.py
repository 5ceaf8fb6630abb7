"""The tokenizer handshake without transformers: a model directory's tokenizer.json read
with the `tokenizers` library (`pip install ./teacher-client[tokenizers]`).

`check_tokenizer` needs what the fingerprint covers (teacher_client.fingerprint): the
id -> token map with added tokens, and the special-token ids, which Hugging Face keeps in
tokenizer_config.json (or special_tokens_map.json). This reads exactly those, so the
fingerprint equals the one transformers' AutoTokenizer gives for the same directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_text(value: Any) -> str | None:
    """A special token as the config stores it: "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class LocalTokenizer:
    """What the handshake reads from a tokenizer: get_vocab(), len() and the special ids."""

    def __init__(self, tokenizer: Any, special: dict[str, str | None]) -> None:
        self._tokenizer = tokenizer
        for name in SPECIAL_NAMES:
            text = special.get(name)
            setattr(self, f"{name}_id", None if text is None else tokenizer.token_to_id(text))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> LocalTokenizer:
        from tokenizers import Tokenizer  # optional: the `tokenizers` extra

        path = Path(model_dir)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (a fast tokenizer is needed)")
        special: dict[str, str | None] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later wins
            if (path / name).is_file():
                config = json.loads((path / name).read_text())
                special |= {k: _token_text(config[k]) for k in SPECIAL_NAMES if k in config}
        return cls(Tokenizer.from_file(str(path / "tokenizer.json")), special)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)
