"""A task over a local dataset read with the `datasets` library, scored by reward functions.

    task.name: dataset
    task.path: data/train.parquet          # .jsonl/.json, .parquet, .arrow, .csv, or a save_to_disk directory
    task.reward: my_rewards.py:accuracy    # TRL signature, see tether.actor.rewards

Each row needs a `prompt` column (TRL's name; `task.options.prompt_column` changes it) holding either
plain text or a conversation, a list of {"role", "content"} messages, which the actor renders with the
model tokenizer's chat template. Every other column reaches the reward functions as a keyword argument
(e.g. `answer`, `solution`, `ground_truth`); an `id` column names the row, else `<file stem>:<row>`.

Held-out split, in order of preference: `task.options.eval_path` (a second file), the `test` split of a
`save_to_disk` DatasetDict, or `task.eval_size` rows chosen with `task.seed`. Prompts of the held-out
split are never trained on. Nothing is downloaded: only local files are read.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tether.actor.tasks.base import Prompt, Task, hold_out
from tether.actor.tasks.registry import register_task
from tether.common.config import TaskConfig
from tether.common.errors import ConfigError, TaskDataError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
_OPTIONS = {"eval_path", "prompt_column"}


def _first_bad_json_line(path: Path) -> str | None:
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"{path}:{line_no}: not valid JSON ({exc.msg} at column {exc.colno})"
            if not isinstance(row, dict):
                return f"{path}:{line_no}: a row must be a JSON object, got {type(row).__name__}"
    return None


def load_splits(path: str | Path) -> dict[str, Any]:
    """{split name: datasets.Dataset} of a local file (one split, "train") or a save_to_disk directory."""
    import datasets

    datasets.disable_progress_bars()  # the actor's log is the record, not per-file progress bars
    path = Path(path)
    if not path.exists():
        raise TaskDataError(f"{path}: file does not exist")
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise TaskDataError(f"{path}: not a dataset saved with save_to_disk ({exc})") from None
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise TaskDataError(f"{path}: unknown data format {path.suffix!r} (known: {', '.join(sorted(BUILDERS))}, "
                            "or a save_to_disk directory)")
    if builder == "json":
        bad = _first_bad_json_line(path) if path.suffix.lower() == ".jsonl" else None
        if bad:
            raise TaskDataError(bad)
    try:
        return {"train": datasets.load_dataset(builder, data_files=str(path), split="train")}
    except Exception as exc:
        raise TaskDataError(f"{path}: the datasets library could not read it as {builder}: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def _messages(value: Any, where: str) -> tuple[dict[str, str], ...]:
    if not value:
        raise TaskDataError(f"{where}: the prompt is an empty list of messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise TaskDataError(f"{where}: message {i} must be {{'role': str, 'content': str}}, got {message!r}")
        messages.append({"role": message["role"], "content": message["content"]})
    return tuple(messages)


def rows_to_prompts(dataset, source: str, prompt_column: str) -> list[Prompt]:
    """Validate every row and build its Prompt; TaskDataError naming `source`, the row and the problem."""
    if prompt_column not in dataset.column_names:
        raise TaskDataError(f"{source}: no {prompt_column!r} column (columns: {', '.join(dataset.column_names)}); "
                            "set task.options.prompt_column to the one holding the prompts")
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for index, row in enumerate(dataset, start=1):
        where = f"{source}:{index}"
        value = row[prompt_column]
        if isinstance(value, str):
            if not value.strip():
                raise TaskDataError(f"{where}: {prompt_column!r} is empty")
            messages, text = None, value
        elif isinstance(value, list):
            messages = _messages(value, where)
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        else:
            raise TaskDataError(f"{where}: {prompt_column!r} must be text or a list of chat messages, "
                                f"got {type(value).__name__} {value!r}")
        prompt_id = str(row["id"]) if row.get("id") is not None else f"{Path(source).stem}:{index}"
        if prompt_id in seen:
            raise TaskDataError(f"{where}: id {prompt_id!r} repeats the id of row {seen[prompt_id]}")
        seen[prompt_id] = index
        columns = {k: v for k, v in row.items() if k != prompt_column}
        answer = row.get("answer")
        prompts.append(Prompt(prompt_id=prompt_id, text=text, answer="" if answer is None else str(answer),
                              messages=messages, columns=columns))
    if not prompts:
        raise TaskDataError(f"{source}: no rows")
    return prompts


def _key(prompt: Prompt) -> str:
    return json.dumps(prompt.raw, sort_keys=True)


@register_task("dataset")
class DatasetTask(Task):
    """Prompts from a local dataset (task.path); rewards from task.reward functions."""

    def __init__(self, config: TaskConfig) -> None:
        unknown = set(config.options) - _OPTIONS
        if unknown:
            raise ConfigError(f"task.options: unknown option(s) {sorted(unknown)} for task dataset "
                              f"(known: {', '.join(sorted(_OPTIONS))})")
        if not config.path:
            raise ConfigError("task.path: the dataset task needs a data file or a save_to_disk directory")
        if not config.reward:
            raise ConfigError('task.reward: the dataset task scores with reward functions; set task.reward to '
                              '"module:function" or "file.py:function"')
        column = config.options.get("prompt_column", "prompt")
        splits = load_splits(config.path)
        if "train" not in splits:
            raise TaskDataError(f"{config.path}: no 'train' split (splits: {', '.join(splits)})")
        rows = rows_to_prompts(splits["train"], str(config.path), column)
        eval_path = config.options.get("eval_path", "")
        if eval_path:
            held_out = rows_to_prompts(load_splits(eval_path)["train"], eval_path, column)
            pool = rows
        elif "test" in splits:
            held_out, pool = rows_to_prompts(splits["test"], f"{config.path}[test]", column), rows
        else:
            held_out, pool = hold_out(rows, config.eval_size, f"dataset-split:{config.seed}", config.path)
        held_out_keys = {_key(p) for p in held_out}
        self._train = [p for p in pool if _key(p) not in held_out_keys]
        if not self._train:
            raise TaskDataError(f"{config.path}: every training prompt also appears in the held-out set")
        self._eval = held_out
        self.seed = config.seed

    def train_prompts(self, seed: int) -> Iterator[Prompt]:
        rng = random.Random(f"dataset-train:{self.seed}:{seed}")
        while True:
            epoch = list(self._train)
            rng.shuffle(epoch)
            yield from epoch

    def eval_prompts(self) -> list[Prompt]:
        return list(self._eval)
