"""RolloutRules: the per-message check gives each rollout exactly the verdict of the per-rollout one."""

from __future__ import annotations

import msgspec
import pytest
from test_broker_helpers import make_rollout

from tether.broker.validation import RolloutRules
from tether.common.messages import SamplingSpec, int32_array


def _with_ids(rollout, prompt=None, completion=None):
    changes = {}
    if prompt is not None:
        changes["prompt_token_ids"] = int32_array(prompt)
    if completion is not None:
        changes["completion_token_ids"] = int32_array(completion)
    return msgspec.structs.replace(rollout, **changes)


def _message():
    return [
        make_rollout("ok", "g", 2),
        _with_ids(make_rollout("prompt-at-vocab", "g", 2), prompt=[1, 100]),
        _with_ids(make_rollout("completion-at-vocab", "g", 2), completion=[0, 1, 2, 100]),
        _with_ids(make_rollout("just-below", "g", 2), prompt=[99], completion=[99, 99, 99, 99]),
        make_rollout("someone-else", "g", 2, actor_id="a9"),
        _with_ids(make_rollout("other-and-vocab", "g", 2, actor_id="a9"), completion=[0, 0, 0, 500]),
        make_rollout("future", "g", 2, version=7),
        make_rollout("wrong-size", "g", 3),
        make_rollout("too-long", "g", 2, tokens=5),
        msgspec.structs.replace(make_rollout("asked-too-much", "g", 2),
                                sampling=SamplingSpec(temperature=1.0, max_tokens=5)),
        make_rollout("latest", "g", 2, version=[1, 2, 3, 3]),
        msgspec.structs.replace(make_rollout("longer-than-asked", "g", 2, tokens=5),
                                sampling=SamplingSpec(temperature=1.0, max_tokens=4)),
        make_rollout("empty", "g", 2, tokens=0),
        _with_ids(make_rollout("empty-prompt", "g", 2), prompt=[]),
    ]


@pytest.mark.parametrize("vocab_size", [None, 100, 101, 1000])
@pytest.mark.parametrize("pick", [slice(None), slice(0, 1), slice(3, 4), slice(1, 3), slice(7, 9), slice(0, 0),
                                  slice(9, None), *[slice(i, i + 1) for i in range(9, 14)]])
def test_problems_of_a_message_equal_each_rollouts_problem(vocab_size, pick):
    rules = RolloutRules(group_size=2, max_tokens=4, vocab_size=vocab_size)
    rollouts = _message()[pick]
    expected = [rules.problem(r, "a0", 3) for r in rollouts]
    assert rules.problems(rollouts, "a0", 3) == expected
    # The largest token id as the decoder reports it (wire.Message.max_token_id) gives the same verdicts.
    largest = max((int(i) for r in rollouts for a in (r.prompt_token_ids, r.completion_token_ids)
                   for i in a.numpy()), default=-1)
    assert rules.problems(rollouts, "a0", 3, largest) == expected


def test_an_out_of_vocabulary_rollout_is_named_and_the_others_pass():
    rules = RolloutRules(group_size=2, max_tokens=4, vocab_size=100)
    problems = dict(zip((r.rollout_id for r in _message()), rules.problems(_message(), "a0", 3), strict=True))
    assert problems["ok"] is None and problems["just-below"] is None and problems["empty"] is None
    assert problems["latest"] is None and "sampling.max_tokens 5" in problems["asked-too-much"]
    assert problems["prompt-at-vocab"] == "prompt_token_ids holds token id 100, outside the vocabulary of 100"
    assert problems["completion-at-vocab"] == "completion_token_ids holds token id 100, outside the vocabulary of 100"
    assert "not the sender" in problems["other-and-vocab"]  # the first rule broken is the one named
