"""LoRA adapters against Hugging Face transformers + peft on the same base weights and the same non-zero A and B:
the loss and every adapter gradient; and a merged model against base + adapter."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_reference import hf_model_from_meta, permute_for_hf, random_meta_state
from llama_jax.adapters import TARGETS, LoraConfig, adapter_logical_axes, attach, init_adapters, merge
from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.kernels import LoraWeight
from llama_jax.meta_weights import params_from_meta
from llama_jax.model import forward
from subprocess_env import ROOT

CONFIG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64)
LORA = LoraConfig(rank=4, alpha=12.0)  # scale 3: a wrong scale is visible
HF_NAMES = {t: w.hf_key.rsplit(".", 1)[0] for t, w in TARGETS.items()}  # "wq" -> "self_attn.q_proj"


def _setup(seed=0):
    state = random_meta_state(CONFIG, seed)
    params = jax.tree.map(jnp.asarray, params_from_meta({k: v.numpy() for k, v in state.items()}, CONFIG))
    adapters = init_adapters(CONFIG, LORA, jax.random.key(seed))
    # Non-zero B too (a fresh adapter's B is zero, which would hide a wrong B or a wrong scale).
    adapters = jax.tree.map(lambda x: 0.2 * jax.random.normal(jax.random.key(seed + 1), x.shape), adapters)
    tokens = np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (2, 12))
    return state, params, adapters, tokens


def _loss(logits, tokens):
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], -1))


def _to_hf(target: str, kind: str, x: np.ndarray) -> np.ndarray:
    """Our a [*in, r] / b [r, *out] of one layer as peft's lora_A [r, in] / lora_B [out, r], q/k rows permuted."""
    if kind == "a":
        return x.reshape(-1, LORA.rank).T
    b = x.reshape(LORA.rank, -1).T
    heads = {"wq": CONFIG.n_heads, "wk": CONFIG.kv_heads}.get(target)
    return permute_for_hf(torch.as_tensor(b), heads).numpy() if heads else b


def test_loss_and_adapter_gradients_equal_peft():
    peft = pytest.importorskip("peft")
    state, params, adapters, tokens = _setup()
    loss, grads = jax.value_and_grad(
        lambda ad: _loss(forward(attach(params, ad, LORA), jnp.asarray(tokens), config=CONFIG)[0], tokens))(adapters)

    model = peft.get_peft_model(hf_model_from_meta(state, CONFIG), peft.LoraConfig(
        r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=0.0, target_modules=[n.split(".")[1] for n in HF_NAMES.values()]))
    layers = model.base_model.model.model.layers
    modules = {}
    for target, name in HF_NAMES.items():
        block, proj = name.split(".")
        ab = adapters["layers"][TARGETS[target].path[0]][target]
        for i in range(CONFIG.n_layers):
            module = getattr(getattr(layers[i], block), proj)
            modules[target, i] = module
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(torch.as_tensor(_to_hf(target, "a", np.array(ab["a"][i]))))
                module.lora_B["default"].weight.copy_(torch.as_tensor(_to_hf(target, "b", np.array(ab["b"][i]))))
    ids = torch.as_tensor(tokens)
    logits = model(input_ids=ids).logits
    hf_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    hf_loss.backward()

    np.testing.assert_allclose(float(loss), float(hf_loss.detach()), rtol=1e-5)
    for (target, i), module in modules.items():
        ours = grads["layers"][TARGETS[target].path[0]][target]
        for kind, hf_grad in (("a", module.lora_A["default"].weight.grad), ("b", module.lora_B["default"].weight.grad)):
            reference = hf_grad.numpy()
            got = _to_hf(target, kind, np.asarray(ours[kind][i]))
            assert np.abs(got - reference).max() <= 1e-4 * np.abs(reference).max() + 1e-7, (target, i, kind)


def test_merged_model_equals_base_plus_adapter():
    _, params, adapters, tokens = _setup(seed=3)
    adapted = forward(attach(params, adapters, LORA), jnp.asarray(tokens), config=CONFIG)[0]
    merged = forward(merge(params, adapters, LORA), jnp.asarray(tokens), config=CONFIG)[0]
    base = forward(params, jnp.asarray(tokens), config=CONFIG)[0]
    scale = np.abs(np.asarray(adapted)).max()
    assert np.abs(np.asarray(merged) - np.asarray(adapted)).max() <= 1e-4 * scale
    assert np.abs(np.asarray(base) - np.asarray(adapted)).max() > 1e-2 * scale  # the adapters do change the model


def test_fresh_adapters_leave_the_model_unchanged_and_shard_like_their_weights():
    _, params, _, tokens = _setup()
    adapters = init_adapters(CONFIG, LORA, jax.random.key(0))
    np.testing.assert_array_equal(forward(attach(params, adapters, LORA), jnp.asarray(tokens), config=CONFIG)[0],
                                  forward(params, jnp.asarray(tokens), config=CONFIG)[0])
    axes = adapter_logical_axes(CONFIG, LORA)["layers"]
    assert tuple(axes["attention"]["wq"]["a"]) == ("layers", "embed", "lora_rank")
    assert tuple(axes["attention"]["wq"]["b"]) == ("layers", "lora_rank", "q_heads", "head_dim")
    assert tuple(axes["attention"]["wo"]["a"]) == ("layers", "q_heads", "head_dim", "lora_rank")
    jax.tree.map(lambda x, spec: None if x.ndim == len(spec) else pytest.fail(f"{x.shape} vs {spec}"),
                 adapters, adapter_logical_axes(CONFIG, LORA), is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))


