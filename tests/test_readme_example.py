"""README's worked example, run from the README's own text: the dataset script, the reward functions
and the `tether demo` command (fewer steps and prompts, one actor and one learner rank).

The slow test is a real short training run of that command: it also checks what the demo's console
shows (tether's lines, no engine output, which goes to the run's logs), the rollout archive and the
closing audit.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tether.common.net import free_port

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks() -> dict[str, str]:
    """Code blocks marked `<!-- readme-example: NAME -->` in README.md, by NAME."""
    text = README.read_text(encoding="utf-8")
    blocks = dict(re.findall(r"<!-- readme-example: (\S+) -->\n```\w*\n(.*?)```", text, flags=re.S))
    assert set(blocks) == {"make_sums.py", "sum_rewards.py", "train"}, sorted(blocks)
    return blocks


def demo_arguments(train_block: str) -> list[str]:
    """The arguments of the README's `tether demo` command."""
    (command,) = [c for c in train_block.replace("\\\n", " ").splitlines() if " demo " in c]
    words = shlex.split(command)
    return words[words.index("demo") + 1:]


@pytest.fixture()
def example_dir(tmp_path, monkeypatch):
    """A directory holding the README's two files and the dataset its script made."""
    blocks = readme_blocks()
    for name in ("make_sums.py", "sum_rewards.py"):
        (tmp_path / name).write_text(blocks[name])
    python_line = blocks["train"].splitlines()[0].split()
    assert python_line[1:] == ["make_sums.py"]
    subprocess.run([sys.executable, "make_sums.py"], cwd=tmp_path, check=True, capture_output=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _overrides(arguments: list[str]) -> list[str]:
    return [a for a in arguments if "=" in a and not a.startswith("--")]


def test_the_readme_reward_functions_score_the_readme_dataset(example_dir):
    from tether.actor.tasks import build_task
    from tether.common.config import load_config
    from tether.launch.demo import DEFAULT_CONFIG

    config = load_config(DEFAULT_CONFIG, _overrides(demo_arguments(readme_blocks()["train"])))
    assert config.task.name == "dataset" and config.task.reward_weights == [1.0, 0.1]
    task = build_task(config.task)
    held_out = task.eval_prompts()
    assert len(held_out) == 200 and len({p.text for p in held_out}) == 200
    easy = next(p for p in held_out if p.columns["level"] == "easy")
    hard = next(p for p in held_out if p.columns["level"] == "hard")
    answer = int(hard.answer)
    scored = task.scorer.score([easy, hard, hard, hard], [easy.answer, str(answer), f" {answer + 1}", "x"])
    assert scored.rewards == pytest.approx([1.0, 1.1, 0.6, 0.0])
    assert task.scorer.stats.none == {"sum_rewards.py:digits_only": 1}  # the easy one: no bonus, counted


@pytest.mark.slow
def test_the_readme_command_trains_and_the_console_shows_tether_only(example_dir, tiny_model_dir):
    from tether.learner.archive import read_archive

    arguments = demo_arguments(readme_blocks()["train"])
    run_dir = example_dir / "run"
    assert arguments[:2] == ["--run-dir", "runs/sums"]
    # the README's command with a run directory of the test's own, one actor and one learner rank, and
    # overrides (later ones win) for a short run on the session's tiny model
    arguments = ["--run-dir", str(run_dir), "--actors", "1", "--learner-ranks", "1", *arguments[2:],
                 f"model.path={tiny_model_dir}", "learner.steps=4", "task.eval_size=20", "learner.rollouts_per_step=32",
                 "learner.micro_batch_size=32", "learner.checkpoint_interval=2", "learner.keep_checkpoint_every=2",
                 f"broker.port={free_port()}", f"broker.store_port={free_port()}"]  # another run may hold the defaults
    done = subprocess.run([sys.executable, "-m", "tether.common.cli", "demo", *arguments],
                          cwd=example_dir, capture_output=True, text=True, timeout=800, check=False)
    console = done.stdout + done.stderr
    (example_dir / "console.txt").write_text(console)  # kept with the test's files for a failure's post-mortem
    assert done.returncode == 0, console[-4000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["task"] == "dataset"
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    # the console: tether's own lines; vLLM's log lines and Python warnings went to the run's logs
    # vLLM's log lines: "INFO 11-25 10:47:20 [file.py:12] ...", possibly after a "(EngineCore pid=...)" prefix
    engine_line = re.compile(r"\b(INFO|WARNING|DEBUG|ERROR) \d\d-\d\d \d\d:\d\d:\d\d")
    assert not engine_line.search(console), engine_line.search(console).group(0)
    assert "Warning:" not in console and "[tether] warm start: held-out greedy accuracy" in console
    assert "step    4/4" in console and f"daemon and engine logs: {run_dir / 'logs'}/" in console
    assert engine_line.search((run_dir / "logs" / "eval-warm-start.out").read_text())

    rows = read_archive(run_dir).to_pylist()
    assert {r["step"] for r in rows} == {1, 2, 3, 4} and len(rows) == 4 * 32
    assert all(r["task"] == "dataset" and re.fullmatch(r"\d\d\+\d\d=", r["prompt"]) for r in rows)
    assert {round(r["reward"], 6) for r in rows} <= {0.0, 0.1, 0.5, 0.6, 1.0, 1.1}  # exact + 0.1 x digits-only
    audit = json.loads((run_dir / "audit.json").read_text())
    single = [r for r in audit["rows"] if r["kind"] == "single-version"]
    assert single and {r["version"] for r in single} <= {0, 2, 4}
    assert all(r["max"] < 1e-4 for r in single), single  # vLLM V1 vs transformers, same weights: parity floor
    assert "tether audit:" in console and "single-version" in console
