"""Generation on a mesh of 8 CPU devices against the same generation on one device: greedy tokens, the size of
every parameter and cache shard, and the collectives of the compiled decode step. Each mesh runs in a
subprocess, where XLA can still be told to expose several CPU devices."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_reference import random_meta_state
from llama_jax.config import LlamaConfig, preset
from subprocess_env import ROOT, free_port, last_json, run_processes, run_python

SCRIPT = r"""
import dataclasses, json, math, re, sys
import jax, numpy as np
from llama_jax import sharding as sh
from llama_jax.config import LlamaConfig
from llama_jax.generation import Generator
from llama_jax.meta_weights import params_from_meta

cfg = LlamaConfig(**json.loads(sys.argv[1]))
z = np.load(sys.argv[2])
params = params_from_meta({k: z[k] for k in z.files}, cfg)
prompts = json.loads(sys.argv[3])
out = {"single": Generator(params, cfg, packed_weights=False).generate(prompts, max_new_tokens=8).tokens}
for name, shape in json.loads(sys.argv[4]).items():
    # "explicit": a mesh from jax.make_mesh, whose axes are Explicit by default. "windows": 8 tensor, and decode
    # steps that read the cache as an accelerator does (past blocks of 8 slots, every cache here).
    mesh = (jax.make_mesh((8,), ("tensor",)) if shape == "explicit"
            else sh.make_mesh(sh.MeshShape(*(1, 1, 8) if shape == "windows" else shape)))
    gen = Generator(params, cfg, mesh=mesh)
    if shape == "windows":
        gen.ops = dataclasses.replace(gen.ops, cache_kernel="windows", attention_block=8)
    tokens = gen.generate(prompts, max_new_tokens=8).tokens
    tensor, data = gen.mesh.shape["tensor"], gen.mesh.shape["data"]
    # Each parameter shard: 1/tensor of the parameter where a dimension is split over the tensor axis, else whole.
    params_ok = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(gen.params):
        split = leaf.sharding.spec and "tensor" in jax.tree.leaves(tuple(leaf.sharding.spec))
        shards = {s.data.shape for s in leaf.addressable_shards}
        params_ok.append([jax.tree_util.keystr(path), len(shards) == 1 and
                          math.prod(shards.pop()) * (tensor if split else 1) == leaf.size, bool(split)])
    (prefill_key, prefill), = [(k, e) for k, e in gen.executables.items() if k[0] == "prefill"]
    state_shardings = prefill.output_shardings
    batch, length = prefill_key[1]
    cache_len = length + prefill_key[2]
    k_shape = (batch, gen.config.kv_heads, cache_len, cfg.head_dim)
    cache_shards = [list(s.shard_shape(k_shape)) for s in state_shardings.cache.k + state_shardings.cache.v]
    decode = [e for k, e in gen.executables.items() if k[0] == "decode"][0].as_text()
    gathered = [list(map(int, m.split(","))) if m else [] for m in re.findall(r"\w+\[([\d,]*)\][^ ]* all-gather\(", decode)]
    weights = sorted({tuple(leaf.shape) for leaf in jax.tree.leaves(gen.params) if leaf.ndim > 1})
    out[name] = {"tokens": tokens, "tensor": tensor, "data": data, "kv_heads": gen.config.kv_heads,
                 "k_shape": list(k_shape), "cache_shards": cache_shards, "params": params_ok,
                 "gathered": gathered, "weights": [list(w) for w in weights]}
