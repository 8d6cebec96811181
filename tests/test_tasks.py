"""Tasks: the arithmetic toy task, the jsonl task with each reward kind, and the registry."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from tether.actor.tasks import Prompt, Task, build_task, register_task, task_names
from tether.actor.tasks.jsonl import last_number
from tether.common.config import TaskConfig
from tether.common.errors import ConfigError, TaskDataError

SAMPLE = Path(__file__).resolve().parents[1] / "configs" / "data" / "arithmetic_sample.jsonl"


def write_rows(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- arithmetic ---------------------------------------------------------------------------------

def test_arithmetic_prompts_are_correct_sums_and_reward_is_exact_match():
    task = build_task(TaskConfig(name="arithmetic"))
    assert task.name == "arithmetic"
    for prompt in itertools.islice(task.train_prompts(seed=0), 200):
        a, b = prompt.text.removesuffix("=").split("+")
        assert 10 <= int(a) <= 49 and 10 <= int(b) <= 49
        assert prompt.answer == str(int(a) + int(b))
    prompt = Prompt(prompt_id="37+48", text="37+48=", answer="85")  # any answer text works
    assert task.reward(prompt, "85") == 1.0
    assert task.reward(prompt, " 85\n") == 1.0
    assert task.reward(prompt, "84") == 0.0
    assert task.reward(prompt, "85 ") == 1.0
    assert task.reward(prompt, "851") == 0.0
    assert task.reward(prompt, "") == 0.0


def test_arithmetic_train_and_eval_are_disjoint_and_deterministic():
    config = TaskConfig(name="arithmetic", eval_size=300, seed=3)
    task = build_task(config)
    held_out = task.eval_prompts()
    assert len(held_out) == 300 == len({p.text for p in held_out})
    eval_texts = {p.text for p in held_out}
    train = list(itertools.islice(task.train_prompts(seed=1), 5000))
    assert not eval_texts & {p.text for p in train}
    again = list(itertools.islice(build_task(config).train_prompts(seed=1), 5000))
    assert train == again
    assert held_out == build_task(config).eval_prompts()
    other = list(itertools.islice(task.train_prompts(seed=2), 50))
    assert other != train[:50]
    assert build_task(TaskConfig(name="arithmetic", eval_size=300, seed=4)).eval_prompts() != held_out


def test_arithmetic_options():
    task = build_task(TaskConfig(name="arithmetic", eval_size=10,
                                 options={"min_operand": "0", "max_operand": "9", "ops": "-*"}))
    prompts = list(itertools.islice(task.train_prompts(seed=0), 300))
    assert {p.text[1] for p in prompts} == {"-", "*"}
    for p in prompts:
        a, op, b = int(p.text[0]), p.text[1], int(p.text[2])
        assert p.answer == str(a - b if op == "-" else a * b)
    with pytest.raises(ConfigError, match="task.options.max_operand"):
        build_task(TaskConfig(name="arithmetic", options={"max_operand": "ninety"}))
    with pytest.raises(ConfigError, match="task.options.ops"):
        build_task(TaskConfig(name="arithmetic", options={"ops": "/"}))
    with pytest.raises(ConfigError, match="unknown option"):
        build_task(TaskConfig(name="arithmetic", options={"max_operant": "9"}))
    with pytest.raises(ConfigError, match="task.eval_size"):
        build_task(TaskConfig(name="arithmetic", eval_size=60, options={"min_operand": "0", "max_operand": "9"}))


# -- registry -----------------------------------------------------------------------------------

def test_unknown_task_name_names_the_registered_tasks():
    with pytest.raises(ConfigError, match=r"task.name: unknown task 'arithmetik'.*arithmetic.*jsonl"):
        build_task(TaskConfig(name="arithmetik"))
    assert {"arithmetic", "jsonl"} <= set(task_names())


def test_register_task_refuses_a_second_class_under_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        @register_task("arithmetic")
        class Impostor(Task):  # noqa: F841
            def train_prompts(self, seed):
                yield from ()

            def eval_prompts(self):
                return []

            def reward(self, prompt, completion_text):
                return 0.0
    assert type(build_task(TaskConfig(name="arithmetic"))).__name__ == "ArithmeticTask"


# -- jsonl --------------------------------------------------------------------------------------

def test_sample_file_loads_with_every_reward_kind():
    task = build_task(TaskConfig(name="jsonl", path=str(SAMPLE), eval_size=2))
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    prompts = task.eval_prompts() + list(itertools.islice(task.train_prompts(seed=0), len(rows) - 2))
    assert sorted(p.text for p in prompts) == sorted(r["prompt"] for r in rows)
    by_text = {p.text: p for p in prompts}
    assert task.reward(by_text["12+34="], "46") == 1.0
    assert task.reward(by_text["12+34="], "The answer is 46") == 0.0  # exact by default
    eggs = by_text["A box holds 12 eggs. How many eggs are in 3 boxes?"]
    assert task.reward(eggs, "3 boxes x 12 eggs = 36 eggs.") == 1.0
    assert task.reward(eggs, "36 eggs? no: 37") == 0.0
    op = by_text["Name the operation in 9*7: addition or multiplication?"]
    assert task.reward(op, "It is multiplication.") == 1.0
    assert task.reward(op, "addition") == 0.0
    assert by_text["88+11="].prompt_id == "sum-88-11"


def test_jsonl_split_is_disjoint_deterministic_and_endless(tmp_path):
    lines = [json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(40)]
    lines.append(json.dumps({"prompt": "q3", "answer": "3"}))  # duplicate text of a row
    path = write_rows(tmp_path / "d.jsonl", lines)
    config = TaskConfig(name="jsonl", path=str(path), eval_size=10, seed=1)
    task = build_task(config)
    eval_texts = {p.text for p in task.eval_prompts()}
    assert len(task.eval_prompts()) == 10
    train = list(itertools.islice(task.train_prompts(seed=0), 200))
    assert not eval_texts & {p.text for p in train}
    assert train == list(itertools.islice(build_task(config).train_prompts(seed=0), 200))
    # Every row not held out shows up within one epoch.
    train_texts = {p.text for p in train}
    assert train_texts | eval_texts == {f"q{i}" for i in range(40)}


def test_jsonl_eval_path_and_default_reward_option(tmp_path):
    train = write_rows(tmp_path / "train.jsonl", [json.dumps({"prompt": "a", "answer": "1,000"})])
    held = write_rows(tmp_path / "eval.jsonl", [json.dumps({"prompt": "b", "answer": "2.5"})])
    task = build_task(TaskConfig(name="jsonl", path=str(train), options={"eval_path": str(held), "reward": "numeric"}))
    [prompt] = task.eval_prompts()
    assert task.reward(prompt, "so it is 2.50") == 1.0
    assert task.reward(prompt, "2.5 then 3") == 0.0
    first = next(task.train_prompts(0))
    assert task.reward(first, "We get 1000.") == 1.0
    assert task.reward(first, "no number") == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [("The total is 1,234.", "1234"), ("-7 degrees", "-7"), ("3.5 then 12", "12"), ("x=0.25", "0.25"),
     ("none", None), ("#### 72", "72")],
)
def test_last_number(text, expected):
    from fractions import Fraction

    assert last_number(text) == (None if expected is None else Fraction(expected))


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ('{"prompt": "q", "answer": "1"', "not valid JSON"),
        ('["q", "1"]', "must be a JSON object"),
        ('{"answer": "1"}', "missing required key 'prompt'"),
        ('{"prompt": "q"}', "missing required key 'answer'"),
        ('{"prompt": "q", "answer": 1}', "'answer' must be a string"),
        ('{"prompt": "q", "answer": "1", "reward": "fuzzy"}', "unknown reward kind 'fuzzy'"),
        ('{"prompt": "q", "answer": "one", "reward": "numeric"}', "needs a numeric answer"),
        ('{"prompt": "q", "answr": "1"}', "unknown key"),
        ('{"prompt": "  ", "answer": "1"}', "'prompt' is empty"),
    ],
)
def test_bad_rows_name_file_line_and_problem(tmp_path, bad_line, problem):
    good = json.dumps({"prompt": "p", "answer": "2"})
    path = write_rows(tmp_path / "data.jsonl", [good, "", good.replace('"p"', '"p2"'), bad_line])
    with pytest.raises(TaskDataError) as info:
        build_task(TaskConfig(name="jsonl", path=str(path), eval_size=1))
    message = str(info.value)
    assert message.startswith(f"{path}:4: ")
    assert problem in message


def test_jsonl_file_level_errors(tmp_path):
    with pytest.raises(TaskDataError, match="does not exist"):
        build_task(TaskConfig(name="jsonl", path=str(tmp_path / "missing.jsonl")))
    empty = write_rows(tmp_path / "empty.jsonl", [""])
    with pytest.raises(TaskDataError, match="no rows"):
        build_task(TaskConfig(name="jsonl", path=str(empty)))
    with pytest.raises(TaskDataError, match="task.eval_size=200"):
        build_task(TaskConfig(name="jsonl", path=str(SAMPLE)))
    dup = write_rows(tmp_path / "dup.jsonl", ['{"prompt": "a", "answer": "1", "id": "x"}',
                                              '{"prompt": "b", "answer": "1", "id": "x"}'])
    with pytest.raises(TaskDataError, match=r"dup.jsonl:2: id 'x' repeats the id of line 1"):
        build_task(TaskConfig(name="jsonl", path=str(dup), eval_size=1))
    with pytest.raises(ConfigError, match="task.path"):
        build_task(TaskConfig(name="jsonl"))


def test_eval_cli_names_a_bad_task_or_override_before_starting_an_engine(tmp_path, capsys):
    from tether.actor.evaluate import main

    with pytest.raises(SystemExit) as info:
        main(["--model", str(tmp_path), "--task", "nosuch"])
    assert info.value.code == 2
    assert "task.name: unknown task 'nosuch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "task.eval_sise=3"])
    assert "task.eval_sise" in capsys.readouterr().err


def test_actors_of_one_run_draw_different_prompts_the_same_actor_the_same_ones():
    from tether.actor.rollouts import actor_seed

    task = build_task(TaskConfig(name="arithmetic", eval_size=200, seed=0))
    seeds = {actor_id: actor_seed(0, actor_id) for actor_id in ("actor-0", "actor-1", "actor-2")}
    assert len(set(seeds.values())) == 3 and all(0 <= s < 2**63 for s in seeds.values())
    assert actor_seed(0, "actor-0") == seeds["actor-0"] != actor_seed(1, "actor-0")
    streams = {a: [p.text for p in itertools.islice(task.train_prompts(s), 16)] for a, s in seeds.items()}
    assert len(set(streams["actor-0"]) & set(streams["actor-1"])) < 8  # independent draws from 1400 problems


def test_in_process_evaluation_switch_lasts_only_while_the_engine_is_built(monkeypatch, tmp_path):
    """start_engine(in_process=True) turns vLLM's multiprocessing off (and picks the in-process
    executor) only while the engine is built, so a caller in the same process is unaffected; an
    explicit setting wins; without in_process nothing changes."""
    import os

    import vllm

    from tether.actor.evaluate import start_engine
    from tether.common.config import EngineConfig, ModelConfig

    seen = []

    class RecordingLLM:
        def __init__(self, **kwargs):
            seen.append((os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"), kwargs.get("distributed_executor_backend")))

    monkeypatch.setattr(vllm, "LLM", RecordingLLM)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    engine, model = EngineConfig(), ModelConfig()
    start_engine(tmp_path, engine, model, in_process=True)
    assert seen[-1] == ("0", "uni") and "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    start_engine(tmp_path, engine, model)
    assert seen[-1] == (None, None)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    start_engine(tmp_path, engine, model, in_process=True)
    assert seen[-1][0] == "1" and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
