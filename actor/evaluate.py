"""Greedy evaluation of a model on a task's held-out prompts with real vLLM V1.

    tether eval --model runs/tiny-model [--task arithmetic] [--config FILE] [key=value ...]

The engine is started with the same kwargs as the actor (tether.actor.engine_args), so an
evaluation measures the numerics that RL samples from.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tether.actor.chat import encode_prompt
from tether.actor.engine_args import check_parity, engine_kwargs
from tether.actor.rewards import RewardScorer
from tether.actor.tasks import Task, build_task
from tether.common.config import EngineConfig, ModelConfig, load_config
from tether.common.device import resolve_device
from tether.common.errors import ConfigError, TaskDataError
from tether.common.process import environment_set, exit_now


@dataclass(frozen=True)
class PromptResult:
    prompt_id: str
    prompt: str
    answer: str
    completion: str
    reward: float


@dataclass
class EvalReport:
    """Greedy results on a task's held-out prompts.

    `accuracy` is the fraction of prompts given full reward (>= 1.0); for 0/1 rewards it equals
    `mean_reward`.
    """

    task: str
    accuracy: float
    mean_reward: float
    num_prompts: int
    results: list[PromptResult] = field(default_factory=list)


def start_engine(model_dir: str | Path, engine_cfg: EngineConfig, model_cfg: ModelConfig, device: str = "cpu",
                 in_process: bool = False):
    """A vllm.LLM with tether's pinned settings; refuses parity-breaking settings (check_parity).

    `in_process` (for a one-shot pass): the engine core, and with tensor_parallel_size 1 its worker
    too, run in this process: the same model runner and kernels, without spawning two processes that
    each import vLLM again (12 s here, 40 s under load). An explicit VLLM_ENABLE_V1_MULTIPROCESSING in
    the environment wins.
    """
    check_parity(engine_cfg)
    from vllm import LLM

    import tether.actor.fp32_head  # noqa: F401  registers the fp32 head quantization engine_kwargs may name

    kwargs = engine_kwargs(engine_cfg, model_cfg, str(model_dir), device=resolve_device(device))
    if in_process and engine_cfg.tensor_parallel_size == 1:
        kwargs["distributed_executor_backend"] = "uni"  # (on CPU vLLM keeps "mp" while multiprocessing)
    # vLLM reads the switch when the engine is built; a user's explicit setting wins.
    with environment_set("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if in_process else None, keep_existing=True):
        return LLM(**kwargs)


def evaluate_greedy(
    model_dir: str | Path,
    task: Task,
    engine_cfg: EngineConfig,
    model_cfg: ModelConfig,
    *,
    max_tokens: int = 16,
    device: str = "cpu",
    llm=None,
) -> EvalReport:
    """Greedy (temperature 0) completions of `task.eval_prompts()` by real vLLM V1, scored by the task's
    reward functions (task.reward, else its own reward; chat prompts go through the chat template).

    Pass a running `llm` (from `start_engine`) to reuse an engine; otherwise one is started for
    `model_dir` and shut down afterwards. Completions stop at eos or after `max_tokens` tokens.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (got {max_tokens})")
    if llm is None and not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    from vllm import SamplingParams

    prompts = task.eval_prompts()
    if not prompts:
        raise ValueError(f"task {task.name!r} has no held-out prompts")
    owned = llm is None
    engine = start_engine(model_dir, engine_cfg, model_cfg, device, in_process=True) if owned else llm
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, skip_special_tokens=True)
        tokenizer = engine.get_tokenizer()
        inputs = [{"prompt_token_ids": encode_prompt(p, tokenizer)} for p in prompts]
        outputs = engine.generate(inputs, params, use_tqdm=False)
    finally:
        if owned:
            shutdown_engine(engine)
    completions = [output.outputs[0].text for output in outputs]
    scorer = task.scorer or RewardScorer([], task=task)
    rewards = scorer.score(prompts, completions, [list(output.outputs[0].token_ids) for output in outputs]).rewards
    results = [PromptResult(prompt.prompt_id, prompt.text, prompt.answer, completion, reward)
               for prompt, completion, reward in zip(prompts, completions, rewards, strict=True)]
    return EvalReport(
        task=task.name,
        accuracy=sum(r.reward >= 1.0 for r in results) / len(results),
        mean_reward=sum(r.reward for r in results) / len(results),
        num_prompts=len(results),
        results=results,
    )


def shutdown_engine(engine) -> None:
    """Stop the engine-core process of a vllm.LLM now rather than at garbage collection."""
    shutdown = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
    if shutdown is not None and hasattr(shutdown, "shutdown"):
        shutdown.shutdown()


def main(argv: list[str] | None = None) -> int:
    """`tether eval --model DIR [--task NAME] [--config FILE] [key=value ...]`: print greedy accuracy."""
    parser = argparse.ArgumentParser(prog="tether eval", description=main.__doc__)
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--task", default=None, help="task name (overrides task.name from the config)")
    parser.add_argument("--config", default=None, help="YAML run config")
    parser.add_argument("--max-tokens", type=int, default=16, help="completion length limit (default 16)")
    parser.add_argument("--show", type=int, default=0, help="print this many per-prompt results")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the report (with results) as JSON")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. task.eval_size=100")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"task.name={args.task}"] if args.task else [])
    try:
        config = load_config(args.config, overrides)
        task = build_task(config.task)
    except (ConfigError, TaskDataError) as exc:
        parser.exit(2, f"tether eval: {exc}\n")
    report = evaluate_greedy(args.model, task, config.actor.engine, config.model,
                             max_tokens=args.max_tokens, device=config.run.device)
    for result in report.results[: args.show]:
        print(f"{result.prompt!r} -> {result.completion!r} (answer {result.answer!r}, reward {result.reward})")
    print(f"task {report.task}: greedy accuracy {report.accuracy:.4f} "
          f"({round(report.accuracy * report.num_prompts)}/{report.num_prompts}), mean reward {report.mean_reward:.4f}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(asdict(report), indent=1))
    return 0


if __name__ == "__main__":
    exit_now(main())  # the engine is shut down and the report written: skip the interpreter's teardown
