"""Meshes, logical-axis sharding and multi-process training on CPU.

Multi-device checks run in subprocesses started with XLA_FLAGS=--xla_force_host_platform_device_count=N: the
flag only works before jax starts, and this pytest process has long started it.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch

from hf_reference import hf_logits, random_meta_state
from llama_jax import data
from llama_jax import sharding as sh
from llama_jax.config import LlamaConfig
from subprocess_env import free_port, last_json, run_processes, run_python

# kv heads (2) do not divide the 4-way tensor axis: they must fall back to replicated, not fail.
SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64)
MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (1, 2, 4)]


# --- pure logic --------------------------------------------------------------------------------------------------

def test_mesh_shape_resolution_and_errors():
    assert sh.MeshShape().resolve(8).as_tuple() == (8, 1, 1)
    assert sh.MeshShape(-1, 2, 2).resolve(8).as_tuple() == (2, 2, 2)
    assert sh.MeshShape(2, 1, 1).resolve(8).as_tuple() == (2, 1, 1)  # a smaller mesh uses the first devices
    with pytest.raises(sh.ShardingError, match="needs 16 devices, only 8 available"):
        sh.MeshShape(4, 2, 2).resolve(8)
    with pytest.raises(sh.ShardingError, match="does not divide the 8 available devices"):
        sh.MeshShape(-1, 3, 1).resolve(8)


def test_batch_must_split_over_the_data_axes():
    assert sh.check_batch(16, 2, sh.MeshShape(2, 4, 1)) == 8
    with pytest.raises(sh.ShardingError, match="not divisible by --grad-accum"):
        sh.check_batch(10, 4, sh.MeshShape(1, 1, 1))
    with pytest.raises(sh.ShardingError, match="not divisible by the data axes data x fsdp = 2 x 4"):
        sh.check_batch(12, 1, sh.MeshShape(2, 4, 1))


def test_distributed_flags():
    assert not sh.Distributed().enabled and sh.Distributed(num_processes=2).enabled
    with pytest.raises(sh.ShardingError, match="needs --coordinator"):
        sh.Distributed(None, 2, 0).validate()
    with pytest.raises(sh.ShardingError, match="--process-id=2: expected 0..1"):
        sh.Distributed("localhost:1", 2, 2).validate()
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert sh.Distributed.from_env(process_id=1) == sh.Distributed("h:1", 4, 1)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


# --- one step on several meshes ---------------------------------------------------------------------------------

MESH_SCRIPT = r"""
import json, sys
import jax, numpy as np
from llama_jax import sharding as sh, train as T
from llama_jax.config import LlamaConfig
from llama_jax.meta_weights import params_from_meta

cfg = LlamaConfig(**json.loads(sys.argv[1]))
z = np.load(sys.argv[2])
params = params_from_meta({k: z[k] for k in z.files if not k.startswith("batch_")}, cfg)
names = ("inputs", "targets", "mask", "segment_ids", "positions")  # the last two: document masking
batch = [z["batch_" + n] for n in names if "batch_" + n in z.files]
tc = T.TrainConfig(run_dir="-", data="-", steps=10, warmup_steps=0, lr=1e-3)
opt = T.make_optimizer(tc)
out = {}
for shape in json.loads(sys.argv[3]):
    mesh = sh.make_mesh(sh.MeshShape(*shape))
    shs = T.state_shardings(cfg, opt, mesh)
    bsh = sh.batch_sharding(mesh)
    fn = T.train_step_fn(cfg, opt, T.lr_schedule(tc), shs["params"])
    step = jax.jit(fn, in_shardings=(shs, *[bsh] * len(batch)), out_shardings=(shs, sh.replicated(mesh)),
                   donate_argnums=0)
    with sh.activate(mesh):
        state = T.init_state(cfg, opt, shs, 0, jax.device_put(params, shs["params"]))
        placed = [jax.device_put(x, bsh) for x in batch]
        lowered = jax.jit(fn).lower(state, *placed).as_text()
        state, m1 = step(state, *placed)
        state, m2 = step(state, *placed)
    plain = jax.jit(fn).lower(state, *placed).as_text()  # traced without the logical rules
    p = state["params"]
    out[str(tuple(shape))] = {
        "loss1": float(m1["loss"]), "loss2": float(m2["loss"]), "grad_norm": float(m1["grad_norm"]),
        "devices": len(p["tok_embeddings"].sharding.device_set),
        "wq": str(tuple(p["layers"]["attention"]["wq"].sharding.spec)),
        "wk": str(tuple(p["layers"]["attention"]["wk"].sharding.spec)),
        "batch": str(tuple(placed[0].sharding.spec)),
        "constraints": [lowered.count("sharding_constraint") + lowered.count("@Sharding"),
                        plain.count("sharding_constraint") + plain.count("@Sharding")],
    }
