"""Independent reference: Hugging Face transformers' LlamaForCausalLM (PyTorch, CPU) built from Meta-format weights.

HF rotates q/k with rotate-half over [first half | second half] of each head, Meta with interleaved pairs; HF's own
conversion script reorders the rows of wq/wk so the two agree. `permute_for_hf` is that reordering.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

from llama_jax.config import LlamaConfig


def random_meta_state(config: LlamaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """An unsharded state dict with Meta's names and shapes ([out, in] Linear weights), fp32 random values."""
    g = torch.Generator().manual_seed(seed)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=g) / in_features**0.5

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)  # not all-ones, so a dropped norm weight is caught

    d, hd, f = config.dim, config.head_dim, config.hidden_dim
    state = {"tok_embeddings.weight": torch.randn(config.vocab_size, d, generator=g)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        state[p + "attention.wq.weight"] = linear(config.n_heads * hd, d)
        state[p + "attention.wk.weight"] = linear(config.kv_heads * hd, d)
        state[p + "attention.wv.weight"] = linear(config.kv_heads * hd, d)
        state[p + "attention.wo.weight"] = linear(d, config.n_heads * hd)
        state[p + "feed_forward.w1.weight"] = linear(f, d)
        state[p + "feed_forward.w2.weight"] = linear(d, f)
        state[p + "feed_forward.w3.weight"] = linear(f, d)
        state[p + "attention_norm.weight"] = norm(d)
        state[p + "ffn_norm.weight"] = norm(d)
    state["norm.weight"] = norm(d)
    if not config.tie_embeddings:
        state["output.weight"] = linear(config.vocab_size, d)
    return state


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_features, in_features = w.shape
    return w.view(n_heads, out_features // n_heads // 2, 2, in_features).transpose(1, 2).reshape(out_features,
                                                                                                 in_features)


def hf_config(config: LlamaConfig) -> transformers.LlamaConfig:
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.use_scaled_rope:
        s = config.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": config.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_seq_len}
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads, head_dim=config.head_dim, rms_norm_eps=config.norm_eps,
        max_position_embeddings=config.max_seq_len, tie_word_embeddings=config.tie_embeddings,
        rope_parameters=rope, attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)


def hf_state_from_meta(state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    hf = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
          "lm_head.weight": state.get("output.weight", state["tok_embeddings.weight"])}
    names = {"attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
             "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
             "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
             "ffn_norm.weight": "post_attention_layernorm.weight"}
    for i in range(config.n_layers):
        meta, ours = f"layers.{i}.", f"model.layers.{i}."
        hf[ours + "self_attn.q_proj.weight"] = permute_for_hf(state[meta + "attention.wq.weight"], config.n_heads)
        hf[ours + "self_attn.k_proj.weight"] = permute_for_hf(state[meta + "attention.wk.weight"], config.kv_heads)
        for meta_name, hf_name in names.items():
            hf[ours + hf_name] = state[meta + meta_name]
    return hf


def hf_model_from_meta(state: dict[str, torch.Tensor], config: LlamaConfig) -> transformers.LlamaForCausalLM:
    model = transformers.LlamaForCausalLM(hf_config(config)).eval()
    missing, unexpected = model.load_state_dict(hf_state_from_meta(state, config), strict=False)
    # With tied embeddings HF does not list lm_head separately; nothing else may be left out.
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise AssertionError(f"HF weight mapping incomplete: missing={missing} unexpected={unexpected}")
    return model


def hf_logits(state: dict[str, torch.Tensor], config: LlamaConfig, tokens, positions=None) -> np.ndarray:
    """HF's fp32 logits [batch, seq, vocab] for Meta-format weights; `positions` default to 0..seq-1."""
    model = hf_model_from_meta(state, config)
    position_ids = None if positions is None else torch.as_tensor(np.asarray(positions).copy(), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long), position_ids=position_ids)
    return out.logits.float().numpy()
