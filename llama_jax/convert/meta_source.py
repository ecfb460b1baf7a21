"""Meta's download: params.json + consolidated.NN.pth shards, read a layer (or a block of rows) at a time.

Shards are opened with `torch.load(weights_only=True, mmap=True)` (no code can run; nothing is read until touched)
and *closed again after every layer*: pages of a mapped file count towards the process's RSS for as long as the
mapping lives, so keeping the shards open would grow RSS to the checkpoint's size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from llama_jax.config import ROPE_SCALING_BY_FAMILY, ConfigError, LlamaConfig
from llama_jax.convert.errors import ConvertError, one_line, read_json
from llama_jax.convert.meta_format import LAYER_SPLIT, PARAMS_JSON, Source, meta_shapes, split_axis
from llama_jax.convert.tensors import dtype_name, import_torch, target_dtype

FAMILIES = ("llama2", "llama3", "llama3.1", "llama3.2")
DEFAULT_MAX_SEQ_LEN = {"llama2": 4096, "llama3": 8192, "llama3.1": 131072, "llama3.2": 131072}
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
# Present in some Llama 2 files (the rotary frequencies Meta's code recomputes anyway): not a parameter.
NON_PARAMETERS = frozenset({"rope.freqs"})


def params_json_path(folder: Path) -> Path:
    path = folder / PARAMS_JSON
    if not path.is_file():
        raise ConvertError(f"{path}: missing (expected Meta's params.json next to consolidated.NN.pth)")
    return path


@dataclasses.dataclass(frozen=True)
class MetaLayout:
    shards: tuple[Path, ...]
    embedding_axis: int  # 1: Llama 2 ParallelEmbedding, 0: Llama 3 VocabParallelEmbedding
    vocab_size: int
    has_output: bool
    source_dtype: str


def find_shards(folder: Path) -> tuple[Path, ...]:
    found = {}
    for p in folder.iterdir():
        m = _SHARD_RE.match(p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise ConvertError(f"{folder}: no consolidated.NN.pth shards found")
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        raise ConvertError(f"{folder / f'consolidated.{missing[0]:02d}.pth'}: missing; found shards "
                           f"{', '.join(f'{i:02d}' for i in sorted(found))} (a complete set is 00..NN)")
    return tuple(found[i] for i in range(len(found)))


def load_shard(path: Path) -> dict[str, Any]:
    """One consolidated.NN.pth, memory-mapped; refuses pickles that would need to run code."""
    import pickle

    torch = import_torch()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ConvertError(f"{path}: refused: the pickle holds objects other than tensors and loading it could run "
                           f"code ({one_line(e, 120)})") from None
    except Exception as e:  # torch raises RuntimeError / zipfile / EOF errors for damaged files
        raise ConvertError(f"{path}: cannot read the PyTorch checkpoint (truncated or corrupt?): {one_line(e)}") \
            from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(f"{path}: expected a dict of tensors (Meta's state dict), got {type(state).__name__}")
    return dict(state)


def infer_family(params: Mapping[str, Any], family: str | None) -> str:
    if family is not None:
        if family not in FAMILIES:
            raise ConvertError(f"--family {family!r}: expected one of {', '.join(FAMILIES)}")
        return family
    if params.get("use_scaled_rope"):
        return "llama3.2" if params.get("dim") in (2048, 3072) else "llama3.1"
    return "llama3" if float(params.get("rope_theta", 10000.0)) >= 500000 else "llama2"


class MetaSource(Source):
    def __init__(self, folder: Path, *, family: str | None = None, dtype: str = "auto",
                 max_seq_len: int | None = None):
        folder = Path(folder)
        params_path = params_json_path(folder)
        params = read_json(params_path)
        self.layout = self._inspect(find_shards(folder), params)
        fam = infer_family(params, family)
        target = target_dtype(dtype, self.layout.source_dtype)
        overrides: dict[str, Any] = dict(tie_embeddings=not self.layout.has_output, param_dtype=target, dtype=target)
        try:
            self.config = LlamaConfig.from_params_json(
                params_path, vocab_size=self.layout.vocab_size,
                family=fam if fam in ROPE_SCALING_BY_FAMILY else None,
                max_seq_len=max_seq_len or params.get("max_seq_len") or DEFAULT_MAX_SEQ_LEN[fam], **overrides)
        except (ConfigError, TypeError) as e:
            raise ConvertError(f"{params_path}: {one_line(e)}") from None
        # output.weight is always split on vocab, so row blocks stay within one shard's vocab range.
        self.vocab_shards = len(self.layout.shards)
        self._check_shapes()

    # Validation reads only the pickles (names and shapes) and the small replicated norms.
    def _inspect(self, shards: tuple[Path, ...], params: dict) -> MetaLayout:
        n = len(shards)
        with self._open(shards) as states:
            names0 = set(states[0]) - NON_PARAMETERS
            for path, state in zip(shards[1:], states[1:]):
                names = set(state) - NON_PARAMETERS
                if names != names0:
                    diff = sorted(names ^ names0)[:3]
                    raise ConvertError(f"{path}: tensor names differ from {shards[0].name} (e.g. {diff}); the shards "
                                       "are not one checkpoint")
            if "tok_embeddings.weight" not in names0:
                raise ConvertError(f"{shards[0]}: no tok_embeddings.weight; not a Meta LLaMA checkpoint")
            emb = states[0]["tok_embeddings.weight"]
            dim = params.get("dim")
            if emb.ndim != 2 or not isinstance(dim, int):
                raise ConvertError(f"{shards[0]}: tok_embeddings.weight has shape {tuple(emb.shape)}, "
                                   f"params.json dim={dim!r}")
            rows, cols = emb.shape
            if n == 1 or cols == dim:
                axis, vocab = 0, rows * n
            elif cols * n == dim:
                axis, vocab = 1, rows
            else:
                raise ConvertError(f"{shards[0]}: tok_embeddings.weight has shape {tuple(emb.shape)}, which fits "
                                   f"neither dim={dim} nor dim/{n} shards; is the shard count right?")
            if cols != dim and n == 1:
                raise ConvertError(f"{shards[0]}: tok_embeddings.weight has shape {tuple(emb.shape)}, params.json "
                                   f"dim={dim} (files missing? only 1 shard found)")
            declared = params.get("vocab_size", -1)
            if isinstance(declared, int) and declared > 0 and declared != vocab:
                raise ConvertError(f"{shards[0]}: tok_embeddings.weight implies vocab_size={vocab} over {n} shard(s), "
                                   f"params.json says {declared}")
            for path, state in zip(shards, states):
                for name in sorted(names0):
                    if name.endswith("norm.weight"):
                        if not _equal(state[name], states[0][name]):
                            raise ConvertError(f"{path}: {name} differs from {shards[0].name}; norms are replicated "
                                               "in every shard, so these shards do not belong together")
            self._shapes = {p: {k: tuple(v.shape) for k, v in s.items() if k not in NON_PARAMETERS}
                            for p, s in zip(shards, states)}
            source_dtype = dtype_name(emb, shards[0])
        return MetaLayout(shards, axis, vocab, "output.weight" in names0, source_dtype)

    def _check_shapes(self) -> None:
        n, shards = len(self.layout.shards), self.layout.shards
        expected = meta_shapes(self.config)
        found = self._shapes[shards[0]]
        missing = [name for name in expected if name not in found]
        if missing:
            raise ConvertError(f"{shards[0]}: missing tensor {missing[0]} (params.json: n_layers="
                               f"{self.config.n_layers})")
        extra = sorted(set(found) - set(expected), key=_natural)
        if extra:
            raise ConvertError(f"{shards[0]}: unexpected tensor {extra[0]} for params.json "
                               f"(n_layers={self.config.n_layers})")
        for path in shards:
            for name, full in expected.items():
                axis = split_axis(name, self.layout.embedding_axis)
                want = list(full)
                if axis is not None:
                    if full[axis] % n:
                        raise ConvertError(f"{path}: {name} has {full[axis]} along dim {axis}, not divisible by "
                                           f"{n} shards")
                    want[axis] //= n
                got = self._shapes[path][name]
                if got != tuple(want):
                    raise ConvertError(f"{path}: {name} has shape {got}, params.json implies {tuple(want)} per shard "
                                       f"with {n} shard(s) (full shape {full}); wrong params.json or missing shards?")
        del self._shapes

    @staticmethod
    @contextlib.contextmanager
    def _open(paths: Sequence[Path]):
        states = [load_shard(p) for p in paths]
        try:
            yield states
        finally:
            # Drop the tensors so the mappings are unmapped and their pages stop counting towards our RSS.
            states.clear()

    def layer(self, i: int) -> dict[str, Any]:
        torch = import_torch()
        out = {}
        with self._open(self.layout.shards) as states:
            for key, axis in LAYER_SPLIT.items():
                pieces = [s[f"layers.{i}.{key}"] for s in states]
                out[key] = pieces[0].clone() if axis is None else torch.cat(pieces, dim=axis)
                del pieces
        return out

    def rows(self, name: str, start: int, stop: int):
        torch = import_torch()
        shards = self.layout.shards
        if split_axis(name, self.layout.embedding_axis) == 1:
            with self._open(shards) as states:
                return torch.cat([s[name][start:stop] for s in states], dim=1)
        per = self.config.vocab_size // len(shards)
        k = start // per
        with self._open([shards[k]]) as (state,):
            return state[name][start - k * per: stop - k * per].clone()

    def norm(self):
        with self._open(self.layout.shards[:1]) as (state,):
            return state["norm.weight"].clone()


def _equal(a, b) -> bool:
    torch = import_torch()
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]

