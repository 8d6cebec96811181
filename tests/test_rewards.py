"""Reward functions with TRL's signature: arguments, weights, None, errors isolated per sample, loading."""

from __future__ import annotations

import asyncio
import textwrap

import numpy as np
import pytest
from structlog.testing import capture_logs

from tether.actor.rewards import RewardScorer, load_reward_function
from tether.actor.tasks import Prompt, build_task
from tether.common.config import TaskConfig, load_config
from tether.common.errors import ConfigError


def _prompts(n: int = 3) -> list[Prompt]:
    return [Prompt(prompt_id=f"p{i}", text=f"{i}+1=", answer=str(i + 1), columns={"level": f"L{i}", "answer": str(i + 1)})
            for i in range(n)]


def test_functions_get_trls_arguments_and_combine_with_weights():
    calls = []

    def exact(prompts, completions, completion_ids, answer, level, **kwargs):
        calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer,
                          level=level, extra=kwargs))
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer, strict=True)]

    def shorter(completions, **kwargs):
        return [None if len(c) > 2 else 0.5 for c in completions]  # no opinion on long completions

    scorer = RewardScorer([("exact", exact), ("shorter", shorter)], weights=[1.0, 2.0])
    scored = scorer.score(_prompts(), ["1", " 9", "3 "], [[49], [32, 57], [51, 32]])
    assert calls == [dict(prompts=["0+1=", "1+1=", "2+1="], completions=["1", " 9", "3 "],
                          completion_ids=[[49], [32, 57], [51, 32]], answer=["1", "2", "3"], level=["L0", "L1", "L2"],
                          extra={})]
    assert scored.per_function == {"exact": [1.0, 0.0, 1.0], "shorter": [0.5, 0.5, 0.5]}
    assert scored.rewards == [2.0, 1.0, 2.0]
    long = scorer.score(_prompts(1), ["1234"])
    assert long.rewards == [1.0 * 0.0 + 0.0] and long.per_function["shorter"] == [None]
    assert scorer.stats.none == {"shorter": 1} and scorer.stats.unscored == 0 and scorer.stats.samples == 4


def test_none_from_every_function_gives_zero_and_is_counted():
    scorer = RewardScorer([("abstain", lambda completions, **_: [None] * len(completions))])
    assert scorer.score(_prompts(2), ["1", "2"]).rewards == [0.0, 0.0]
    assert scorer.stats.unscored == 2 and scorer.stats.none == {"abstain": 2} and not scorer.stats.errors


def test_a_failing_function_is_isolated_to_its_samples_logged_and_counted():
    def fragile(prompts, completions, answer, **_):
        return [1.0 / (int(c) - 2) for c in completions]  # ZeroDivisionError on "2", ValueError on "x"

    scorer = RewardScorer([("fragile", fragile), ("one", lambda completions, **_: [1.0] * len(completions))])
    with capture_logs() as logs:
        scored = scorer.score(_prompts(), ["3", "2", "x"])
    assert scored.per_function["fragile"] == [1.0, None, None]
    assert scored.rewards == [2.0, 1.0, 1.0]
    assert scorer.stats.errors == {"fragile": 2} and scorer.stats.none == {}
    assert [e["event"] for e in logs][0] == "reward_function_batch_error"
    errors = [e for e in logs if e["event"] == "reward_function_error"]
    assert [(e["prompt_id"], e["prompt"], e["completion"]) for e in errors] == [("p1", "1+1=", "2"), ("p2", "2+1=", "x")]
    assert "ZeroDivisionError" in errors[0]["error"] and "ValueError" in errors[1]["error"]
    assert errors[1]["errors_so_far"] == 2


@pytest.mark.parametrize("bad, message", [
    (lambda completions, **_: [1.0], "returned 1 values for 2 completions"),
    (lambda completions, **_: [float("nan")] * len(completions), "must be finite"),
    (lambda completions, **_: ["high"] * len(completions), "not a number"),
    (lambda completions, **_: 1.0, "expected a list"),
])
def test_unusable_return_values_are_errors_not_crashes(bad, message):
    scorer = RewardScorer([("bad", bad)])
    with capture_logs() as logs:
        scored = scorer.score(_prompts(2), ["1", "2"])
    assert logs[0]["event"] == "reward_function_batch_error" and message in logs[0]["error"]
    if message.startswith("returned 1 values"):  # one sample at a time, [1.0] is a valid answer
        assert scorer.stats.errors == {} and scored.rewards == [1.0, 1.0]
    else:
        assert scored.rewards == [0.0, 0.0] and scorer.stats.unscored == 2
        assert scorer.stats.errors == {"bad": 2}
        assert [e["event"] for e in logs[1:]] == ["reward_function_error"] * 2 and message in logs[1]["error"]


def test_numpy_results_and_ints_are_accepted():
    scorer = RewardScorer([("np", lambda completions, **_: np.arange(len(completions)))])
    assert scorer.score(_prompts(3), ["a", "b", "c"]).rewards == [0.0, 1.0, 2.0]