print(json.dumps(out))
"""


def _reference_loss(state, config, inputs, targets, mask, segment_ids=None) -> float:
    """Cross-entropy of the batch from Hugging Face's model: torch log-softmax, masked mean. With segment_ids,
    each segment's logits are HF's for that segment alone."""
    if segment_ids is None:
        logits = torch.as_tensor(hf_logits(state, config, inputs))
    else:
        logits = torch.as_tensor(np.stack([np.concatenate([hf_logits(state, config, row[seg == s][None])[0]
                                                           for s in np.unique(seg)])
                                           for row, seg in zip(inputs, segment_ids)]))
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(-1, torch.as_tensor(targets, dtype=torch.long)[..., None])[..., 0].numpy()
    return float((nll * mask).sum() / mask.sum())


@pytest.mark.slow
@pytest.mark.parametrize("document_mask", [False, True])
def test_one_step_is_the_same_on_every_mesh(tmp_path, document_mask):
    config = LlamaConfig(**SMALL)
    state = random_meta_state(config, seed=1)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, config.vocab_size, (8, 17))
    inputs, targets = rows[:, :-1], rows[:, 1:]
    mask = rng.random(targets.shape) < 0.8  # padding and document starts are masked out of the mean
    fields = dict(batch_inputs=inputs[None].astype(np.int32), batch_targets=targets[None].astype(np.int32),
                  batch_mask=mask[None])
    segment_ids = None
    if document_mask:  # 2-4 documents per row
        starts = rng.random(rows.shape) < 0.2
        starts[:, 0] = True
        segment_ids, positions = data.segments(starts)
        mask &= ~starts[:, 1:]  # a document's first token is not a target
        fields.update(batch_mask=mask[None], batch_segment_ids=segment_ids[None], batch_positions=positions[None])
    np.savez(tmp_path / "case.npz", **{k: v.numpy() for k, v in state.items()}, **fields)
    out = last_json(run_python(MESH_SCRIPT, json.dumps(SMALL), str(tmp_path / "case.npz"), json.dumps(MESHES)))

    reference = _reference_loss(state, config, inputs, targets, mask, segment_ids)
    single = out[str((1, 1, 1))]
    assert single["loss1"] == pytest.approx(reference, rel=1e-5)
    for shape in MESHES[1:]:
        got = out[str(shape)]
        assert got["devices"] == 8
        assert got["loss1"] == pytest.approx(single["loss1"], rel=1e-5), shape
        assert got["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4), shape
        assert got["loss2"] == pytest.approx(single["loss2"], rel=1e-5), shape  # same update on every mesh
        assert got["loss2"] < got["loss1"]
    fsdp_tp = out[str((1, 2, 4))]
    # (layers, embed, q_heads, head_dim): embed over fsdp, heads over tensor; 2 kv heads stay whole on 4 devices.
    assert fsdp_tp["wq"] == str((None, "fsdp", "tensor", None))
    assert fsdp_tp["wk"] == str((None, "fsdp", None, None))
    assert fsdp_tp["batch"] == str((None, ("data", "fsdp"), None))
    # The model's nn.with_logical_constraint calls become real constraints only under the rules + mesh.
    with_rules, without = fsdp_tp["constraints"]
    assert with_rules > without


# --- multi-process --------------------------------------------------------------------------------------------

MULTIPROCESS_SCRIPT = r"""
import json, sys
from llama_jax import sharding as sh, train as T
pid, n, port, run_dir, corpus, tok = sys.argv[1:7]
if int(n) > 1:
    sh.initialize_distributed(sh.Distributed(f"127.0.0.1:{port}", int(n), int(pid)))
import jax
tc = T.TrainConfig(run_dir=run_dir, data=corpus, tokenizer=tok, steps=4, batch_size=8, seq_len=32, lr=3e-3,
                   warmup_steps=1, eval_every=2, save_every=2, mesh_data=2, mesh_fsdp=2, seed=3,
                   model=T.ModelSpec(preset="demo", overrides={"dim": 64, "n_layers": 2, "multiple_of": 32}))
result = T.train(T.prepare(tc), progress=False)
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                  "devices": jax.device_count(), "local": jax.local_device_count(),
                  "losses": result.losses, "eval": result.eval_loss}))
"""


@pytest.mark.slow
def test_two_processes_train_in_lockstep_and_match_one(tmp_path, corpus):
    text, tok = corpus
    port = str(free_port())
    outs = [json.loads(out.strip().splitlines()[-1]) for out in run_processes(
        [[sys.executable, "-c", MULTIPROCESS_SCRIPT, str(i), "2", port, str(tmp_path / "multi"), str(text), str(tok)]
         for i in range(2)], devices=2)]
    single = last_json(run_python(MULTIPROCESS_SCRIPT, "0", "1", "0", str(tmp_path / "single"), str(text), str(tok),
                                  devices=4))

    assert [(o["process"], o["processes"], o["devices"], o["local"]) for o in outs] == [(0, 2, 4, 2), (1, 2, 4, 2)]
    assert (single["processes"], single["devices"]) == (1, 4)
    assert outs[0]["losses"] == outs[1]["losses"]  # lockstep: both processes see the same global loss
    assert len(single["losses"]) == 4
    for step, loss in single["losses"].items():
        assert outs[0]["losses"][step] == pytest.approx(loss, rel=1e-5)
    assert outs[0]["eval"] == pytest.approx(single["eval"], rel=1e-5)
    # Process 0 wrote one checkpoint both processes contributed to, loadable like any model folder.
    assert sorted(p.name for p in (tmp_path / "multi").iterdir() if p.name.isdigit()) == ["2", "4"]
