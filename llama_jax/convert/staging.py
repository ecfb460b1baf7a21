"""Output folders appear whole or not at all.

Everything goes to a temporary folder beside the output that is renamed at the end, so an interrupted or failed
conversion never leaves a half checkpoint under the output name.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from llama_jax.convert.errors import ConvertError


def check_output(output: Path, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
    if output.exists() and not overwrite:
        raise ConvertError(f"{output}: already exists (pass --overwrite to replace it)")
    for folder in inputs:
        if output.resolve() == Path(folder).resolve():
            raise ConvertError(f"{output}: output folder is the input folder; choose another --output")


@contextlib.contextmanager
def staging_dir(output: Path, overwrite: bool) -> Iterator[Path]:
    """A temp folder beside `output`, renamed to it only if the body finishes; removed on any failure."""
    output = Path(output)
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the output folder's mode
    try:
        yield tmp
        if output.exists() or output.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            output.rename(old / output.name)
            tmp.rename(output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output)
    except BaseException:
        _remove(tmp)
        raise


def _remove(folder: Path, attempts: int = 50) -> None:
    # A writer thread that is still winding down may recreate a subfolder right after a removal: retry briefly.
    for _ in range(attempts):
        shutil.rmtree(folder, ignore_errors=True)
        time.sleep(0.05)
        if not folder.exists():
            return
