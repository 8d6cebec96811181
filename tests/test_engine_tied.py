"""Tied input embeddings and lm_head with the fp32 head, in real vLLM V1 against the learner's own code.

fp32 engine: the head's weights are fp32 (the one tied matrix), processed logprobs match the learner
(tether.learner.model.load_policy + tether.learner.completion) at the fp32 floor, and after an
in-flight update with what the learner publishes for a tied model (the matrix once, under the
embedding's name, fp32) they match the learner's new weights at the floor too.
bf16 engine: the body runs in bf16 while the head projects with the unrounded fp32 matrix, so the
engine agrees better with a learner whose head is fp32 than with one whose head is bf16.
The engine report says the head is fp32 and that the engine runs eager on CPU (enforce_eager=auto).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import socket

import numpy as np
import pytest
import torch

from tether.actor.engine import ActorEngine
from tether.actor.testing import build_random_qwen2
from tether.common.config import EngineConfig, ModelConfig
from tether.common.messages import WeightUpdate
from tether.common.weight_group import tensor_specs

pytestmark = pytest.mark.slow
torch.set_num_threads(1)

T, TOP_K, TOP_P = 0.7, 20, 0.9
PROMPTS = [[(7 * i + j * 13) % 250 + 3 for j in range(5 + i % 4)] for i in range(10)]
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return build_random_qwen2(tmp_path_factory.mktemp("tied"), hidden_size=128, num_layers=2, head_std=0.06,
                              seed=4, tied=True)


def _generate(model_dir, dtype: str, update=None):
    """Start an engine, generate, optionally update in flight and generate again; shut it down."""
    from vllm import SamplingParams

    async def batch(engine, seed0):
        return await asyncio.gather(*[
            engine.generate(p, SamplingParams(temperature=T, top_k=TOP_K, top_p=TOP_P, max_tokens=16, logprobs=0,
                                              seed=seed0 + i)) for i, p in enumerate(PROMPTS)])

    async def run():
        config = EngineConfig(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=128)
        engine = await ActorEngine.start(config, ModelConfig(dtype=dtype), str(model_dir), weight_timeout_s=60)
        try:
            before = await batch(engine, 100)
            after = checksum = None
            if update is not None:
                await engine.update_weights(update())
                checksum = (await engine.llm.collective_rpc("tether_param_checksum", args=(EMBED,)))[0]
                after = await batch(engine, 200)
            return engine.report, before, after, checksum
        finally:
            engine.shutdown()

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()


def _learner(model_dir, dtype=torch.float32, fp32_lm_head=True):
    from tether.learner.model import load_policy

    return load_policy(model_dir, torch.device("cpu"), dtype, fp32_lm_head=fp32_lm_head, shard=False, trainable=False)


def _gap(model, completions) -> np.ndarray:
    from tether.learner.completion import completion_logprobs

    gaps = []
    with torch.no_grad():
        for c in completions:
            ids = torch.tensor([c.prompt_token_ids + c.token_ids])
            n_prompt, n = len(c.prompt_token_ids), len(c.token_ids)
            positions = torch.arange(n_prompt - 1, n_prompt + n - 1)[None]
            lp, _ = completion_logprobs(model, ids, torch.ones_like(ids), positions, torch.tensor([c.token_ids]),
                                        [(T, TOP_K, TOP_P)])
            gaps.append(np.abs(lp[0].numpy() - c.logprobs))
    return np.concatenate(gaps)


def _send(port: int, path: str) -> None:
    from tether.common.weight_group import WeightSender, join_weight_group

    torch.set_num_threads(1)
    with join_weight_group("127.0.0.1", port, "weights/test/epoch-1", 0, 2, backend="gloo", timeout_s=60) as group:
        WeightSender(group, 1 << 20).broadcast(torch.load(path))


@pytest.fixture(scope="module")
def fp32_run(tied_dir, tmp_path_factory):
    """The fp32 engine, before and after an in-flight update to what a tied learner publishes."""
    from torch.distributed import TCPStore

    from tether.learner.model import publish_dtypes

    learner = _learner(tied_dir)
    with torch.no_grad():  # the learner's next version: every weight moved, the tied matrix included
        gen = torch.Generator().manual_seed(1)
        for param in learner.parameters():
            param.mul_(1 + 0.3 * torch.randn(param.shape, generator=gen))
    state = learner.state_dict()
    published = [(name, state[name].to(dtype)) for name, dtype in publish_dtypes(learner, torch.float32, True).items()]
    path = tmp_path_factory.mktemp("update") / "published.pt"
    torch.save(published, path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # the broker's store
    sender = mp.get_context("spawn").Process(target=_send, args=(port, str(path)))

    def announce():
        sender.start()
        return WeightUpdate(version=1, lineage="test", epoch=1, group_key="weights/test/epoch-1",
                            group_host="127.0.0.1", group_port=port, world_size=2, first_rank=1,
                            tensors=tensor_specs(published), bucket_bytes=1 << 20)

    report, before, after, checksum = _generate(tied_dir, "float32", update=announce)
    sender.join(60)
    del store
    assert sender.exitcode == 0
    return report, before, after, checksum, learner, published


def test_the_tied_matrix_is_the_fp32_head_and_the_report_says_so(fp32_run):
    report, *_ = fp32_run
    head = report["lm_head"][0]
    assert head["weight_dtype"] == "float32" and head["method"] == "Fp32LMHeadMethod"
    assert report["parity"]["effective_violations"] == []
    # enforce_eager=auto on the CPU: eager, no CUDA graphs
    assert report["enforce_eager_setting"] == "auto" and report["effective"]["enforce_eager"] is True
    assert report["effective"]["cudagraph_mode"] == "NONE"


def test_actor_and_learner_logprobs_agree_before_and_after_an_update(fp32_run, tied_dir):
    _, before, after, checksum, learner, published = fp32_run
    assert [name for name, _ in published].count(EMBED) == 1 and "lm_head.weight" not in dict(published)
    assert checksum == pytest.approx(float(dict(published)[EMBED].double().sum()), rel=1e-9)
    gap_before = _gap(_learner(tied_dir), before)
    gap_after = _gap(learner, after)
    print(f"\n[tied fp32] actor vs learner: before update mean {gap_before.mean():.2e} max {gap_before.max():.2e}; "
          f"after mean {gap_after.mean():.2e} max {gap_after.max():.2e}")
    assert min(c.logprobs.min() for c in before) < -0.5  # sampled tokens are not near-certain: the check has teeth
    for gap in (gap_before, gap_after):
        assert gap.size >= 100
        assert gap.mean() < 1e-6 and gap.max() < 1e-5
    # The update changed the model: the old learner no longer matches the new engine.
    assert _gap(_learner(tied_dir), after).mean() > 1e-3


def test_bf16_body_with_the_fp32_tied_head(tied_dir):
    report, completions, _, _ = _generate(tied_dir, "bfloat16")
    assert report["lm_head"][0]["weight_dtype"] == "float32" and report["effective"]["dtype"] == "bfloat16"
    fp32_head = _gap(_learner(tied_dir, torch.bfloat16, fp32_lm_head=True), completions)
    bf16_head = _gap(_learner(tied_dir, torch.bfloat16, fp32_lm_head=False), completions)
    print(f"\n[tied bf16] actor vs learner with fp32 head: mean {fp32_head.mean():.2e}; "
          f"with bf16 head: mean {bf16_head.mean():.2e}")
    assert fp32_head.mean() < bf16_head.mean()