print(json.dumps(out))
"""

MESHES = {"tensor8": (1, 1, 8), "data2-tensor4": (2, 1, 4), "explicit": "explicit", "tensor8-windows": "windows"}
BASE = dict(dim=64, n_layers=2, n_heads=8, vocab_size=128, multiple_of=32, max_seq_len=64, rope_theta=500000.0)
CASES = {"mha": dict(BASE), "gqa-kv2": dict(BASE, n_kv_heads=2), "gqa-kv4": dict(BASE, n_kv_heads=4)}
PROMPTS = [[1, 17, 33, 101, 7], [1, 100, 5, 9, 9, 31, 64, 2, 120, 77], [1], [1, 90, 91, 92]]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_generation_equals_one_device(case, tmp_path):
    fields = CASES[case]
    config = LlamaConfig(**fields)
    # Random weights in Meta's layout, at the scale that gives unit logits: greedy winners are clear.
    np.savez(tmp_path / "w.npz", **{k: v.numpy() for k, v in random_meta_state(config, seed=0).items()})
    out = last_json(run_python(SCRIPT, json.dumps(fields), str(tmp_path / "w.npz"), json.dumps(PROMPTS),
                               json.dumps(MESHES)))
    single = out.pop("single")
    assert len(single) == len(PROMPTS) and all(len(t) == 8 for t in single)
    for name, got in out.items():
        assert got["tokens"] == single, name
        tensor = got["tensor"]
        # KV heads the tensor axis does not divide are repeated until it does: each device holds the KV heads its
        # own query heads read (one or two here), never all of them.
        assert got["kv_heads"] % tensor == 0 and got["kv_heads"] // tensor <= max(1, config.kv_heads // tensor)
        for path, ok, split in got["params"]:
            assert ok, (name, path)
            assert split == ("norm" not in path), (name, path)  # every weight is split, only norm gains are whole
        batch, kv, length, head_dim = got["k_shape"]
        assert all(s == [batch // got["data"], kv // tensor, length, head_dim] for s in got["cache_shards"]), name
        # The decode step gathers no weight: its only all-gathers are the per-shard argmax candidates.
        assert not any(g in got["weights"] for g in got["gathered"]), (name, got["gathered"])
        assert all(np.prod(g) <= batch * config.vocab_size for g in got["gathered"]), (name, got["gathered"])


TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "llama2" / "tokenizer.model"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if not TOKENIZER.is_file():
        pytest.skip(f"real Llama 2 tokenizer not found at {TOKENIZER}")
    import jax
    import jax.numpy as jnp

    from llama_jax.checkpoint import save_model
    from llama_jax.meta_weights import params_from_meta

    config = preset("tiny-llama2", vocab_size=32000, dim=64, n_heads=8, n_kv_heads=2, max_seq_len=64)
    params = jax.tree.map(jnp.asarray, params_from_meta(
        {k: v.numpy() for k, v in random_meta_state(config, seed=1).items()}, config))
    folder = tmp_path_factory.mktemp("sharded") / "model"
    save_model(folder, params, config, TOKENIZER)
    return folder


def _generate_py(model_dir, *flags):
    return [sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(model_dir), "--temperature", "0",
            "--max-new-tokens", "6", "--prompt", "Hello there", "--prompt", "The sky is", *flags]


@pytest.mark.slow
def test_cli_mesh_flags_give_the_one_device_text(model_dir):
    one, tensor8, data2 = (run_python(f"import runpy, sys; sys.argv = {argv[1:]!r}; runpy.run_path(sys.argv[0], "
                                      "run_name='__main__')") for argv in (
        _generate_py(model_dir), _generate_py(model_dir, "--mesh-tensor", "8"),
        _generate_py(model_dir, "--mesh-data", "2", "--mesh-tensor", "4")))
    for proc in (one, tensor8, data2):
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert one.stdout.startswith("--- 1: Hello there") and tensor8.stdout == one.stdout == data2.stdout
    too_big = run_python(f"import runpy, sys; sys.argv = {_generate_py(model_dir, '--mesh-tensor', '16')[1:]!r}; "
                         "runpy.run_path(sys.argv[0], run_name='__main__')")
    assert too_big.returncode == 2 and too_big.stderr.strip().splitlines() == [
        "error: mesh data=1 x fsdp=1 x tensor=16 needs 16 devices, only 8 available"]


@pytest.mark.slow
def test_two_processes_generate_what_one_does(model_dir):
    port = str(free_port())
    outs = run_processes([_generate_py(model_dir, "--mesh-tensor", "4", "--coordinator", f"127.0.0.1:{port}",
                                       "--num-processes", "2", "--process-id", str(i)) for i in range(2)], devices=2)
    one = run_python(f"import runpy, sys; sys.argv = {_generate_py(model_dir)[1:]!r}; "
                     "runpy.run_path(sys.argv[0], run_name='__main__')")
    # Process 0 prints, and both computed the same tokens; jax's CPU collectives (gloo) log their own lines.
    # Their C++ threads can split one such line in two, so both halves are recognised.
    printed = [[line for line in out.splitlines() if "[Gloo]" not in line and "peer ranks" not in line]
               for out in outs]
    assert printed == [one.stdout.splitlines(), []]
