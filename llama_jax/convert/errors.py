"""Bad input becomes a ConvertError whose message is one line naming the file or flag and what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llama_jax.config import read_json_object


class ConvertError(ValueError):
    """Input that cannot be converted; the message is one line naming the file or flag and what was expected."""


def one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object (every config file we read is one); bad input is a ConvertError."""
    return read_json_object(path, ConvertError)
