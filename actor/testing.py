"""Random Qwen2 models for the actor's tests and benchmarks (not the embedded warm-started model).

A random model is built in a second and its logit scale is set on purpose: random init gives nearly
uniform next-token distributions, where dtype effects and top-p filtering hardly show. `head_std`
scales the lm_head so logits have a realistic spread (std of a few units).
"""

from __future__ import annotations

from pathlib import Path

import torch


def build_random_qwen2(out_dir: str | Path, *, hidden_size: int = 128, num_layers: int = 2,
                       num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 384,
                       vocab_size: int = 257, head_std: float = 0.25, seed: int = 0, tied: bool = False) -> Path:
    """Save a random fp32 Qwen2 (lm_head untied, or tied to the embeddings) plus the byte-level tokenizer
    to `out_dir`. A tied head's scale is the embedding's too; the first RMSNorm absorbs it."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from tether.common.tiny_model import EOS_ID, build_tokenizer

    out = Path(out_dir)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=tied,
        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID, use_sliding_window=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, head_std)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    GenerationConfig(bos_token_id=EOS_ID, eos_token_id=[EOS_ID], do_sample=True, temperature=0.3, top_k=5).save_pretrained(out)
    return out


def load_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by Hugging Face name, fp32 as saved."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(file))
    return state


def perturbed_state(state: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor times (1 + scale * noise): new weights whose outputs clearly differ."""
    gen = torch.Generator().manual_seed(seed)
    return {name: tensor * (1 + scale * torch.randn(tensor.shape, generator=gen)) for name, tensor in state.items()}


def load_reference_model(model_dir: str | Path, body_dtype: torch.dtype = torch.float32, fp32_head: bool = True,
                         state: dict[str, torch.Tensor] | None = None):
    """A plain transformers model as the independent reference: body in `body_dtype`, head fp32
    (from the checkpoint's fp32 weights) when `fp32_head`, else in `body_dtype` like the body."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if state is not None:
        model.load_state_dict(state)
    head_weight = model.lm_head.weight.detach().clone()
    model = model.to(body_dtype)
    if fp32_head:
        model.lm_head = torch.nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False)
        model.lm_head.weight.data.copy_(head_weight)
    return model.eval()


def _head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    weight = model.lm_head.weight
    return torch.nn.functional.linear(hidden.to(weight.dtype), weight).float()


@torch.no_grad()
def reference_logprobs(model, prompt: list[int], completion: list[int], temperature: float, top_k: int = 0,
                       top_p: float = 1.0, processed: bool = True) -> torch.Tensor:
    """Logprob of each completion token: one teacher-forced forward, logits processed as the learner does."""
    from tether.learner.logprobs import processed_logprobs

    ids = torch.tensor([prompt + completion])
    hidden = model.model(input_ids=ids).last_hidden_state[0]
    logits = _head_logits(model, hidden[len(prompt) - 1: len(prompt) + len(completion) - 1])
    targets = torch.tensor(completion)
    if not processed:
        return torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    return processed_logprobs(logits, targets, temperature, top_k, top_p)


@torch.no_grad()
def mixed_kv_logprobs(old_model, new_model, prompt: list[int], completion: list[int], switch: int,
                      temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logprobs of completion[switch:] computed by `new_model` on top of KV written by `old_model`.

    This is what an in-flight update with the KV cache kept does: the old weights wrote the KV of the
    prompt and of completion[:switch-1]; the first step after the update feeds completion[switch-1]
    through the new weights, whose logits give completion[switch], and so on.
    """
    from tether.learner.logprobs import processed_logprobs

    if switch < 1:
        raise ValueError("switch must be >= 1 (the first completion token comes from the prefill)")
    prefix = torch.tensor([prompt + completion[:switch - 1]])
    cache = old_model.model(input_ids=prefix, use_cache=True).past_key_values
    rest = torch.tensor([completion[switch - 1:-1]])
    hidden = new_model.model(input_ids=rest, past_key_values=cache, use_cache=True).last_hidden_state[0]
    logits = _head_logits(new_model, hidden)
    return processed_logprobs(logits, torch.tensor(completion[switch:]), temperature, top_k, top_p)


def send_states(port: int, plan: list[tuple[int, str]], bucket_bytes: int, *, timeout_s: float = 120.0,
                backend: str = "gloo", device: str = "cpu") -> None:
    """The learner's side of weight updates, for a spawned process in tests, benchmarks and `tether parity`.

    For each (epoch, state_path) of `plan`: join that epoch's weight group on the TCPStore at
    127.0.0.1:`port` as rank 0 of 2 (once per epoch, kept across its versions, as the learner keeps
    it) and broadcast the state saved at `state_path` (torch.save of a name -> tensor dict), from
    `device` (a CUDA device with backend "nccl").
    """
    from tether.common.weight_group import WeightSender, join_weight_group

    torch.set_num_threads(1)
    target = torch.device(device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    group = sender = None
    try:
        for epoch, state_path in plan:
            if group is None or group.key != local_group_key(epoch):
                if group is not None:
                    group.close()
                group = join_weight_group("127.0.0.1", port, local_group_key(epoch), 0, 2, backend=backend,
                                          device=target, timeout_s=timeout_s)
                sender = WeightSender(group, bucket_bytes)
            sender.broadcast([(name, tensor.to(target)) for name, tensor in torch.load(state_path).items()])
    finally:
        if group is not None:
            group.close()


def local_group_key(epoch: int) -> str:
    """The rendezvous key of `epoch` in local weight groups (tests, benchmarks, the parity doctor)."""
    return f"weights/local/epoch-{epoch}"


def local_update(version: int, epoch: int, state: dict, bucket_bytes: int, port: int, *, first_rank: int = 1):
    """The WeightUpdate an actor of a local 2-member group receives (the counterpart of send_states)."""
    from tether.common.messages import WeightUpdate
    from tether.common.weight_group import tensor_specs

    return WeightUpdate(version=version, lineage="local", epoch=epoch, group_key=local_group_key(epoch),
                        group_host="127.0.0.1", group_port=port, world_size=2, first_rank=first_rank,
                        tensors=tensor_specs(state.items()), bucket_bytes=bucket_bytes)
