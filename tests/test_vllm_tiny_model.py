"""The embedded tiny model in real vLLM V1 and in transformers: same greedy completions.

One vLLM engine for the whole module (start-up is ~20 s on 2 cores).
"""

from __future__ import annotations

import pytest

from tether.actor.tasks import build_task
from tether.common.config import EngineConfig, ModelConfig, TaskConfig

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
FLIP_BUDGET = 0.01
"""Share of prompts whose greedy completion may differ between vLLM and transformers (fp32 both:
only an exact near-tie in the logits flips an argmax). Fixed in advance."""


@pytest.fixture(scope="module")
def task():
    return build_task(TaskConfig(name="arithmetic", eval_size=200))


@pytest.fixture(scope="module")
def engine_cfg():
    return EngineConfig(max_num_seqs=64, max_model_len=128, max_num_batched_tokens=2048)


@pytest.fixture(scope="module")
def llm(tiny_model_dir, engine_cfg):
    from tether.actor.evaluate import start_engine

    engine = start_engine(tiny_model_dir, engine_cfg, ModelConfig(dtype="float32"))
    yield engine
    from tether.actor.evaluate import shutdown_engine

    shutdown_engine(engine)


@pytest.fixture(scope="module")
def hf_completions(tiny_model_dir, task):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tether.common.tiny_model import greedy_complete

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return greedy_complete(model, tokenizer, [p.text for p in task.eval_prompts()], MAX_TOKENS)


@pytest.fixture(scope="module")
def vllm_completions(llm, task):
    from vllm import SamplingParams

    outputs = llm.generate([p.text for p in task.eval_prompts()], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
                           use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


def test_vllm_and_transformers_greedy_completions_agree(task, vllm_completions, hf_completions):
    prompts = task.eval_prompts()
    # A non-trivial model: completions are not all the same string and mostly look like numbers.
    assert len(set(vllm_completions)) > 10
    assert sum(c.strip().isdigit() for c in vllm_completions) >= 0.9 * len(prompts)
    disagree = [(p.text, v, h) for p, v, h in zip(prompts, vllm_completions, hf_completions, strict=True) if v != h]
    # Both run fp32; only an exact near-tie in the logits could flip an argmax.
    assert len(disagree) <= len(prompts) * FLIP_BUDGET, disagree


def test_evaluate_greedy_scores_the_engine_completions_and_matches_transformers(
        llm, task, engine_cfg, tiny_model_dir, vllm_completions, hf_completions):
    from tether.actor.evaluate import evaluate_greedy

    report = evaluate_greedy(tiny_model_dir, task, engine_cfg, ModelConfig(dtype="float32"),
                             max_tokens=MAX_TOKENS, llm=llm)
    prompts = task.eval_prompts()
    assert report.num_prompts == len(prompts) == len(report.results)
    assert [r.prompt_id for r in report.results] == [p.prompt_id for p in prompts]
    # Same engine, greedy: the report holds exactly the engine's completions, scored by the task.
    assert [r.completion for r in report.results] == vllm_completions
    rewards = [task.reward(p, c) for p, c in zip(prompts, vllm_completions, strict=True)]
    assert [r.reward for r in report.results] == rewards
    assert report.accuracy == sum(r >= 1.0 for r in rewards) / len(prompts)
    assert report.mean_reward == pytest.approx(sum(rewards) / len(prompts), abs=1e-12)
    # Against transformers: each flipped completion moves the accuracy by at most 1/N, and at most
    # FLIP_BUDGET of the prompts may flip; the bound is fixed here, not taken from the run.
    hf_accuracy = sum(task.reward(p, c) >= 1.0 for p, c in zip(prompts, hf_completions, strict=True)) / len(prompts)
    assert abs(report.accuracy - hf_accuracy) <= FLIP_BUDGET
    # The warm-started model is in its band, so the engine sees it too (not 0, not 1).
    assert 0.2 <= report.accuracy <= 0.65
