"""bf16 body: the engine's fp32 lm_head is really applied, shown statistically over many prompts.

Two engines on the same random model and bf16 body, head fp32 vs head bf16, sample 48 prompts with
48 sampling seeds. Two independent references (transformers, bf16 body) score each engine's tokens:
one with an fp32 head, one with a bf16 head. The vLLM body differs from PyTorch's by bf16 kernel
noise (~1.5e-2 per token here) that is larger than the head's own effect (~3e-3), so a single
comparison of means could go either way by chance; a per-prompt count cannot. Measured on two
models (seeds 3 and 5): the fp32-head engine was the closer one on 45/48 and 42/48 prompts, and
closer to the fp32-head reference than to the bf16-head one on 43/48 and 41/48. If the fp32 head
were not applied, the two engines would be the same engine (0/48 on the first count) and the
second count would be a coin flip (about 24/48; MIN_PROMPTS or more happens with p ~ 4e-4).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from tether.actor.engine import ActorEngine
from tether.actor.testing import build_random_qwen2, load_reference_model, reference_logprobs
from tether.common.config import EngineConfig, ModelConfig

pytestmark = pytest.mark.slow

T = 1.0  # no filtering: every token's logprob reflects the full logits
PROMPTS = [[(11 * i + j * 7 + (i // 16) * 5) % 250 + 3 for j in range(6 + i % 3)] for i in range(48)]
MIN_PROMPTS = 36
"""Prompts (of 48) on which the fp32 head must win each count: 75%, against 88-94% measured."""
MIN_MEAN_RATIO = 1.1
"""Mean gap of the bf16-head engine over the fp32-head engine's: at least 10% (measured 1.19-1.22)."""


def _run_engine(model_dir, fp32_head: bool):
    from vllm import SamplingParams

    async def run():
        config = EngineConfig(max_num_seqs=64, max_num_batched_tokens=1024, max_model_len=256)
        engine = await ActorEngine.start(config, ModelConfig(dtype="bfloat16", fp32_lm_head=fp32_head), str(model_dir))
        try:
            head = engine.report["lm_head"][0]
            outs = await asyncio.gather(*[
                engine.generate(p, SamplingParams(temperature=T, max_tokens=24, logprobs=0, seed=300 + i))
                for i, p in enumerate(PROMPTS)])
            return head, outs
        finally:
            engine.shutdown()
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()


def test_b_fp32_head_with_bf16_body(tmp_path):
    model_dir = build_random_qwen2(tmp_path / "m", hidden_size=256, num_layers=2, head_std=0.25, seed=3)
    head32, with_head = _run_engine(model_dir, fp32_head=True)
    head16, without = _run_engine(model_dir, fp32_head=False)
    assert head32["weight_dtype"] == "float32" and head32["method"] == "Fp32LMHeadMethod"
    assert head16["weight_dtype"] == "bfloat16"
    ref32 = load_reference_model(model_dir, torch.bfloat16, fp32_head=True)
    ref16 = load_reference_model(model_dir, torch.bfloat16, fp32_head=False)

    def gap(reference, completion) -> float:
        """Mean |reference - engine| logprob over one completion's tokens."""
        ref = reference_logprobs(reference, completion.prompt_token_ids, completion.token_ids, T).numpy()
        return float(np.abs(ref - completion.logprobs).mean())

    gap_with = np.array([gap(ref32, c) for c in with_head])
    gap_without = np.array([gap(ref32, c) for c in without])
    with_to_ref16 = np.array([gap(ref16, c) for c in with_head])
    closer_engine = int((gap_with < gap_without).sum())
    closer_reference = int((gap_with < with_to_ref16).sum())
    print(f"\n[parity b] vs the bf16-body/fp32-head reference, {len(PROMPTS)} prompts: fp32-head engine mean "
          f"{gap_with.mean():.3e}, bf16-head engine {gap_without.mean():.3e} (ratio "
          f"{gap_without.mean() / gap_with.mean():.3f}); fp32-head engine closer on {closer_engine} prompts, "
          f"closer to the fp32-head reference than to the bf16-head one on {closer_reference}")
    assert closer_engine >= MIN_PROMPTS
    assert closer_reference >= MIN_PROMPTS
    assert gap_without.mean() >= MIN_MEAN_RATIO * gap_with.mean()
