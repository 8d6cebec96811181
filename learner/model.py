"""The policy as the learner holds it: Hugging Face causal LM, fp32 lm_head, FSDP2-sharded.

Precision: master weights are fp32 everywhere. The body computes in `body_dtype` (bf16 on CUDA by
default, via FSDP2's MixedPrecisionPolicy with fp32 gradient reduction; fp32 on CPU). lm_head is
its own FSDP unit with an fp32 policy and casts the hidden states to fp32 before an fp32 matmul,
exactly as the actor's head does, so a token's logprob does not depend on the body's dtype rounding
at the last step. Published and exported weights: body in body_dtype, lm_head in fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class Fp32LMHead(nn.Linear):
    """nn.Linear that always computes in fp32: hidden states cast up, fp32 weights, fp32 logits."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states.float(), self.weight.float(), None if self.bias is None else self.bias.float())


def _fp32_head(head: nn.Linear) -> Fp32LMHead:
    new = Fp32LMHead(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    new.weight = nn.Parameter(head.weight.detach().float())
    if head.bias is not None:
        new.bias = nn.Parameter(head.bias.detach().float())
    return new


def load_policy(
    model_dir: str | Path,
    device: torch.device,
    body_dtype: torch.dtype,
    *,
    fp32_lm_head: bool = True,
    activation_checkpointing: bool = False,
    shard: bool = True,
    trainable: bool = True,
) -> nn.Module:
    """Load the HF model at `model_dir` for training; with `shard`, apply FSDP2 on the default group.

    fully_shard wraps each decoder layer, then lm_head (fp32 policy), then the root. Without `shard`
    the model is a plain module (single-process reference runs); with body_dtype != fp32 it then
    holds its body in body_dtype directly.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    if getattr(model.config, "tie_word_embeddings", False) and fp32_lm_head:
        raise ValueError(
            f"{model_dir} ties lm_head to the embeddings; an fp32 lm_head needs its own weight (model.fp32_lm_head=false)"
        )
    if fp32_lm_head:
        model.lm_head = _fp32_head(model.lm_head)
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.to(device)
    if not trainable:
        model.requires_grad_(False)
    if shard:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        body = MixedPrecisionPolicy(param_dtype=body_dtype, reduce_dtype=torch.float32)
        head = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=body)
        fully_shard(model.lm_head, mp_policy=head if fp32_lm_head else body)
        fully_shard(model, mp_policy=body)
    elif body_dtype != torch.float32:
        head_module = model.lm_head
        model.to(body_dtype)
        if fp32_lm_head:
            head_module.float()
    model.train(trainable)
    return model


def publish_dtype(name: str, body_dtype: torch.dtype, fp32_lm_head: bool) -> torch.dtype:
    """dtype a tensor is published and exported in: lm_head fp32 (when fp32_lm_head), body in body_dtype."""
    if fp32_lm_head and name.startswith("lm_head."):
        return torch.float32
    return body_dtype


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The unsharded tensor (an all-gather for an FSDP DTensor: every rank must call it)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def completion_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, L, V] fp32 logits at `positions` ([B, L]): the ones that predict each completion token."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    index = positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return logits.gather(1, index).float()
