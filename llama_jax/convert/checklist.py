"""Meta's checklist.chk: one `<md5>  <filename>` line per file of a download."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from llama_jax.convert.errors import ConvertError

CHECKLIST = "checklist.chk"


def md5sum(path: Path, chunk: int = 1 << 23) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_checklist(folder: Path) -> list[str]:
    """Checks every `<md5>  <filename>` line of folder/checklist.chk; returns the names verified (none if absent)."""
    chk = folder / CHECKLIST
    if not chk.is_file():
        return []
    verified = []
    for n, line in enumerate(chk.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{32}", parts[0]):
            raise ConvertError(f"{chk}: line {n} is not '<md5>  <filename>': {line.strip()[:80]!r}")
        expected, name = parts[0].lower(), parts[1].lstrip("*")
        path = folder / name
        if not path.is_file():
            raise ConvertError(f"{path}: listed in {CHECKLIST} but missing")
        got = md5sum(path)
        if got != expected:
            raise ConvertError(f"{path}: md5 {got} does not match {CHECKLIST} ({expected}); the file is corrupt "
                               "or incomplete, download it again")
        verified.append(name)
    return verified


def write_checklist(folder: Path) -> None:
    lines = [f"{md5sum(p)}  {p.name}" for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKLIST]
    (folder / CHECKLIST).write_text("\n".join(lines) + "\n")
