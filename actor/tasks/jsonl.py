"""A file-backed task for GSM8K-style data: one JSON object per line.

Row format: {"prompt": str, "answer": str, "reward": kind (optional), "id": str (optional)}.
Reward kinds (REWARD_KINDS):

- exact:    1.0 iff the stripped completion equals the stripped answer.
- numeric:  1.0 iff the last number in the completion equals the answer as a number
            ("The total is 1,234." matches "1234"; "72.0" matches "72"). The answer must be a number.
- contains: 1.0 iff the stripped answer occurs in the completion.

Options (TaskConfig.options): `reward` sets the kind for rows that name none (default exact);
`eval_path` names a separate held-out file. Without it, `task.eval_size` rows chosen with
`task.seed` are held out. Prompts whose text appears in the held-out set are never trained on.
Any bad row raises TaskDataError naming the file, the line and the problem.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

from tether.actor.tasks.base import Prompt, Task, hold_out
from tether.actor.tasks.registry import register_task
from tether.common.config import TaskConfig
from tether.common.errors import ConfigError, TaskDataError

_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*)?\.?\d+")


def parse_number(text: str) -> Fraction | None:
    """The value of a number written like "1,234", "-3.50" or "+7"; None if it is not one."""
    cleaned = text.strip().replace(",", "")
    if not re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)", cleaned):
        return None
    return Fraction(cleaned)


def last_number(text: str) -> Fraction | None:
    """The value of the last number in `text`, or None if it contains none."""
    for match in reversed(_NUMBER.findall(text)):
        value = parse_number(match)
        if value is not None:
            return value
    return None


def _exact(answer: str, completion: str) -> float:
    return 1.0 if completion.strip() == answer.strip() else 0.0


def _numeric(answer: str, completion: str) -> float:
    found = last_number(completion)
    return 1.0 if found is not None and found == parse_number(answer) else 0.0


def _contains(answer: str, completion: str) -> float:
    return 1.0 if answer.strip() in completion else 0.0


REWARD_KINDS: dict[str, Callable[[str, str], float]] = {"exact": _exact, "numeric": _numeric, "contains": _contains}
_ROW_KEYS = {"prompt", "answer", "reward", "id"}


def load_rows(path: Path, default_kind: str) -> list[tuple[Prompt, str]]:
    """Parse and validate a JSONL file into (prompt, reward kind) pairs; TaskDataError on a bad row."""
    if not path.is_file():
        raise TaskDataError(f"{path}: file does not exist")
    rows: list[tuple[Prompt, str]] = []
    seen_ids: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskDataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise TaskDataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
            unknown = set(row) - _ROW_KEYS
            if unknown:
                raise TaskDataError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(_ROW_KEYS)})")
            for key in ("prompt", "answer"):
                if key not in row:
                    raise TaskDataError(f"{where}: missing required key {key!r}")
                if not isinstance(row[key], str):
                    raise TaskDataError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__} {row[key]!r}")
            if not row["prompt"].strip():
                raise TaskDataError(f"{where}: 'prompt' is empty")
            kind = row.get("reward", default_kind)
            if kind not in REWARD_KINDS:
                raise TaskDataError(f"{where}: unknown reward kind {kind!r} (known: {', '.join(REWARD_KINDS)})")
            if kind == "numeric" and parse_number(row["answer"]) is None:
                raise TaskDataError(f"{where}: reward 'numeric' needs a numeric answer, got {row['answer']!r}")
            prompt_id = row.get("id", f"{path.stem}:{line_no}")
            if not isinstance(prompt_id, str) or not prompt_id:
                raise TaskDataError(f"{where}: 'id' must be a non-empty string, got {prompt_id!r}")
            if prompt_id in seen_ids:
                raise TaskDataError(f"{where}: id {prompt_id!r} repeats the id of line {seen_ids[prompt_id]}")
            seen_ids[prompt_id] = line_no
            rows.append((Prompt(prompt_id=prompt_id, text=row["prompt"], answer=row["answer"]), kind))
    if not rows:
        raise TaskDataError(f"{path}: no rows")
    return rows


@register_task("jsonl")
class JsonlTask(Task):
    """Prompts and answers from a JSONL file (task.path), scored by a per-row reward kind."""

    def __init__(self, config: TaskConfig) -> None:
        unknown = set(config.options) - {"reward", "eval_path"}
        if unknown:
            raise ConfigError(f"task.options: unknown option(s) {sorted(unknown)} for task jsonl (known: eval_path, reward)")
        if not config.path:
            raise ConfigError("task.path: the jsonl task needs a data file")
        default_kind = config.options.get("reward", "exact")
        if default_kind not in REWARD_KINDS:
            raise ConfigError(f"task.options.reward: unknown reward kind {default_kind!r} (known: {', '.join(REWARD_KINDS)})")
        self.seed = config.seed
        rows = load_rows(Path(config.path), default_kind)
        eval_path = config.options.get("eval_path", "")
        if eval_path:
            held_out = load_rows(Path(eval_path), default_kind)
            pool = rows
        else:
            held_out, pool = hold_out(rows, config.eval_size, f"jsonl-split:{self.seed}", config.path)
        eval_texts = {prompt.text for prompt, _ in held_out}
        self._train = [prompt for prompt, _ in pool if prompt.text not in eval_texts]
        if not self._train:
            raise TaskDataError(f"{config.path}: every training prompt also appears in the held-out set")
        self._eval = [prompt for prompt, _ in held_out]
        self._kinds = {prompt.prompt_id: kind for prompt, kind in (*pool, *held_out)}
        self._default_kind = default_kind

    def train_prompts(self, seed: int) -> Iterator[Prompt]:
        rng = random.Random(f"jsonl-train:{self.seed}:{seed}")
        while True:
            epoch = list(self._train)
            rng.shuffle(epoch)
            yield from epoch

    def eval_prompts(self) -> list[Prompt]:
        return list(self._eval)

    def reward(self, prompt: Prompt, completion_text: str) -> float:
        kind = self._kinds.get(prompt.prompt_id, self._default_kind)
        return REWARD_KINDS[kind](prompt.answer, completion_text)
