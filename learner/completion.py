"""Logprobs and entropies of the completion tokens, computed only where they are needed.

A micro-batch of B sequences of T tokens has L completion positions per sequence (L < T: the prompt
is not scored). The final projection and the logprob processing cost B x positions x V in fp32; run
at every position, as the model's own forward does, that is [B, T, V] logits plus the processing's
copies of the same size (7.5 GB per copy for a 150k vocabulary at 8 x 1536 tokens).

Here the body runs once over [B, T] (the model's forward with no logit position kept), the hidden
states are gathered at the L positions that predict completion tokens, and the head plus the
processing (temperature, top-k, top-p: tether.learner.logprobs) run over chunks of those positions.
Each chunk runs under activation checkpointing: backward recomputes the chunk's logits instead of
keeping them, so the logits held at any time are one chunk (at most `chunk_bytes`), whatever L and V.
Every position's numbers come from the same row-wise operations as the full computation
(`reference_completion_logprobs`, the previous implementation, kept for tests and the benchmark).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tether.learner.logprobs import processed_entropy, processed_logprobs

DEFAULT_CHUNK_BYTES = 256 * 2**20
"""fp32 logits per chunk when the caller does not say (learner.logits_chunk_mb)."""

SamplingSpec = tuple[float, int, float]
"""(temperature, top_k, top_p) of one sequence, as the actor sampled it."""


def final_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] hidden states after the final norm, through the model's own forward.

    The forward keeps no logit position (`logits_to_keep` empty), so the head costs nothing there;
    going through the root module rather than the decoder alone keeps FSDP's root hooks in charge.
    """
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, args, output) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = model.get_decoder().register_forward_hook(keep)
    try:
        none = torch.empty(0, dtype=torch.long, device=input_ids.device)
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=none)
    finally:
        handle.remove()
    return captured[-1]


def _process(logits: torch.Tensor, token_ids: torch.Tensor, spec: SamplingSpec):
    logprobs = processed_logprobs(logits, token_ids, *spec)
    with torch.no_grad():
        entropy = processed_entropy(logits.detach(), *spec)
    return logprobs, entropy


def _head_logprobs(head: nn.Module, hidden: torch.Tensor, token_ids: torch.Tensor, sampling: tuple[SamplingSpec, ...]):
    """Logits of one chunk of positions for every row in one matmul, then each row's processing."""
    logits = head(hidden).float()
    specs = sorted(set(sampling))
    if len(specs) == 1:
        return _process(logits, token_ids, specs[0])
    order, logprobs, entropies = [], [], []
    for spec in specs:
        rows = torch.tensor([i for i, s in enumerate(sampling) if s == spec], device=logits.device)
        lp, ent = _process(logits[rows], token_ids[rows], spec)
        order.append(rows)
        logprobs.append(lp)
        entropies.append(ent)
    inverse = torch.argsort(torch.cat(order))
    return torch.cat(logprobs)[inverse], torch.cat(entropies)[inverse]


def completion_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    completion_ids: torch.Tensor,
    sampling: Sequence[SamplingSpec],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Processed logprobs (differentiable) and entropies (detached) of the completion tokens, [B, L].

    `positions` [B, L] are the positions whose logits predict each token of `completion_ids` [B, L];
    `sampling` gives each sequence's (temperature, top_k, top_p), replayed as the actor sampled.
    Chunks span every row and as many positions as `chunk_bytes` of fp32 logits hold.
    Under FSDP every rank must call this (the body's forward is a collective).
    """
    hidden = final_hidden_states(model, input_ids, attention_mask)
    hidden = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    head = model.get_output_embeddings()
    completion_ids = completion_ids.to(hidden.device)
    rows, length = completion_ids.shape
    step = max(1, chunk_bytes // max(1, rows * head.weight.shape[0] * 4))
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    sampling = tuple(sampling)
    logprobs, entropies = [], []
    for start in range(0, length, step):
        # Contiguous: a strided slice takes another GEMM path whose rounding differs from the full matmul.
        h, ids = hidden[:, start:start + step].contiguous(), completion_ids[:, start:start + step]
        if recompute:
            lp, ent = checkpoint(_head_logprobs, head, h, ids, sampling, use_reentrant=False)
        else:
            lp, ent = _head_logprobs(head, h, ids, sampling)
        logprobs.append(lp)
        entropies.append(ent)
    if not torch.is_grad_enabled():
        _reshard(model)  # no backward will: free the root's gathered head now
    return torch.cat(logprobs, dim=1), torch.cat(entropies, dim=1)


def _reshard(model: nn.Module) -> None:
    reshard = getattr(model, "reshard", None)  # FSDPModule
    if callable(reshard):
        reshard()


def reference_completion_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    completion_ids: torch.Tensor,
    sampling: Sequence[SamplingSpec],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The computation completion_logprobs replaced: [B, T, V] fp32 logits at every position, then
    gathered and processed whole. Kept as the reference for tests and benchmarks/bench_learner.py."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    index = positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    logits = logits.gather(1, index).float()
    completion_ids = completion_ids.to(logits.device)
    specs = sorted(set(sampling))
    order, logprobs, entropies = [], [], []
    for spec in specs:
        rows = torch.tensor([i for i, s in enumerate(sampling) if s == spec], device=logits.device)
        order.append(rows)
        logprobs.append(processed_logprobs(logits[rows], completion_ids[rows], *spec))
        with torch.no_grad():
            entropies.append(processed_entropy(logits[rows].detach(), *spec))
    inverse = torch.argsort(torch.cat(order))
    result = torch.cat(logprobs)[inverse], torch.cat(entropies)[inverse]
    if not torch.is_grad_enabled():
        _reshard(model)
    return result