def test_chat_prompts_get_message_completions_like_trl():
    seen = {}

    def fn(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions)
        return [1.0]

    messages = ({"role": "user", "content": "2+2="},)
    RewardScorer([("fn", fn)]).score([Prompt(prompt_id="c", text="user: 2+2=", messages=messages)], ["4"])
    assert seen == {"prompts": [[{"role": "user", "content": "2+2="}]],
                    "completions": [[{"role": "assistant", "content": "4"}]]}


def test_loading_from_a_file_or_a_module_and_clear_errors(tmp_path, monkeypatch):
    (tmp_path / "rewards_here.py").write_text(textwrap.dedent("""
        def length(completions, **kwargs):
            return [float(len(c)) for c in completions]
        NOT_CALLABLE = 3
    """))
    (tmp_path / "broken.py").write_text("import does_not_exist_anywhere\n")
    assert load_reward_function(f"{tmp_path}/rewards_here.py:length")(completions=["ab"]) == [2.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward_function("rewards_here:length")(completions=["abc"]) == [3.0]
    with pytest.raises(ConfigError, match=r"task.reward: .*file .*missing.py does not exist"):
        load_reward_function(f"{tmp_path}/missing.py:length")
    with pytest.raises(ConfigError, match=r"rewards_here has no attribute 'lenght'"):
        load_reward_function("rewards_here:lenght")
    with pytest.raises(ConfigError, match=r"NOT_CALLABLE is a int, not a function"):
        load_reward_function("rewards_here:NOT_CALLABLE")
    with pytest.raises(ConfigError, match=r"importing .*broken.py failed: ModuleNotFoundError"):
        load_reward_function(f"{tmp_path}/broken.py:f")
    with pytest.raises(ConfigError, match=r"cannot import module 'no_such_module_here'"):
        load_reward_function("no_such_module_here:f")
    with pytest.raises(ConfigError, match=r"task.reward: must be \"module:function\""):
        load_config(None, ["task.reward=just_a_name"])
    with pytest.raises(ConfigError, match=r"task.reward_weights: must have one weight per task.reward function \(1\)"):
        load_config(None, ["task.reward=a:f", "task.reward_weights=[1,2]"])


def test_build_task_uses_configured_functions_on_builtin_tasks(tmp_path):
    (tmp_path / "r.py").write_text("def half(prompts, completions, answer, **kw):\n"
                                   "    return [0.5 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]\n")
    task = build_task(TaskConfig(name="arithmetic", reward=[f"{tmp_path}/r.py:half"]))
    prompt = task.eval_prompts()[0]
    assert task.scorer.score([prompt, prompt], [prompt.answer, "0"]).rewards == [0.5, 0.0]
    own = build_task(TaskConfig(name="arithmetic"))  # without task.reward: the task's own exact match
    assert own.scorer.score([prompt, prompt], [prompt.answer, "0"]).rewards == [1.0, 0.0]
    with pytest.raises(ConfigError, match=r"task.reward: .*does not exist"):
        build_task(TaskConfig(name="arithmetic", reward=[f"{tmp_path}/nope.py:half"]))


class _FakeEngine:
    """Returns fixed completions: enough to drive GroupGenerator's scoring without vLLM."""

    version = 3

    def __init__(self, texts):
        self.texts = list(texts)

    async def generate(self, prompt_ids, params):
        from tether.actor.engine import Completion

        text = self.texts.pop(0)
        ids = [ord(ch) for ch in text] or [0]
        return Completion(request_id="r", prompt_token_ids=list(prompt_ids), token_ids=ids,
                          logprobs=np.full(len(ids), -0.5, dtype=np.float32),
                          versions=np.full(len(ids), self.version, dtype=np.int32), finish_reason="stop", text=text)


def test_a_raising_reward_function_never_stops_the_actors_group(tmp_path):
    from tether.actor.rollouts import GroupGenerator
    from tether.common.config import SamplingConfig
    from tether.common.tiny_model import build_tokenizer

    (tmp_path / "r.py").write_text("def picky(completions, answer, **kw):\n"
                                   "    return [1.0 if int(c) == int(a) else 0.0 for c, a in zip(completions, answer)]\n")
    task = build_task(TaskConfig(name="arithmetic", reward=[f"{tmp_path}/r.py:picky"]))
    prompt = task.eval_prompts()[0]
    generator = GroupGenerator(_FakeEngine([prompt.answer, "oops", "0", prompt.answer]), task, build_tokenizer(),
                               SamplingConfig(group_size=4, max_tokens=4), "actor-t")
    with capture_logs() as logs:
        rollouts = asyncio.run(generator.generate(prompt))
    assert [r.reward for r in rollouts] == [1.0, 0.0, 0.0, 1.0]
    assert generator.scorer.stats.errors == {f"{tmp_path}/r.py:picky": 1}
    assert [e["completion"] for e in logs if e["event"] == "reward_function_error"] == ["oops"]
