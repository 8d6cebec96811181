"""The CUDA paths that one GPU can run (marked `gpu`: skipped where torch sees no CUDA device).

- The learner's FSDP2 policy on CUDA with a bf16 body and the fp32 head, untied and tied: parameter
  and compute dtypes, agreement with the unsharded reference, one training step through the Learner.
- The parity doctor's learner side on CUDA (Devices, LearnerScorer), then the whole doctor with
  `--device cuda`: engines with CUDA graphs (enforce_eager=auto) hold the fp32 floor, the report
  names each side's device.
- CUDA graphs against eager: the same tokens and logprobs (the "where parity holds" of the default).
"""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest
import torch

from tether.common.net import free_port

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def nccl_group():
    """A one-rank NCCL default group, as torchrun gives a learner rank on one GPU."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model_dir(request, tmp_path_factory):
    from tether.common.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("tied" if request.param else "untied")
    build_tiny_model(out, seed=5, warm_start=False, tied=request.param)
    return out


def _batch(device):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (4, 24), generator=gen)
    positions = torch.arange(11, 23).expand(4, -1)
    return ids.to(device), torch.ones_like(ids).to(device), positions.to(device), ids[:, 12:24].to(device)


def test_fsdp2_bf16_body_fp32_head_matches_the_unsharded_reference(nccl_group, model_dir):
    from tether.learner.completion import completion_logprobs
    from tether.learner.model import head_is_tied, load_policy, publish_dtypes

    device = torch.device("cuda", 0)
    sharded = load_policy(model_dir, device, torch.bfloat16, shard=True)
    reference = load_policy(model_dir, device, torch.bfloat16, shard=False, trainable=False)
    head = sharded.get_output_embeddings()
    assert head.weight.dtype == torch.float32  # fp32 master; the fp32 policy keeps it so in compute
    seen = {}
    sharded.get_decoder().layers[0].register_forward_hook(lambda m, a, out: seen.setdefault("body", out[0].dtype
                                                                                             if isinstance(out, tuple) else out.dtype))
    head.register_forward_hook(lambda m, a, out: seen.setdefault("head", out.dtype))
    ids, mask, positions, completion = _batch(device)
    specs = [(1.0, 0, 1.0)] * 4
    logprobs, entropy = completion_logprobs(sharded, ids, mask, positions, completion, specs)
    with torch.no_grad():
        expected, _ = completion_logprobs(reference, ids, mask, positions, completion, specs)
    assert seen == {"body": torch.bfloat16, "head": torch.float32}
    assert logprobs.dtype == torch.float32 and torch.isfinite(logprobs).all()
    torch.testing.assert_close(logprobs.detach(), expected, rtol=0, atol=1e-4)
    logprobs.sum().backward()
    grads = {n: p.grad for n, p in sharded.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g.full_tensor() if hasattr(g, "full_tensor") else g).all() for g in grads.values())
    dtypes = publish_dtypes(sharded, torch.bfloat16, True)
    head_name = "model.embed_tokens.weight" if head_is_tied(sharded) else "lm_head.weight"
    assert dtypes[head_name] == torch.float32
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if n != head_name)


def test_one_learner_step_on_cuda(nccl_group, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tether.common.config import load_config
    from tether.common.messages import SamplingSpec
    from tether.learner.source import InMemoryBatchSource
    from tether.learner.synthetic import sample_rollouts
    from tether.learner.trainer import Learner

    # Sampled on the CPU (sample_rollouts draws from a CPU generator); the learner moves batches to the GPU.
    sampler = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    rollouts = sample_rollouts(sampler, groups=2, group_size=4, max_tokens=8,
                               sampling=SamplingSpec(temperature=1.0, max_tokens=8))
    config = load_config(None, [f"run.dir={tmp_path}", f"model.path={model_dir}", "run.device=cuda",
                                "model.dtype=bfloat16", "learner.publish_to=none", "learner.resume=false",
                                "learner.rollouts_per_step=8", "learner.micro_batch_size=4",
                                "actor.sampling.group_size=4", "learner.lr=1e-3"])
    learner = Learner(config, model_dir, source=InMemoryBatchSource(rollouts))
    assert learner.shard and learner.body_dtype == torch.bfloat16 and learner.device.type == "cuda"
    before = learner.model.get_output_embeddings().weight.full_tensor().clone()
    record = learner.step()
    after = learner.model.get_output_embeddings().weight.full_tensor()
    assert np.isfinite(record["loss"]) and record["grad_norm"] > 0
    assert record["parity_lag0_tokens"] == 64 and record["parity_lag0_max"] < 0.1  # fp32 sampler, bf16 body
    assert after.dtype == torch.float32 and not torch.equal(before, after)
    learner.close()


def test_doctor_learner_side_on_cuda(tiny_model_dir):
    from tether.launch.parity import Devices, LearnerScorer, Sampling

    devices = Devices.resolve("auto")
    assert devices.actor == "cuda" and devices.learner.startswith("cuda")
    assert devices.backend == ("nccl" if torch.cuda.device_count() >= 2 else "gloo")
    described = devices.describe()
    assert described["actor"].startswith("cuda:0 (") and described["learner"].startswith(devices.learner)

    class Completion:  # the two fields LearnerScorer reads from an engine's completion
        def __init__(self, prompt, tokens):
            self.prompt_token_ids, self.token_ids = prompt, tokens

    completions = [Completion([3 + i, 40, 50, 60], [61 + i, 70, 80]) for i in range(4)]
    sampling = Sampling(temperature=1.0, top_k=0, top_p=1.0)  # no filter: every token has a finite logprob
    on_gpu = LearnerScorer(tiny_model_dir, "float32", sampling, devices.learner).score(completions)
    on_cpu = LearnerScorer(tiny_model_dir, "float32", sampling, "cpu").score(completions)
    assert next(LearnerScorer(tiny_model_dir, "float32", sampling, devices.learner).model.parameters()).is_cuda
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        finite = np.isfinite(cpu)
        assert np.array_equal(finite, np.isfinite(gpu))
        np.testing.assert_allclose(gpu[finite], cpu[finite], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_doctor_on_cuda_with_cuda_graphs(tiny_model_dir, tmp_path):
    from tether.common.cli import main

    code = main(["parity", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--prompts", "8",
                 "--max-tokens", "12", "--no-bf16", "--device", "cuda"])
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["devices"]["actor"].startswith("cuda:0") and report["devices"]["learner"].startswith("cuda")
    assert report["enforce_eager"] is False  # auto on CUDA: graphs captured
    on = next(r for r in report["rows"] if r["key"] == "all_on")
    assert on["mean_abs_delta"] < 1e-5 and on["max_abs_delta"] < 1e-4
    assert code == 0 and report["update_check"]["passed"]


@pytest.mark.slow
def test_cuda_graphs_keep_the_eager_tokens_and_logprobs(tiny_model_dir):
    from vllm import SamplingParams

    from tether.actor.engine import ActorEngine
    from tether.common.config import EngineConfig, ModelConfig

    prompts = [[(7 * i + j * 13) % 250 + 3 for j in range(5 + i % 4)] for i in range(12)]

    async def run(enforce_eager: str):
        config = EngineConfig(max_num_seqs=32, max_num_batched_tokens=512, max_model_len=256,
                              gpu_memory_utilization=0.3, enforce_eager=enforce_eager)
        engine = await ActorEngine.start(config, ModelConfig(dtype="float32"), str(tiny_model_dir), device="cuda")
        try:
            outs = await asyncio.gather(*[engine.generate(p, SamplingParams(temperature=0.7, top_k=20, top_p=0.9,
                                                                            max_tokens=24, logprobs=0, seed=i))
                                          for i, p in enumerate(prompts)])
            return engine.report["effective"], outs
        finally:
            engine.shutdown()

    graphs_report, graphs = asyncio.run(run("auto"))
    eager_report, eager = asyncio.run(run("true"))
    assert graphs_report["enforce_eager"] is False and graphs_report["cudagraph_mode"] != "NONE"
    assert eager_report["enforce_eager"] is True and eager_report["cudagraph_mode"] == "NONE"
    same, deltas = 0, []
    for a, b in zip(graphs, eager, strict=True):
        # up to the first differing token: from there on the two condition on different text
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False)) if x != y),
                 min(len(a.token_ids), len(b.token_ids)))
        same += a.token_ids == b.token_ids
        deltas.append(np.abs(a.logprobs[:n] - b.logprobs[:n]))
    deltas = np.concatenate(deltas)
    print(f"\n[cuda graphs] {same}/{len(prompts)} sequences identical to eager; |d| mean {deltas.mean():.2e} "
          f"max {deltas.max():.2e}")
    assert same >= len(prompts) - 1  # an fp32 rounding difference may flip one near-tied sample at most
    assert deltas.size >= 100 and deltas.mean() < 1e-6 and deltas.max() < 1e-4
