"""Bad input becomes a ConvertError whose message is one line naming the file or flag and what was expected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ConvertError(ValueError):
    """Input that cannot be converted; the message is one line naming the file or flag and what was expected."""


def one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object (every config file we read is one)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({one_line(e, 80)})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return data
