"""Tokenizer fingerprints: the teacher and a trainer must mean the same thing by token 17.

The fingerprint covers what token ids mean: the id -> token map (added tokens included)
and the special-token ids. It ignores settings that do not change ids (padding side,
model_max_length), so the same tokenizer loaded two ways gets the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def tokenizer_summary(tokenizer: Any) -> dict[str, Any]:
    """The parts of a Hugging Face tokenizer that the fingerprint covers."""
    vocab = tokenizer.get_vocab()
    return {
        "vocab": sorted((token_id, token) for token, token_id in vocab.items()),
        "special": {name: getattr(tokenizer, name, None) for name in SPECIAL_TOKENS},
    }


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 hex digest of `tokenizer_summary`."""
    text = json.dumps(tokenizer_summary(tokenizer), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
