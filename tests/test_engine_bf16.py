"""bf16 body: the fp32 lm_head brings vLLM closer to a bf16-body/fp32-head reference; the head's own
effect is isolated by comparing two engines with the same bf16 body, head fp32 vs bf16."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from tether.actor.engine import ActorEngine
from tether.actor.testing import build_random_qwen2, load_reference_model, reference_logprobs
from tether.common.config import EngineConfig, ModelConfig

pytestmark = pytest.mark.slow

T, TOP_K, TOP_P = 1.0, 0, 1.0  # no filtering: every token's logprob reflects the full logits
PROMPTS = [[(11 * i + j * 7) % 250 + 3 for j in range(6)] for i in range(16)]


def _run_engine(model_dir, fp32_head: bool):
    from vllm import SamplingParams

    async def run():
        config = EngineConfig(max_num_seqs=32, max_num_batched_tokens=512, max_model_len=256)
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
    reference = load_reference_model(model_dir, torch.bfloat16, fp32_head=True)

    def gap(completions):
        return np.concatenate([
            np.abs(reference_logprobs(reference, c.prompt_token_ids, c.token_ids, T).numpy() - c.logprobs)
            for c in completions])

    gap_with, gap_without = gap(with_head), gap(without)
    # Head effect alone: same engine body, same seeds; compare where both engines sampled the same tokens.
    head_effect = []
    for a, b in zip(with_head, without, strict=True):
        n = 0
        while n < min(len(a.token_ids), len(b.token_ids)) and a.token_ids[n] == b.token_ids[n]:
            n += 1
        head_effect.append(np.abs(a.logprobs[:n] - b.logprobs[:n]))
    head_effect = np.concatenate(head_effect)
    print(f"\n[parity b] vs bf16-body/fp32-head reference: fp32 head mean {gap_with.mean():.3e} max {gap_with.max():.3e}; "
          f"bf16 head mean {gap_without.mean():.3e} max {gap_without.max():.3e}; "
          f"head effect (same body, fp32 vs bf16 head, {head_effect.size} tokens) mean {head_effect.mean():.3e} "
          f"max {head_effect.max():.3e}")
    assert gap_with.mean() < gap_without.mean()
    assert head_effect.size >= 50 and head_effect.mean() > 0