@pytest.mark.parametrize("kw,needle", [(dict(rank=0, alpha=1), "--lora-rank=0"), (dict(rank=2, alpha=0), "--lora-alpha"),
                                       (dict(rank=2, alpha=1, targets=("wq", "q_proj")), "--lora-targets"),
                                       (dict(rank=2, alpha=1, dropout=1.0), "--lora-dropout")])
def test_bad_lora_settings_name_the_flag(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        LoraConfig(**kw)


def _adapter_run(tmp_path, params, adapters):
    """A model folder and a run folder holding adapters for it, laid out as a LoRA training run writes them."""
    import orbax.checkpoint as ocp

    from llama_jax.adapters import AdapterInfo, base_identity
    from llama_jax.checkpoint import save_model

    base, run = tmp_path / "base", tmp_path / "run"
    save_model(base, params, CONFIG, None)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((run / "7" / "params").absolute(), adapters)
    checkpointer.wait_until_finished()
    AdapterInfo(str(base), base_identity(base), LORA).save(run)
    return base, run


def test_generation_with_unmerged_adapters_equals_the_merged_model(tmp_path):
    from llama_jax.adapters import AdapterError
    from llama_jax.checkpoint import save_model
    from llama_jax.generation import Generator

    _, params, adapters, _ = _setup(seed=5)
    base, run = _adapter_run(tmp_path, params, adapters)
    prompts = [[1, 5, 9, 77], [3, 4]]
    with_adapter = Generator.from_checkpoint(base, adapter=run)
    unmerged = [x for x in jax.tree.leaves(with_adapter.params, is_leaf=lambda x: isinstance(x, LoraWeight))
                if isinstance(x, LoraWeight)]
    assert len(unmerged) == len(LORA.targets) * CONFIG.n_layers
    merged = Generator(merge(params, adapters, LORA), CONFIG)
    plain = Generator(params, CONFIG)
    tokens = with_adapter.generate(prompts, max_new_tokens=8).tokens
    assert tokens == merged.generate(prompts, max_new_tokens=8).tokens
    assert tokens != plain.generate(prompts, max_new_tokens=8).tokens
    # Adapters against another base (same shapes, another save) are refused, naming both.
    other = tmp_path / "other"
    save_model(other, params, CONFIG, None)
    with pytest.raises(AdapterError, match=r"adapters were trained on .*base .*other is another model"):
        Generator.from_checkpoint(other, adapter=run)


def run_convert(*flags):
    return subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), "--quiet", *flags], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_convert_merges_adapters_into_a_model_folder(tmp_path):
    from llama_jax.checkpoint import load_model, save_model

    _, params, adapters, tokens = _setup(seed=6)
    base, run = _adapter_run(tmp_path, params, adapters)
    reference = np.asarray(forward(attach(params, adapters, LORA), jnp.asarray(tokens), config=CONFIG)[0])

    proc = run_convert("--input", str(base), "--adapter", str(run), "--output", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr
    merged, config, _ = load_model(tmp_path / "merged")
    logits = np.asarray(forward(merged, jnp.asarray(tokens), config=config)[0])
    assert np.abs(logits - reference).max() <= 1e-4 * np.abs(reference).max()
    # Another base is refused with one line, and nothing is written.
    save_model(tmp_path / "other", params, CONFIG, None)
    proc = run_convert("--input", str(tmp_path / "other"), "--adapter", str(run), "--output", str(tmp_path / "bad"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "another model" in proc.stderr
    assert not (tmp_path / "bad").exists()


LLAMA2_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "llama2" / "tokenizer.model"


@pytest.mark.skipif(not LLAMA2_TOKENIZER.is_file(), reason=f"real Llama 2 tokenizer not found at {LLAMA2_TOKENIZER}")
def test_hf_export_with_adapters_gives_the_adapted_logits(tmp_path):
    import orbax.checkpoint as ocp
    import transformers

    from llama_jax.adapters import AdapterInfo, base_identity
    from llama_jax.checkpoint import save_model

    config = CONFIG.replace(vocab_size=32000)  # the tokenizer's vocabulary, which the export checks
    state = random_meta_state(config, 7)
    params = jax.tree.map(jnp.asarray, params_from_meta({k: v.numpy() for k, v in state.items()}, config))
    adapters = jax.tree.map(lambda x: 0.2 * jax.random.normal(jax.random.key(8), x.shape),
                            init_adapters(config, LORA, jax.random.key(7)))
    save_model(tmp_path / "base", params, config, LLAMA2_TOKENIZER)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((tmp_path / "run" / "1" / "params").absolute(), adapters)
    checkpointer.wait_until_finished()
    AdapterInfo(str(tmp_path / "base"), base_identity(tmp_path / "base"), LORA).save(tmp_path / "run")

    proc = run_convert("--input", str(tmp_path / "base"), "--adapter", str(tmp_path / "run"), "--to-hf",
                       "--output", str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12))
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        hf = model(input_ids=torch.as_tensor(tokens)).logits.numpy()
    ours = np.asarray(forward(attach(params, adapters, LORA), jnp.asarray(tokens), config=config)[0])
    assert np.abs(hf - ours).max() <= 1e-4 * np.abs(ours).max()
