"""The rollout archive: every rollout the learner trained on, as Parquet under <run_dir>/rollouts/.

With `run.keep_rollouts`, each learner rank appends the rollouts it trained on at every step to its
own part file `part-r<rank>-<index>.parquet` (one row group per step), so ranks never coordinate. A
part is written as `<name>.inprogress` and renamed once closed: at `run.rollouts_file_mb`, when the
learner stops (Learner.close), never half-written under its final name. `run.rollouts_max_mb` bounds
the archive by deleting a rank's oldest closed parts.

One row per rollout (COLUMNS): the step that trained on it (the `step` of metrics.jsonl; the learner
was at version step - 1), the ids, prompt and completion token ids and their text (decoded with the
model's tokenizer), the per-token processed logprobs and weight versions sent by the actor, reward,
advantage and the sampling settings. Read it with `read_archive`, pandas, DuckDB or `tether rollouts`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tether.common.logging import get_logger
from tether.common.messages import Rollout

log = get_logger(__name__)

ARCHIVE_DIR = "rollouts"
IN_PROGRESS = ".inprogress"
_PART = re.compile(r"part-r(\d+)-(\d+)\.parquet")

SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("rank", pa.int32()),
    ("rollout_id", pa.string()),
    ("group_id", pa.string()),
    ("actor_id", pa.string()),
    ("task", pa.string()),
    ("prompt", pa.string()),
    ("completion", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("completion_ids", pa.list_(pa.int32())),
    ("logprobs", pa.list_(pa.float32())),
    ("versions", pa.list_(pa.int32())),
    ("reward", pa.float64()),
    ("advantage", pa.float32()),
    ("finish_reason", pa.string()),
    ("temperature", pa.float32()),
    ("top_k", pa.int32()),
    ("top_p", pa.float32()),
    ("created_at", pa.float64()),
])
COLUMNS = tuple(SCHEMA.names)


def archive_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / ARCHIVE_DIR


def rollouts_table(step: int, rank: int, rollouts: Sequence[Rollout], advantages: np.ndarray | Sequence[float],
                   tokenizer=None) -> pa.Table:
    """The archive rows of one step's rollouts (text columns empty without a tokenizer)."""
    prompts = [r.prompt_token_ids.numpy().tolist() for r in rollouts]
    completions = [r.completion_token_ids.numpy().tolist() for r in rollouts]
    if tokenizer is not None:
        # Prompt text keeps special tokens (a chat template's markers are part of what the model saw);
        # the completion text is what the reward functions were given (vLLM skips special tokens).
        prompt_text = tokenizer.batch_decode(prompts, skip_special_tokens=False)
        completion_text = tokenizer.batch_decode(completions, skip_special_tokens=True)
    else:
        prompt_text = completion_text = [""] * len(rollouts)
    columns = {
        "step": [step] * len(rollouts), "rank": [rank] * len(rollouts),
        "rollout_id": [r.rollout_id for r in rollouts], "group_id": [r.group_id for r in rollouts],
        "actor_id": [r.actor_id for r in rollouts], "task": [r.task for r in rollouts],
        "prompt": prompt_text, "completion": completion_text,
        "prompt_ids": prompts, "completion_ids": completions,
        "logprobs": [r.logprobs.numpy().tolist() for r in rollouts],
        "versions": [r.versions.numpy().tolist() for r in rollouts],
        "reward": [r.reward for r in rollouts], "advantage": [float(a) for a in advantages],
        "finish_reason": [r.finish_reason for r in rollouts],
        "temperature": [r.sampling.temperature for r in rollouts], "top_k": [r.sampling.top_k for r in rollouts],
        "top_p": [r.sampling.top_p for r in rollouts], "created_at": [r.created_at for r in rollouts],
    }
    return pa.table(columns, schema=SCHEMA)


