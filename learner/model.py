"""The policy as the learner holds it: Hugging Face causal LM, fp32 lm_head, FSDP2-sharded.

Precision: master weights are fp32 everywhere. The body computes in `body_dtype` (bf16 on CUDA by
default, via FSDP2's MixedPrecisionPolicy with fp32 gradient reduction; fp32 on CPU). lm_head lives
in the FSDP root with an fp32 policy and casts the hidden states to fp32 before an fp32 matmul,
exactly as the actor's head does, so a token's logprob does not depend on the body's dtype rounding
at the last step. Tied embeddings share that fp32 matrix (see load_policy). Published and exported
weights: body in body_dtype, the head matrix in fp32 (publish_dtypes).
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


def _fp32_head(head: nn.Linear, shared: nn.Parameter | None = None) -> Fp32LMHead:
    """The fp32 head replacing `head`; with `shared`, its weight is that parameter (tied embeddings)."""
    new = Fp32LMHead(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    new.weight = shared if shared is not None else nn.Parameter(head.weight.detach().float())
    if head.bias is not None:
        new.bias = nn.Parameter(head.bias.detach().float())
    return new


def head_is_tied(model: nn.Module) -> bool:
    """Whether lm_head and the input embedding are one parameter (tie_word_embeddings)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def _cast_output(dtype: torch.dtype):
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return output.to(dtype)
    return hook


def _cast_parameters(model: nn.Module, dtype: torch.dtype, keep: nn.Module | None) -> None:
    """Parameters (not buffers, as FSDP's mixed precision does) to `dtype`, except those of `keep`."""
    kept = {id(p) for p in keep.parameters()} if keep is not None else set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) not in kept:
                param.data = param.data.to(dtype)


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

    FSDP2 units: each decoder layer, the input embedding (untied) and the final norm in the body's
    policy (body_dtype), then the root, which holds lm_head, in the head's policy (fp32 with
    fp32_lm_head) and is not resharded after forward: tether.learner.completion calls the head in
    chunks after the body's forward, all on the one gathered copy, and FSDP reshards it after backward.

    Tied embeddings: the one matrix stays in the root as the fp32 head, and the embedding's output
    is cast to body_dtype, which equals a lookup in the body_dtype-rounded matrix row for row (what
    the actor's tied fp32 head does too, tether.actor.fp32_head). Gradients of both uses land in the
    one fp32 master weight.

    Without `shard` the model is a plain module (single-process reference runs); with body_dtype !=
    fp32 its parameters other than the fp32 head's are then held in body_dtype directly.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    tied = head_is_tied(model)
    if fp32_lm_head:
        shared = model.get_input_embeddings().weight if tied else None
        model.lm_head = _fp32_head(model.lm_head, shared=shared)
        if tied and body_dtype != torch.float32:
            model.get_input_embeddings().register_forward_hook(_cast_output(body_dtype))
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
        decoder = model.get_decoder()
        for layer in decoder.layers:
            fully_shard(layer, mp_policy=body)
        if not tied:
            fully_shard(model.get_input_embeddings(), mp_policy=body)
        if getattr(decoder, "norm", None) is not None:
            fully_shard(decoder.norm, mp_policy=body)
        fully_shard(model, mp_policy=head if fp32_lm_head else body, reshard_after_forward=False)
    elif body_dtype != torch.float32:
        _cast_parameters(model, body_dtype, keep=model.lm_head if fp32_lm_head else None)
    model.train(trainable)
    return model


def publish_dtypes(model: nn.Module, body_dtype: torch.dtype, fp32_lm_head: bool) -> dict[str, torch.dtype]:
    """What the learner publishes and exports: state-dict name -> dtype, in state-dict order.

    lm_head in fp32 (with fp32_lm_head), everything else in body_dtype. A tied matrix is published
    once, under its first name in module order, the input embedding's (the name vLLM and
    transformers load it by; both skip the alias lm_head.weight), in the head's dtype: the actor's
    fp32 head and its embedding lookup then read the fp32 values the learner trains.
    """
    head_names: list[str] = ["lm_head.weight"]
    if head_is_tied(model):
        head = model.get_output_embeddings().weight
        head_names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is head]
    dtypes = {}
    for name in model.state_dict():
        if name in head_names[1:]:
            continue  # an alias of the tied matrix
        is_head = name == head_names[0] or name.startswith("lm_head.")
        dtypes[name] = torch.float32 if fp32_lm_head and is_head else body_dtype
    return dtypes


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The unsharded tensor (an all-gather for an FSDP DTensor: every rank must call it)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
