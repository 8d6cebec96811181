"""Which rollouts each learner rank received for which step: the learner's side of the ledger.

`<run_dir>/ledger/learner-rank<R>.jsonl`, one JSON object per line:

    {"session": "ab12", "start": 6}                     a training session began at version 6
    {"session": "ab12", "step": 6, "ids": ["...", ...]}   rollouts received for the step 6 -> 7

A session that resumed from the checkpoint at version c replaces every step >= c of the sessions
before it, so the rollouts the final model was trained on are `final_lineage(run_dir)`. Together
with the broker's journal (what was acked and what was dropped) this proves exactly-once delivery
(launch/chaos.py). Ids only: a few kilobytes per step.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tether.common.messages import Rollout


class ConsumptionLog:
    def __init__(self, run_dir: str | Path, rank: int, session: str) -> None:
        self.path = Path(run_dir) / "ledger" / f"learner-rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.session = session

    def start(self, version: int) -> None:
        self._write({"session": self.session, "start": version})

    def record(self, step: int, rollouts: Iterable[Rollout]) -> None:
        self._write({"session": self.session, "step": step, "ids": [r.rollout_id for r in rollouts]})

    def _write(self, entry: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def final_lineage(run_dir: str | Path) -> dict[int, list[str]]:
    """Step -> rollout ids received for it, over every rank, in the lineage of the newest session.

    Ranks log independently; a rank's session start (or the first step it logs for a session) cuts
    off that rank's older entries from the start version on.
    """
    steps: dict[int, list[str]] = {}
    for path in sorted((Path(run_dir) / "ledger").glob("learner-rank*.jsonl")):
        rank_steps: dict[int, list[str]] = {}
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of a killed learner
            if "start" in entry:
                rank_steps = {s: ids for s, ids in rank_steps.items() if s < entry["start"]}
            else:
                rank_steps.setdefault(entry["step"], []).extend(entry["ids"])
        for step, ids in rank_steps.items():
            steps.setdefault(step, []).extend(ids)
    return steps
