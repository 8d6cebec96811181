"""The learner's definition of a token's logprob, identical to vLLM's processed_logprobs.

vLLM V1's sampler, with `logprobs_mode=processed_logprobs`, reports log_softmax of the logits after:
  1. division by the temperature,
  2. top-k: logits below the k-th largest set to -inf (ties with the k-th are kept),
  3. top-p on the renormalised top-k distribution: sorted ascending, tokens whose cumulative
     probability is <= 1 - top_p set to -inf, always keeping the most likely token.
The learner applies exactly this to its own fp32 logits, so a token generated and scored with the
same weights has a new/old ratio of 1 up to numerics (docs/logprobs.md).
"""

from __future__ import annotations

import torch


def process_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p, as vLLM's sampler does; masked entries become -inf.

    `logits` is [..., vocab]; the result is float32 of the same shape. top_k=0 and top_p=1 disable
    the filters.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = logits.float() / temperature
    vocab = scaled.shape[-1]
    if 0 < top_k < vocab:
        kth_largest = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1.0 - top_p
        drop_sorted[..., -1] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def processed_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Logprob of each `token_ids[...]` under the processed distribution of `logits[..., :]`.

    Differentiable. A token outside the top-k/top-p set gets -inf (the sampler could not have
    produced it), which is only possible for off-policy tokens.
    """
    logprobs = torch.log_softmax(process_logits(logits, temperature, top_k, top_p), dim=-1)
    return logprobs.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)


def processed_entropy(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Entropy of the processed (sampled-from) distribution, per position."""
    logprobs = torch.log_softmax(process_logits(logits, temperature, top_k, top_p), dim=-1)
    probs = logprobs.exp()
    return -(probs * logprobs.nan_to_num(neginf=0.0)).sum(dim=-1)
