"""Random Qwen2 models for the actor's tests and benchmarks (not the embedded warm-started model).

A random model is built in a second and its logit scale is set on purpose: random init gives nearly
uniform next-token distributions, where dtype effects and top-p filtering hardly show. `head_std`
scales the lm_head so logits have a realistic spread (std of a few units).
"""

from __future__ import annotations

from pathlib import Path

import torch


def build_random_qwen2(out_dir: str | Path, *, hidden_size: int = 128, num_layers: int = 2,
                       num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 384,
                       vocab_size: int = 257, head_std: float = 0.25, seed: int = 0) -> Path:
    """Save a random fp32 Qwen2 (untied lm_head) plus the byte-level tokenizer to `out_dir`."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from tether.common.tiny_model import EOS_ID, build_tokenizer

    out = Path(out_dir)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID, use_sliding_window=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, head_std)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    GenerationConfig(bos_token_id=EOS_ID, eos_token_id=[EOS_ID], do_sample=True, temperature=0.3, top_k=5).save_pretrained(out)
    return out


def load_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by Hugging Face name, fp32 as saved."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(file))
    return state


def perturbed_state(state: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor times (1 + scale * noise): new weights whose outputs clearly differ."""
    gen = torch.Generator().manual_seed(seed)
    return {name: tensor * (1 + scale * torch.randn(tensor.shape, generator=gen)) for name, tensor in state.items()}
