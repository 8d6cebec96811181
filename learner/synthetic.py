"""Rollouts sampled locally from a Hugging Face model, for tests, benchmarks and offline runs.

Sampling replays the actor's processing (tether.learner.logprobs: temperature, top-k, top-p) and
records each token's processed logprob, so the rollouts are what an actor at `version` would send.
The reward is a toy one with signal: the fraction of completion tokens equal to `target_token`, or,
without one, the fraction of completion tokens that are ASCII bytes (< 128).
"""

from __future__ import annotations

import numpy as np
import torch

from tether.common.messages import Rollout, SamplingSpec, float32_array, int32_array
from tether.learner.logprobs import process_logits


@torch.no_grad()
def sample_rollouts(
    model,
    *,
    groups: int,
    group_size: int,
    prompt_len: int = 6,
    max_tokens: int = 8,
    sampling: SamplingSpec | None = None,
    version: int = 0,
    target_token: int | None = None,
    vocab_limit: int = 256,
    seed: int = 0,
) -> list[Rollout]:
    """`groups` prompts of random bytes, `group_size` sampled completions each (fp32 forward)."""
    sampling = sampling or SamplingSpec(temperature=1.0, max_tokens=max_tokens)
    gen = torch.Generator().manual_seed(seed)
    rollouts = []
    for g in range(groups):
        prompt = torch.randint(0, vocab_limit, (prompt_len,), generator=gen)
        ids = prompt.repeat(group_size, 1)
        logprobs = []
        for _ in range(max_tokens):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
            processed = process_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
            token = torch.multinomial(processed.softmax(-1), 1, generator=gen)
            logprobs.append(torch.log_softmax(processed, -1).gather(-1, token))
            ids = torch.cat([ids, token], dim=1)
        logprobs = torch.cat(logprobs, dim=1)
        for i in range(group_size):
            completion = ids[i, prompt_len:].numpy()
            rollouts.append(Rollout(
                rollout_id=f"r{seed}-{g}-{i}", group_id=f"g{seed}-{g}", group_size=group_size, actor_id="synthetic",
                task="synthetic", prompt_token_ids=int32_array(prompt.numpy()), completion_token_ids=int32_array(completion),
                logprobs=float32_array(np.minimum(logprobs[i].numpy(), 0.0)),
                versions=int32_array(np.full(max_tokens, version)), reward=float(np.mean(completion == target_token) if target_token is not None else np.mean(completion < 128)),
                sampling=sampling, finish_reason="length",
            ))
    return rollouts
