"""Completion-only, chunked logprobs against the computation they replaced (full [B, T, V] logits).

Unsharded fp32 on the tiny model, untied and tied, with a different sampling spec per sequence:
- one chunk (the default budget here): logprobs, entropies and every gradient bit for bit;
- many chunks (a tiny budget): the same up to fp32 rounding (a GEMM over fewer rows may round
  differently, and chunked gradients are summed in another order);
- the head runs on completion positions only, in as many chunks as the budget implies.
"""

from __future__ import annotations

import pytest
import torch

from tether.learner.completion import completion_logprobs, reference_completion_logprobs
from tether.learner.model import load_policy

torch.set_num_threads(1)

B, PROMPT, L = 6, 9, 7
SPECS = [(1.0, 0, 1.0), (0.7, 20, 0.9), (1.0, 0, 1.0), (0.7, 20, 0.9), (1.3, 5, 1.0), (1.0, 0, 1.0)]


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model_dir(request, tmp_path_factory):
    from tether.common.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("tied" if request.param else "untied")
    build_tiny_model(out, seed=3, warm_start=False, tied=request.param)
    return out


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (B, PROMPT + L), generator=gen)
    prompt_lengths = torch.tensor([PROMPT - (i % 3) for i in range(B)])
    mask = torch.ones_like(ids)
    for i in range(B):
        mask[i, prompt_lengths[i] + L:] = 0  # right padding after shorter sequences
    positions = (prompt_lengths[:, None] - 1 + torch.arange(L)).clamp(max=PROMPT + L - 1)
    completion = ids.gather(1, positions + 1)
    weights = torch.randn(B, L, generator=gen)
    return ids, mask, positions, completion, weights


def _run(model_dir, batch, fn, **kwargs):
    ids, mask, positions, completion, weights = batch
    model = load_policy(model_dir, torch.device("cpu"), torch.float32, shard=False)
    logprobs, entropy = fn(model, ids, mask, positions, completion, SPECS, **kwargs)
    # -inf where top-k/top-p excludes a token: those positions leave the loss, as in the trainer
    (torch.where(torch.isfinite(logprobs), logprobs, 0.0) * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logprobs.detach(), entropy, grads


def test_one_chunk_is_bit_identical_to_full_logits(model_dir, batch):
    ref = _run(model_dir, batch, reference_completion_logprobs)
    new = _run(model_dir, batch, completion_logprobs)
    assert torch.isinf(ref[0]).any() and torch.isfinite(ref[0]).any()  # top-k/top-p rows are exercised
    assert torch.equal(new[0], ref[0]) and torch.equal(new[1], ref[1])
    for name, grad in ref[2].items():
        assert torch.equal(new[2][name], grad), name


def test_many_chunks_agree_to_fp32_rounding(model_dir, batch):
    ref = _run(model_dir, batch, reference_completion_logprobs)
    new = _run(model_dir, batch, completion_logprobs, chunk_bytes=2 * 257 * 4 * 2)  # 2 rows x 2 positions
    assert torch.equal(torch.isfinite(new[0]), torch.isfinite(ref[0]))
    finite = torch.isfinite(ref[0])
    torch.testing.assert_close(new[0][finite], ref[0][finite], rtol=0, atol=2e-6)
    torch.testing.assert_close(new[1], ref[1], rtol=0, atol=5e-6)
    for name, grad in ref[2].items():
        torch.testing.assert_close(new[2][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_the_head_sees_completion_positions_only_in_budgeted_chunks(model_dir, batch):
    ids, mask, positions, completion, _ = batch
    model = load_policy(model_dir, torch.device("cpu"), torch.float32, shard=False, trainable=False)
    shapes: list[tuple[int, int]] = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape[:2])))
    with torch.no_grad():
        completion_logprobs(model, ids, mask, positions, completion, SPECS, chunk_bytes=B * 257 * 4 * 3)
    # The model's own forward keeps no position; then every row, 3 completion positions at a time.
    assert shapes == [(B, 0), (B, 3), (B, 3), (B, 1)]
    assert sum(b * n for b, n in shapes) == B * L < ids.numel()


def test_tied_bf16_body_reads_the_fp32_head_matrix(tmp_path):
    from tether.common.tiny_model import build_tiny_model

    build_tiny_model(tmp_path, seed=3, warm_start=False, tied=True)
    model = load_policy(tmp_path, torch.device("cpu"), torch.bfloat16, shard=False, trainable=False)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.weight is embed.weight and head.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ids = torch.tensor([[3, 70, 200]])
    out = embed(ids)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, embed.weight[ids].bfloat16())  # a bf16 lookup of the fp32 rows
