"""The learner's logprob definition: temperature, then top-k, then top-p on the renormalised top-k."""

from __future__ import annotations

import math

import pytest
import torch

from tether.learner.logprobs import process_logits, processed_entropy, processed_logprobs

torch.set_num_threads(1)


def test_temperature_topk_topp_by_hand():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    # top_k=3 keeps 0.4, 0.3, 0.2 -> renormalised 4/9, 3/9, 2/9; top_p=0.7: cumulative ascending
    # 2/9=0.22 <= 0.3 dropped, (2+3)/9=0.56 > 0.3 kept -> {0.4, 0.3} renormalised 4/7, 3/7
    lp = processed_logprobs(logits.expand(4, 4), torch.arange(4), temperature=1.0, top_k=3, top_p=0.7)
    assert lp[0].item() == pytest.approx(math.log(4 / 7), abs=1e-6)
    assert lp[1].item() == pytest.approx(math.log(3 / 7), abs=1e-6)
    assert lp[2].item() == float("-inf") and lp[3].item() == float("-inf")
    # temperature first: T=0.5 squares the probabilities before the filters
    lp = processed_logprobs(logits, torch.tensor(0), temperature=0.5)
    assert lp.item() == pytest.approx(math.log(0.16 / 0.30), abs=1e-6)


def test_top_p_applies_to_the_renormalised_top_k_distribution():
    logits = torch.log(torch.tensor([0.35, 0.35, 0.1, 0.1, 0.1]))
    # on the full distribution top_p=0.75 would keep 3 tokens; on the top-2 renormalised (0.5, 0.5)
    # cumulative ascending 0.5 > 0.25: both kept
    kept = torch.isfinite(process_logits(logits, 1.0, top_k=2, top_p=0.75))
    assert kept.tolist() == [True, True, False, False, False]


def test_most_likely_token_always_kept_and_entropy():
    logits = torch.tensor([5.0, 0.0, 0.0])
    kept = torch.isfinite(process_logits(logits, 1.0, top_p=0.01))
    assert kept.tolist() == [True, False, False]
    assert processed_entropy(logits, 1.0, top_p=0.01).item() == pytest.approx(0.0, abs=1e-7)
    two = processed_entropy(torch.tensor([0.0, 0.0, -1.0, -2.0]), 1.0, top_k=2)
    assert two.item() == pytest.approx(math.log(2), abs=1e-6)
    # ties with the k-th largest are kept, as in vLLM: all 8 equal logits survive top_k=4
    assert processed_entropy(torch.zeros(8), 1.0, top_k=4).item() == pytest.approx(math.log(8), abs=1e-6)


def test_gradient_flows_through_kept_tokens_only():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], requires_grad=True)
    processed_logprobs(logits, torch.tensor([0]), 1.0, top_k=2).sum().backward()
    p = torch.softmax(torch.tensor([2.0, 1.0]), 0)
    torch.testing.assert_close(logits.grad[0], torch.tensor([1 - p[0], -p[1], 0.0, 0.0]))
