"""fp32 lm_head inside vLLM: true fp32 head weights and an fp32 projection, whatever the body dtype.

vLLM's built-in `hf_overrides={"head_dtype": "float32"}` computes the head in fp32 but from weights
already rounded to the body dtype (bf16). The learner holds fp32 head weights, so the two sides would
still differ by the bf16 rounding of the head. Instead we register a quantization config (selected
with `quantization=FP32_HEAD_QUANTIZATION`) whose only effect is on ParallelLMHead:

- the head's weight is created as fp32 and loaded from the checkpoint (or a broadcast) without rounding,
- the projection casts the hidden states to fp32 and multiplies in fp32 (plain F.linear, not the
  prepacked CPU GEMM, which would round the weights again on some paths),
- every other linear layer gets vLLM's UnquantizedLinearMethod, so the body is untouched.

Tied embeddings (tie_word_embeddings, most small instruct models): vLLM then ties the head to the
input embedding by pointing `lm_head.weight` at `embed_tokens.weight`, a body-dtype tensor, which
would silently undo the fp32 head. `Fp32LMHeadMethod.tie_weights` ties the other way round: the one
shared matrix is the head's fp32 parameter, and the embedding gets `Fp32TiedEmbeddingMethod`, whose
lookup casts the fp32 rows to the body dtype. A bf16 lookup of fp32 weights equals a lookup of the
bf16-rounded weights row for row, so the body sees exactly what an untied bf16 embedding gives, while
the head projects with the unrounded matrix. Checkpoints and broadcasts load the matrix under its
canonical name `model.embed_tokens.weight` (vLLM skips the alias `lm_head.weight`); the learner
publishes it in fp32 (tether.learner.model.publish_dtypes), so both uses stay in step.

The same class works on CPU and CUDA. It reads nothing from the checkpoint's config. Importing this
module registers the config in the importing process; vLLM's spawned workers import it again through
the worker extension (tether.actor.worker_ext imports this module), so the name resolves there too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    UnquantizedEmbeddingMethod,
    VocabParallelEmbedding,
)

from tether.actor.engine_args import FP32_HEAD_QUANTIZATION


class Fp32LMHeadMethod(UnquantizedEmbeddingMethod):
    """ParallelLMHead with fp32 parameters and an fp32 matmul (logits come out fp32)."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs):
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size,
                               output_size, torch.float32, **extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # Deliberately no CPU prepacking: keep the plain fp32 tensor that F.linear reads, so an
        # in-flight reload can write it and the numerics match a plain PyTorch fp32 head.
        return None

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        weight = layer.weight
        return F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: VocabParallelEmbedding) -> torch.nn.Module:
        """Share the head's fp32 weight with the embedding (not the embedding's body-dtype weight)."""
        if layer.weight.shape != embed_tokens.weight.shape:
            raise ValueError(f"cannot tie lm_head {tuple(layer.weight.shape)} to embed_tokens "
                             f"{tuple(embed_tokens.weight.shape)}: shapes differ")
        embed_tokens.quant_method = Fp32TiedEmbeddingMethod(body_dtype=embed_tokens.params_dtype)
        # The fused tensor-parallel lookup reads the weight directly and would return fp32 rows.
        embed_tokens.use_fused_embedding = False
        embed_tokens.weight = layer.weight
        return layer


class Fp32TiedEmbeddingMethod(UnquantizedEmbeddingMethod):
    """Input embedding over the tied fp32 head matrix: rows looked up in fp32, returned in the body dtype."""

    def __init__(self, body_dtype: torch.dtype):
        super().__init__()
        self.body_dtype = body_dtype

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        return None  # the matrix belongs to the head; no CPU prepacking of a second copy

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_, layer.weight).to(self.body_dtype)


@register_quantization_config(FP32_HEAD_QUANTIZATION)
class Fp32LMHeadConfig(QuantizationConfig):
    """Not a quantization: routes ParallelLMHead to Fp32LMHeadMethod, leaves the rest unquantized."""

    def get_name(self) -> str:
        return FP32_HEAD_QUANTIZATION

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # nothing to read from the checkpoint

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp32LMHeadConfig:
        return cls()

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, ParallelLMHead):
            return Fp32LMHeadMethod()
        if isinstance(layer, LinearBase):
            return UnquantizedLinearMethod()
        return None
