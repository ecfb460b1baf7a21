"""convert_weights.py / llama_jax.convert: Meta (and HF) checkpoints -> Orbax model folder -> Meta again.

Checkpoints are built with torch in Meta's exact on-disk format (tests/meta_checkpoint.py). Logits of the
converted model are compared with Hugging Face's LlamaForCausalLM built from the *unsharded* tensors
(tests/hf_reference.py), so a wrong merge axis, a missed permutation or a wrong rope factor shows up.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from hf_reference import hf_logits, hf_model_from_meta, random_meta_state
from llama_jax.checkpoint import load_model
from llama_jax.config import LlamaConfig, RopeScaling
from llama_jax.convert import convert, export_meta, verify_checklist
from llama_jax.meta_weights import params_from_meta
from llama_jax.model import forward
from meta_checkpoint import (LLAMA2_EMBEDDING_AXIS, LLAMA3_EMBEDDING_AXIS, merge_shards, read_meta_checkpoint,
                             write_meta_checkpoint)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import convert_weights  # noqa: E402  (the root CLI)

_BASE = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32)
CASES = {
    # Llama 2 7B-style: MHA, ParallelEmbedding split on dim, rope.freqs in every shard, params.json vocab -1.
    "llama2-mha-2shards": dict(
        config=LlamaConfig(**_BASE, vocab_size=96, max_seq_len=4096), shards=2, axis=LLAMA2_EMBEDDING_AXIS,
        rope_freqs=True, llama2_vocab=True),
    # Llama 3 8B-style: GQA, VocabParallelEmbedding split on vocab.
    "llama3-gqa-2shards": dict(
        config=LlamaConfig(**_BASE, n_kv_heads=2, vocab_size=128, rope_theta=500000.0, max_seq_len=8192),
        shards=2, axis=LLAMA3_EMBEDDING_AXIS),
    # 70B-style 8-way model parallelism: every kv head on its own shard.
    "llama3-8shards": dict(
        config=LlamaConfig(dim=128, n_layers=2, n_heads=16, n_kv_heads=8, vocab_size=256, multiple_of=64,
                           ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=8192),
        shards=8, axis=LLAMA3_EMBEDDING_AXIS),
    # Llama 3.2 1B-style: one shard, tied embeddings (no output.weight), use_scaled_rope with factor 32, which
    # params.json cannot say for this dim: --family llama3.2.
    "llama3.2-tied-scaled": dict(
        config=LlamaConfig(**_BASE, n_kv_heads=2, vocab_size=128, rope_theta=500000.0, use_scaled_rope=True,
                           rope_scaling=RopeScaling(factor=32.0), tie_embeddings=True, max_seq_len=131072),
        shards=1, axis=LLAMA3_EMBEDDING_AXIS, family="llama3.2", start=20000),
}
SEQ = 10


def _write(tmp_path: Path, name: str, seed: int = 0, **kw) -> tuple[Path, dict, LlamaConfig]:
    case = CASES[name]
    config = case["config"]
    state = random_meta_state(config, seed)
    folder = write_meta_checkpoint(tmp_path / "meta", state, config, n_shards=case["shards"],
                                   embedding_axis=case["axis"], with_rope_freqs=case.get("rope_freqs", False),
                                   llama2_vocab=case.get("llama2_vocab", False), **kw)
    return folder, state, config


def _our_logits(model_dir: Path, tokens, positions):
    params, config, _ = load_model(model_dir)
    logits, _ = forward(params, tokens, positions, config=config)
    return np.asarray(logits), params, config


def _inputs(config: LlamaConfig, start: int = 0):
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, SEQ))
    positions = np.broadcast_to(np.arange(SEQ) + start, tokens.shape).copy()
    return tokens, positions


def _leftovers(parent: Path, keep=("meta",)) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


# --- conversion is exact and the model matches the reference -----------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_converted_logits_match_hf_reference(tmp_path, name):
    folder, state, config = _write(tmp_path, name)
    # A small block budget splits the embedding/head into several row blocks, as a large vocab would be.
    result = convert(folder, tmp_path / "out", family=CASES[name].get("family"), progress=False,
                     block_budget=config.dim * 4 * 16)
    assert result.n_shards == CASES[name]["shards"]
    assert set(result.checked_files) == {f"consolidated.{i:02d}.pth" for i in range(result.n_shards)} | {"params.json"}

    tokens, positions = _inputs(config, CASES[name].get("start", 0))
    ours, params, loaded = _our_logits(tmp_path / "out", tokens, positions)
    for field in ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "hidden_dim", "norm_eps", "rope_theta",
                  "use_scaled_rope", "rope_scaling", "tie_embeddings", "max_seq_len"):
        assert getattr(loaded, field) == getattr(config, field), field
    assert loaded.param_dtype == "float32"
    # The stored tree is bit-identical to mapping the unsharded tensors ...
    expected = params_from_meta({k: v.numpy() for k, v in state.items()}, config)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, expected)
    # ... and the model computes what HF's LlamaForCausalLM computes with them.
    np.testing.assert_allclose(ours, hf_logits(state, config, tokens, positions), atol=2e-4, rtol=1e-4)
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()
    assert _leftovers(tmp_path) == ["out"]


def test_rope_factor_comes_from_family(tmp_path):
    """Without --family a dim-64 use_scaled_rope model gets Llama 3.1's factor 8, and the logits at long
    positions then differ from the factor-32 reference: the flag matters and the test can fail."""
    folder, state, config = _write(tmp_path, "llama3.2-tied-scaled")
    convert(folder, tmp_path / "guess", progress=False)
    tokens, positions = _inputs(config, 20000)
    ours, _, loaded = _our_logits(tmp_path / "guess", tokens, positions)
    assert loaded.rope_scaling.factor == 8.0
    assert np.abs(ours - hf_logits(state, config, tokens, positions)).max() > 1e-3


def test_bf16_checkpoint_keeps_bf16_and_upcasts_exactly(tmp_path):
    folder, state, config = _write(tmp_path, "llama3-gqa-2shards", dtype=torch.bfloat16)
    convert(folder, tmp_path / "bf16", progress=False)
    convert(folder, tmp_path / "fp32", dtype="fp32", progress=False)
    expected = params_from_meta({k: v.to(torch.bfloat16).float().numpy() for k, v in state.items()}, config)
    for out, dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
        params, loaded, _ = load_model(tmp_path / out)
        assert loaded.param_dtype == dtype and loaded.dtype == dtype
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b), params, expected)
        assert all(str(leaf.dtype) == dtype for leaf in jax.tree.leaves(params))


# --- export back to Meta's layout ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama2-mha-2shards", "llama3-gqa-2shards", "llama3-8shards"])
def test_round_trip_meta_orbax_meta_is_bit_identical(tmp_path, name):
    folder, _, config = _write(tmp_path, name)
    original = read_meta_checkpoint(folder)
    convert(folder, tmp_path / "model", progress=False)
    shards = CASES[name]["shards"]
    export_meta(tmp_path / "model", tmp_path / "back", shards=shards, progress=False)

    back = read_meta_checkpoint(tmp_path / "back")
    assert len(back) == shards
    for ours, theirs in zip(back, original):
        theirs = {k: v for k, v in theirs.items() if k != "rope.freqs"}  # not a parameter; not exported
        assert list(ours) == list(theirs)
        for key in theirs:
            assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    params_json = json.loads((tmp_path / "back" / "params.json").read_text())
    assert (params_json["dim"], params_json["n_layers"], params_json["vocab_size"]) == (
        config.dim, config.n_layers, config.vocab_size)
    assert set(verify_checklist(tmp_path / "back")) == {p.name for p in (tmp_path / "back").iterdir()} - {
        "checklist.chk"}
    # And the export converts again to the same model.
    convert(tmp_path / "back", tmp_path / "again", progress=False)
    a, _, _ = load_model(tmp_path / "model")
    b, _, _ = load_model(tmp_path / "again")
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_export_reshards_and_writes_tied_head(tmp_path):
    folder, state, config = _write(tmp_path, "llama3.2-tied-scaled")
    convert(folder, tmp_path / "model", family="llama3.2", progress=False)
    assert convert_weights.main(["--to-meta", "--input", str(tmp_path / "model"), "--output",
                                 str(tmp_path / "two"), "--shards", "2", "--quiet"]) == 0
    shards = read_meta_checkpoint(tmp_path / "two")
    assert len(shards) == 2 and shards[0]["tok_embeddings.weight"].shape == (config.vocab_size // 2, config.dim)
    merged = merge_shards(shards, LLAMA3_EMBEDDING_AXIS)
    # Meta's reference model has no weight tying, so the head is written out as a copy of the embedding.
    assert torch.equal(merged.pop("output.weight"), state["tok_embeddings.weight"])
    assert set(merged) == set(state)
    for key in state:
        assert torch.equal(merged[key], state[key]), key


def test_export_rejects_shard_count_that_does_not_divide(tmp_path, capsys):
    folder, _, _ = _write(tmp_path, "llama3-gqa-2shards")
    convert(folder, tmp_path / "model", progress=False)
    rc = convert_weights.main(["--to-meta", "--input", str(tmp_path / "model"), "--output", str(tmp_path / "x"),
                               "--shards", "3", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --shards 3: does not divide") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


# --- Hugging Face safetensors import ---------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_hf_safetensors_import_matches_hf(tmp_path, tied):
    config = LlamaConfig(**_BASE, n_kv_heads=2, vocab_size=128, rope_theta=500000.0, use_scaled_rope=True,
                         rope_scaling=RopeScaling(factor=8.0), tie_embeddings=tied, max_seq_len=131072)
    state = random_meta_state(config, 3)
    model = hf_model_from_meta(state, config)
    hf_dir = tmp_path / "hf"
    # A small shard size makes HF write several files plus model.safetensors.index.json.
    model.save_pretrained(hf_dir, max_shard_size="100KB")
    assert (hf_dir / "model.safetensors.index.json").is_file()
    (hf_dir / "tokenizer.model").write_bytes(b"tok")
    result = convert(hf_dir, tmp_path / "out", progress=False)
    assert result.source_format == "hf" and result.config.tie_embeddings == tied

    tokens, positions = _inputs(config, 9000)
    ours, params, loaded = _our_logits(tmp_path / "out", tokens, positions)
    assert loaded.hidden_dim == config.hidden_dim and loaded.rope_scaling == config.rope_scaling
    with torch.no_grad():
        theirs = model(input_ids=torch.as_tensor(tokens), position_ids=torch.as_tensor(positions)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)
    # The q/k rotate-half permutation is undone exactly: we hold Meta's tensors again.
    expected = params_from_meta({k: v.numpy() for k, v in state.items()}, config)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, expected)


# --- bad input: one-line error, exit code 2, nothing left behind ------------------------------------------------

def _run_cli(capsys, *args: str) -> tuple[int, str]:
    rc = convert_weights.main(["--quiet", *args])
    return rc, capsys.readouterr().err


def _assert_refused(tmp_path, capsys, args, *fragments, keep=("meta",)):
    out = tmp_path / "out"
    rc, err = _run_cli(capsys, "--input", str(tmp_path / "meta"), "--output", str(out), *args)
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert _leftovers(tmp_path, keep) == [], "a failed conversion left files behind"
    return err


def test_missing_params_json(tmp_path, capsys):
    folder, _, _ = _write(tmp_path, "llama3-gqa-2shards")
    (folder / "params.json").unlink()
    _assert_refused(tmp_path, capsys, [], "params.json: missing")


def test_empty_folder_names_params_json(tmp_path, capsys):
    (tmp_path / "meta").mkdir()
    _assert_refused(tmp_path, capsys, [], "params.json: missing")


def test_missing_shard_file_in_sequence(tmp_path, capsys):
    folder, _, _ = _write(tmp_path, "llama3-8shards", checklist=False)
    (folder / "consolidated.03.pth").unlink()
    _assert_refused(tmp_path, capsys, [], "consolidated.03.pth: missing", "found shards 00, 01, 02, 04")


@pytest.mark.parametrize("name,message", [
    ("llama3-gqa-2shards", "implies vocab_size=64 over 1 shard(s), params.json says 128"),
    ("llama2-mha-2shards", "files missing? only 1 shard found"),
    ("llama3-8shards", "layers.0.attention.wq.weight has 128 along dim 0, not divisible by 7 shards"),
])
def test_last_shard_missing_is_a_shape_error(tmp_path, capsys, name, message):
    folder, _, _ = _write(tmp_path, name, checklist=False)
    shards = sorted(folder.glob("consolidated.*.pth"))
    shards[-1].unlink()
    if name == "llama3-8shards":  # 7 of 8 files: the vocab still divides, the heads do not
        (folder / "params.json").write_text(json.dumps({**json.loads((folder / "params.json").read_text()),
                                                        "vocab_size": 224}))
    _assert_refused(tmp_path, capsys, [], message)


def test_checklist_lists_missing_shard(tmp_path, capsys):
    folder, _, _ = _write(tmp_path, "llama3-gqa-2shards")
    (folder / "consolidated.01.pth").unlink()
    _assert_refused(tmp_path, capsys, [], "consolidated.01.pth: listed in checklist.chk but missing")


def test_shapes_not_divisible_by_shard_count(tmp_path, capsys):
    folder, _, config = _write(tmp_path, "llama2-mha-2shards", checklist=False)
    single = torch.load(folder / "consolidated.00.pth", weights_only=True)
    for p in folder.glob("consolidated.*.pth"):
        p.unlink()
    # Three copies of a 2-way shard: dim 64 cannot be split 3 ways.
    for i in range(3):
        torch.save(single, folder / f"consolidated.{i:02d}.pth")
    _assert_refused(tmp_path, capsys, [], "consolidated.00.pth", "tok_embeddings.weight")


def test_truncated_pth(tmp_path, capsys):
    folder, _, _ = _write(tmp_path, "llama3-gqa-2shards")
    path = folder / "consolidated.01.pth"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _assert_refused(tmp_path, capsys, ["--no-verify"], "consolidated.01.pth: cannot read the PyTorch checkpoint",
                    "truncated or corrupt")
    # With the checklist the md5 catches it first, naming the file.
    _assert_refused(tmp_path, capsys, [], "consolidated.01.pth: md5", "does not match checklist.chk")


def test_corrupt_pth(tmp_path, capsys):
    folder, _, _ = _write(tmp_path, "llama3-gqa-2shards")
    path = folder / "consolidated.00.pth"
    data = bytearray(path.read_bytes())
    data[:64] = b"\x00" * 64
    path.write_bytes(bytes(data))
    _assert_refused(tmp_path, capsys, ["--no-verify"], "consolidated.00.pth: cannot read the PyTorch checkpoint")


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pth_that_would_run_code_is_refused(tmp_path, capsys):
    folder, _, _ = _write(tmp_path, "llama3-gqa-2shards", checklist=False)
    marker = tmp_path / "meta" / "pwned"
    shard = torch.load(folder / "consolidated.01.pth", weights_only=True)
    torch.save({**shard, "evil": _RunsCode(marker)}, folder / "consolidated.01.pth")
    _assert_refused(tmp_path, capsys, [], "consolidated.01.pth: refused")
    assert not marker.exists()


def test_shapes_disagree_with_params_json(tmp_path, capsys):
    folder, _, _ = _write(tmp_path, "llama3-gqa-2shards", checklist=False)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "n_kv_heads": 1}))
    _assert_refused(tmp_path, capsys, [], "layers.0.attention.wk.weight has shape (16, 64)",
                    "params.json implies (8, 64) per shard")


def test_more_layers_in_params_json_than_in_shards(tmp_path, capsys):
    folder, _, _ = _write(tmp_path, "llama3-gqa-2shards", checklist=False)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "n_layers": 3}))
    _assert_refused(tmp_path, capsys, [], "missing tensor layers.2.attention.wq.weight")


def test_norms_must_be_replicated(tmp_path, capsys):
    folder, _, _ = _write(tmp_path, "llama3-gqa-2shards", checklist=False)
    shard = torch.load(folder / "consolidated.01.pth", weights_only=True)
    shard["layers.1.ffn_norm.weight"] = shard["layers.1.ffn_norm.weight"] + 1
    torch.save(shard, folder / "consolidated.01.pth")
    _assert_refused(tmp_path, capsys, [], "consolidated.01.pth: layers.1.ffn_norm.weight differs")


def test_checklist_mismatch_names_the_file(tmp_path, capsys):
    folder, _, _ = _write(tmp_path, "llama3-gqa-2shards")
    (folder / "params.json").write_text((folder / "params.json").read_text() + " ")
    _assert_refused(tmp_path, capsys, [], "params.json: md5", "does not match checklist.chk")


def test_existing_output_needs_overwrite(tmp_path, capsys):
    folder, _, _ = _write(tmp_path, "llama3-gqa-2shards")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _assert_refused(tmp_path, capsys, [], "out: already exists (pass --overwrite", keep=("meta", "out"))
    assert (out / "keep.txt").read_text() == "precious"
    rc, err = _run_cli(capsys, "--input", str(folder), "--output", str(out), "--overwrite")
    assert rc == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert _leftovers(tmp_path) == ["out"]


def test_failure_mid_conversion_leaves_nothing(tmp_path, monkeypatch):
    folder, _, _ = _write(tmp_path, "llama3-gqa-2shards")
    from llama_jax import convert as convert_lib

    real = convert_lib.MetaSource.layer

    def failing(self, i):
        if i == 1:
            raise RuntimeError("disk on fire")
        return real(self, i)

    monkeypatch.setattr(convert_lib.MetaSource, "layer", failing)
    with pytest.raises(Exception, match="disk on fire"):
        convert(folder, tmp_path / "out", progress=False)
    assert _leftovers(tmp_path) == []


_INTERRUPT_MIDWAY = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import convert_weights
from llama_jax import convert

real = convert.MetaSource.layer

def layer(self, i):
    if i == 1:  # Ctrl-C while layer 0 is already written: the main thread gets KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
    return real(self, i)

convert.MetaSource.layer = layer
sys.exit(convert_weights.main(["--input", {src!r}, "--output", {out!r}, "--quiet"]))
"""


def test_ctrl_c_mid_conversion_leaves_nothing(tmp_path):
    folder, _, _ = _write(tmp_path, "llama3-gqa-2shards")
    script = _INTERRUPT_MIDWAY.format(root=str(ROOT), src=str(folder), out=str(tmp_path / "out"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: interrupted; no output was written"
    assert "Traceback" not in done.stderr
    assert _leftovers(tmp_path) == []


def test_cli_subprocess_help_and_error(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "convert_weights.py", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    helped = run("--help")
    assert helped.returncode == 0 and "--to-meta" in helped.stdout and "--dtype" in helped.stdout
    (tmp_path / "meta").mkdir()
    failed = run("--input", str(tmp_path / "meta"), "--output", str(tmp_path / "out"))
    assert failed.returncode == 2 and failed.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'meta' / 'params.json'}: missing (expected Meta's params.json + consolidated.NN.pth, "
        "or a Hugging Face config.json + model*.safetensors)"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["[1, 2]", "{not json"])
def test_params_json_that_is_not_an_object(tmp_path, capsys, content):
    folder, _, _ = _write(tmp_path, "llama3-gqa-2shards", checklist=False)
    (folder / "params.json").write_text(content)
    _assert_refused(tmp_path, capsys, [], "params.json: ")
