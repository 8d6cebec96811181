"""The dataset task: local JSON lines, Parquet, Arrow and save_to_disk data read with `datasets`,
text and chat prompts, the held-out split, clear errors, and chat templates from the tokenizer."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from tether.actor.chat import encode_prompt
from tether.actor.tasks import build_task
from tether.common.config import TaskConfig
from tether.common.errors import ConfigError, TaskDataError

ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "level": a % 3} for a in range(10, 20) for b in range(10, 14)]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def reward_spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("rewards") / "rewards.py"
    path.write_text("def exact(prompts, completions, answer, **kw):\n"
                    "    return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer)]\n")
    return f"{path}:exact"


def _write(tmp_path: Path, fmt: str, rows=ROWS) -> Path:
    from datasets import Dataset

    data = Dataset.from_list(rows)
    if fmt == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "parquet":
        path = tmp_path / "data.parquet"
        data.to_parquet(str(path))
    elif fmt == "arrow":  # the single Arrow file save_to_disk writes
        data.save_to_disk(str(tmp_path / "saved"))
        path = next((tmp_path / "saved").glob("*.arrow"))
    else:
        path = tmp_path / "saved_dir"
        data.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "arrow", "save_to_disk"])
def test_every_format_gives_the_same_prompts_and_a_disjoint_held_out_split(tmp_path, fmt, reward_spec):
    config = TaskConfig(name="dataset", path=str(_write(tmp_path, fmt)), eval_size=8, seed=1, reward=[reward_spec])
    task = build_task(config)
    held_out = task.eval_prompts()
    train = list(itertools.islice(task.train_prompts(seed=0), 32))
    assert len(held_out) == 8 and len({p.text for p in train}) == 32
    assert not {p.text for p in held_out} & {p.text for p in train}
    assert held_out == build_task(config).eval_prompts()  # the split is deterministic
    prompt = held_out[0]
    row = next(r for r in ROWS if r["prompt"] == prompt.text)
    assert prompt.answer == row["answer"] and prompt.columns == {"answer": row["answer"], "level": row["level"]}
    assert task.scorer.score([prompt, prompt], [row["answer"], "0"]).rewards == [1.0, 0.0]


def test_held_out_file_and_saved_test_split(tmp_path, reward_spec):
    from datasets import Dataset, DatasetDict

    train_path = _write(tmp_path, "parquet")
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:5]))
    task = build_task(TaskConfig(name="dataset", path=str(train_path), reward=[reward_spec],
                                 options={"eval_path": str(eval_path)}))
    assert [p.text for p in task.eval_prompts()] == [r["prompt"] for r in ROWS[:5]]
    assert not {r["prompt"] for r in ROWS[:5]} & {p.text for p in itertools.islice(task.train_prompts(0), 100)}
    DatasetDict({"train": Dataset.from_list(ROWS[5:]), "test": Dataset.from_list(ROWS[:3])}).save_to_disk(
        str(tmp_path / "dd"))
    saved = build_task(TaskConfig(name="dataset", path=str(tmp_path / "dd"), reward=[reward_spec]))
    assert [p.text for p in saved.eval_prompts()] == [r["prompt"] for r in ROWS[:3]]


def test_chat_prompts_use_the_tokenizers_chat_template(tmp_path, reward_spec):
    from tether.common.tiny_model import build_tokenizer

    rows = [{"prompt": [{"role": "system", "content": "add"}, {"role": "user", "content": r["prompt"]}],
             "answer": r["answer"]} for r in ROWS]
    task = build_task(TaskConfig(name="dataset", path=str(_write(tmp_path, "parquet", rows)), eval_size=4,
                                 reward=[reward_spec]))
    prompt = task.eval_prompts()[0]
    assert prompt.messages[1]["role"] == "user" and prompt.text.startswith("system: add\nuser: ")
    tokenizer = build_tokenizer()
    with pytest.raises(ConfigError, match="has no chat template"):
        encode_prompt(prompt, tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = encode_prompt(prompt, tokenizer)
    assert tokenizer.decode(ids) == f"<system>add\n<user>{prompt.messages[1]['content']}\n<assistant>"
    # the reward function sees TRL's conversational form
    assert task.scorer.score([prompt], [prompt.answer]).rewards == [0.0]  # exact() compares a message list
    seen = {}

    def conversational(prompts, completions, **kw):
        seen.update(prompts=prompts, completions=completions)
        return [1.0 if c[0]["content"] == a else 0.0 for c, a in zip(completions, kw["answer"], strict=True)]

    from tether.actor.rewards import RewardScorer

    assert RewardScorer([("c", conversational)]).score([prompt], [prompt.answer]).rewards == [1.0]
    assert seen["prompts"][0][1]["content"] == prompt.messages[1]["content"]


def test_bad_data_is_named_by_file_and_row(tmp_path, reward_spec):
    def build(path, **kw):
        return build_task(TaskConfig(name="dataset", path=str(path), reward=[reward_spec], eval_size=1, **kw))

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": \n')
    with pytest.raises(TaskDataError, match=r"bad.jsonl:2: not valid JSON"):
        build(bad_json)
    empty = tmp_path / "empty_prompt.jsonl"
    empty.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "  ", "answer": "4"}\n')
    with pytest.raises(TaskDataError, match=r"empty_prompt.jsonl:2: 'prompt' is empty"):
        build(empty)
    no_column = _write(tmp_path, "parquet", [{"question": f"{i}+1=", "answer": str(i + 1)} for i in range(1, 4)])
    with pytest.raises(TaskDataError, match=r"no 'prompt' column \(columns: question, answer\)"):
        build(no_column)
    renamed = build(no_column, options={"prompt_column": "question"})
    held = renamed.eval_prompts()[0]
    assert held.text.endswith("+1=") and held.columns == {"answer": str(int(held.text[0]) + 1)}
    bad_message = tmp_path / "bad_message.jsonl"
    bad_message.write_text('{"prompt": [{"role": "user", "content": "1+1="}]}\n{"prompt": [{"role": "user"}]}\n')
    with pytest.raises(TaskDataError, match=r"bad_message.jsonl:2: message 0 must be"):
        build(bad_message)
    text = tmp_path / "x.txt"
    text.write_text("hi")
    with pytest.raises(TaskDataError, match=r"unknown data format '.txt'"):
        build(text)
    with pytest.raises(TaskDataError, match=r"missing.parquet: file does not exist"):
        build(tmp_path / "missing.parquet")
    two = tmp_path / "two.jsonl"
    two.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(TaskDataError, match=r"2 rows cannot hold out task.eval_size=5"):
        build_task(TaskConfig(name="dataset", path=str(two), reward=[reward_spec], eval_size=5))
    with pytest.raises(ConfigError, match=r"task.reward: the dataset task scores with reward functions"):
        build_task(TaskConfig(name="dataset", path=str(bad_json)))
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['prompt_col'\]"):
        build(bad_json, options={"prompt_col": "x"})
