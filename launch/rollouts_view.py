"""`tether rollouts RUN_DIR [--step N]`: a readable view of the rollout archive (run.keep_rollouts).

Without --step it shows an overview of the archive and the last archived step; with --step N the
rollouts trained on at step N (metrics.jsonl numbering), group by group: prompt, then per completion
its reward, advantage, weight versions, finish reason and text; --tokens adds every token with its
logprob and version.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _versions(versions: list[int]) -> str:
    if not versions:
        return "-"
    return str(versions[0]) if versions[0] == versions[-1] else f"{versions[0]}->{versions[-1]}"


def _token_text(tokenizer, token_id: int) -> str:
    return repr(tokenizer.decode([token_id])) if tokenizer is not None else str(token_id)


def render_step(rows: list[dict], step: int, *, groups: int, tokens: bool, tokenizer=None) -> list[str]:
    """Lines showing one step's rollouts, at most `groups` groups."""
    rewards = [r["reward"] for r in rows]
    versions = [v for r in rows for v in r["versions"]]
    lines = [f"step {step}: {len(rows)} rollouts in {len({r['group_id'] for r in rows})} groups, "
             f"reward mean {sum(rewards) / len(rewards):.3f}, token versions {min(versions, default='-')}"
             f"..{max(versions, default='-')}"]
    by_group: dict[str, list[dict]] = {}
    for row in rows:
        by_group.setdefault(row["group_id"], []).append(row)
    for shown, (group_id, members) in enumerate(by_group.items()):
        if shown >= groups:
            lines.append(f"... {len(by_group) - groups} more groups (--groups to show more)")
            break
        first = members[0]
        lines += ["", f"group {group_id} from {first['actor_id']} (rank {first['rank']}, "
                      f"T={first['temperature']:g} top_k={first['top_k']} top_p={first['top_p']:g})",
                  f"  prompt: {first['prompt']!r}",
                  f"  {'reward':>8} {'advantage':>9} {'versions':>9} {'finish':>6}  completion"]
        for row in members:
            lines.append(f"  {row['reward']:>8.3f} {row['advantage']:>+9.3f} {_versions(row['versions']):>9} "
                         f"{row['finish_reason']:>6}  {row['completion']!r}")
            if tokens:
                cells = [f"{_token_text(tokenizer, t)} {lp:.3f}@v{v}"
                         for t, lp, v in zip(row["completion_ids"], row["logprobs"], row["versions"], strict=True)]
                lines.append("      tokens: " + "  ".join(cells))
    return lines


def main(argv: list[str] | None = None) -> int:
    """Print the archive overview and one step's rollouts."""
    parser = argparse.ArgumentParser(prog="tether rollouts", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="run directory (its rollouts/ holds the archive)")
    parser.add_argument("--step", type=int, default=None, help="the step to show (default: the last archived)")
    parser.add_argument("--groups", type=int, default=4, help="groups to show (default 4)")
    parser.add_argument("--tokens", action="store_true", help="show every completion token with logprob and version")
    args = parser.parse_args(argv)

    from tether.learner.archive import archive_parts, read_archive

    run_dir = Path(args.run_dir)
    parts, open_parts = archive_parts(run_dir)
    if not parts and not open_parts:
        parser.exit(2, f"tether rollouts: {run_dir} has no rollout archive (run with run.keep_rollouts=true)\n")
    steps = read_archive(run_dir, columns=["step"]).column("step").to_pylist()
    print(f"rollout archive {run_dir / 'rollouts'}: {len(parts)} closed parts, {len(steps)} rollouts"
          + (f", steps {min(steps)}-{max(steps)}" if steps else ""))
    if open_parts:
        print(f"  {len(open_parts)} part(s) still open ({', '.join(p.name for p in open_parts)}): readable once the "
              "learner closes them (at rotation or when it stops); a learner that was killed leaves them unreadable")
    if not steps:
        return 0
    step = max(steps) if args.step is None else args.step
    rows = read_archive(run_dir, step=step).to_pylist()
    if not rows:
        known = sorted(set(steps))
        parser.exit(1, f"tether rollouts: no rollouts archived for step {step} (archived: {known[0]}..{known[-1]}, "
                       f"{len(known)} steps)\n")
    tokenizer = _tokenizer(run_dir) if args.tokens else None
    print()
    print("\n".join(render_step(rows, step, groups=args.groups, tokens=args.tokens, tokenizer=tokenizer)))
    return 0


def _tokenizer(run_dir: Path):
    """The run's tokenizer (for --tokens), or None when the model directory is not there."""
    from tether.launch.audit import weights_by_version

    weights = weights_by_version(run_dir)
    if not weights:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(next(iter(weights.values()))))


if __name__ == "__main__":
    sys.exit(main())