class RolloutArchiveWriter:
    """One learner rank's writer: a row group per step, a new part past `file_mb`."""

    def __init__(self, run_dir: str | Path, rank: int, *, tokenizer=None, file_mb: float = 64.0,
                 max_mb: float = 0.0, world_size: int = 1):
        self.dir = archive_dir(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.tokenizer = tokenizer
        self.file_bytes = int(file_mb * 1024 * 1024)
        # Each rank prunes only its own parts, against its share of the budget.
        self.max_bytes = int(max_mb * 1024 * 1024 / max(world_size, 1))
        existing = [int(m.group(2)) for p in self.dir.iterdir()
                    if (m := _PART.fullmatch(p.name.removesuffix(IN_PROGRESS))) and int(m.group(1)) == rank]
        self._next_index = max(existing, default=-1) + 1  # a resumed run never overwrites a part
        self._writer: pq.ParquetWriter | None = None
        self._path: Path | None = None
        self.rows_written = 0

    def write(self, step: int, rollouts: Sequence[Rollout], advantages: np.ndarray | Sequence[float]) -> None:
        """Append the rollouts trained on at `step` (metrics.jsonl numbering) with their advantages."""
        if not rollouts:
            return  # this rank trained on nothing this step (its advantages may be None)
        if len(rollouts) != len(advantages):
            raise ValueError(f"{len(rollouts)} rollouts but {len(advantages)} advantages")
        if self._writer is None:
            self._path = self.dir / f"part-r{self.rank}-{self._next_index:05d}.parquet{IN_PROGRESS}"
            self._next_index += 1
            self._writer = pq.ParquetWriter(self._path, SCHEMA, compression="zstd")
        self._writer.write_table(rollouts_table(step, self.rank, rollouts, advantages, self.tokenizer))
        self.rows_written += len(rollouts)
        if self._path.stat().st_size >= self.file_bytes:
            self._close_part()

    def _close_part(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        final = self._path.with_name(self._path.name.removesuffix(IN_PROGRESS))
        self._path.rename(final)
        self._writer, self._path = None, None
        if self.max_bytes:
            self._prune()

    def _prune(self) -> None:
        mine = sorted(p for p in self.dir.glob(f"part-r{self.rank}-*.parquet"))
        total = sum(p.stat().st_size for p in mine)
        for part in mine[:-1]:  # the newest part always stays
            if total <= self.max_bytes:
                break
            total -= part.stat().st_size
            part.unlink()
            log.info("rollout archive: deleted oldest part", part=part.name, limit_mb=self.max_bytes / 2**20)

    def close(self) -> None:
        """Close the open part (it becomes readable under its final name)."""
        self._close_part()


def archive_parts(run_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(closed parts, parts still being written or left open by a learner that was killed)."""
    root = archive_dir(run_dir)
    if not root.is_dir():
        return [], []
    return sorted(root.glob("part-r*-*.parquet")), sorted(root.glob(f"part-r*-*.parquet{IN_PROGRESS}"))


def read_archive(run_dir: str | Path, *, step: int | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """The archived rows (closed parts only), optionally of one step, sorted by step, rank and group."""
    parts, _ = archive_parts(run_dir)
    if not parts:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(list(columns))
    import pyarrow.dataset as ds

    data = ds.dataset([str(p) for p in parts], schema=SCHEMA, format="parquet")
    table = data.to_table(columns=list(columns) if columns else None,
                          filter=(ds.field("step") == step) if step is not None else None)
    keys = [k for k in ("step", "rank", "group_id") if k in table.column_names]
    return table.sort_by([(k, "ascending") for k in keys]) if keys else table


def open_archive(config, model_dir: str | Path, rank: int, world_size: int) -> RolloutArchiveWriter | None:
    """The rank's archive writer when `run.keep_rollouts` is set, else None."""
    if not config.run.keep_rollouts:
        return None
    from transformers import AutoTokenizer

    return RolloutArchiveWriter(config.run.dir, rank, tokenizer=AutoTokenizer.from_pretrained(str(model_dir)),
                                file_mb=config.run.rollouts_file_mb, max_mb=config.run.rollouts_max_mb,
                                world_size=world_size)
