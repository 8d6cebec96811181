"""The run config against the model it names: conflicts found in config.json, before any daemon starts.

Each of these would otherwise surface late and far from its cause: as a vLLM start-up error after
the engine has loaded, as a learner crash after torchrun has formed its group, or not at all (a
silently different head). Only config.json is read (plain JSON, no model code is imported), so the
check is cheap enough for every entry point.

Tied embeddings are not a conflict: both sides hold the one matrix as the fp32 head
(tether.learner.model, tether.actor.fp32_head). An architecture whose vLLM class computes logits
from the embedding without a ParallelLMHead would not get the fp32 head; the actor refuses to run
such an engine (its engine report reads the head's dtype back from the workers).
"""

from __future__ import annotations

import json
from pathlib import Path

from tether.common.config.run import RunConfig
from tether.common.errors import ConfigError

LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
"""Keys under which Hugging Face configs give the longest sequence the model was built for."""


def read_model_config(model_dir: str | Path) -> dict:
    """config.json of a Hugging Face model directory; ConfigError naming model.path when missing or bad."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.path: {model_dir} has no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model.path: cannot read {path}: {exc}") from None


def _text_config(hf: dict) -> dict:
    """Multimodal configs keep the language model's keys under text_config."""
    return {**hf, **hf.get("text_config", {})} if isinstance(hf.get("text_config"), dict) else hf


def max_positions(hf: dict) -> int | None:
    """Longest sequence the model supports, with linear/dynamic/YaRN rope scaling applied as vLLM does."""
    hf = _text_config(hf)
    base = next((hf[key] for key in LENGTH_KEYS if isinstance(hf.get(key), int)), None)
    if base is None:
        return None
    scaling = hf.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if isinstance(scaling.get("factor"), int | float) and kind in ("linear", "dynamic", "yarn"):
        return int(base * scaling["factor"])
    return base


def model_conflicts(config: RunConfig, hf: dict) -> list[str]:
    """Every conflict between the run config and the model's config.json, each naming the key to change."""
    hf = _text_config(hf)
    conflicts = []
    architectures = hf.get("architectures") or []
    if architectures and not any(name.endswith("ForCausalLM") for name in architectures):
        conflicts.append(f"model.path: architectures {architectures} has no *ForCausalLM class; tether trains "
                         "causal language models (the learner loads AutoModelForCausalLM)")
    longest = max_positions(hf)
    max_model_len = config.actor.engine.max_model_len
    if longest is not None and max_model_len > longest:
        conflicts.append(f"actor.engine.max_model_len: {max_model_len} exceeds the model's {longest} positions "
                         f"(config.json); set actor.engine.max_model_len <= {longest}")
    stored = hf.get("torch_dtype", hf.get("dtype"))
    if config.model.dtype == "float16" and stored == "bfloat16":
        conflicts.append("model.dtype: float16 for a model stored in bfloat16: float16's range can overflow "
                         "activations of a bf16-trained model; use bfloat16 (or float32)")
    quantization = hf.get("quantization_config")
    if config.model.fp32_lm_head and quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        conflicts.append(f"model.fp32_lm_head: the checkpoint is quantized ({method}); tether's fp32 head is an "
                         "unquantized-checkpoint feature: set model.fp32_lm_head=false or use the unquantized model")
    return conflicts


def check_model(config: RunConfig) -> None:
    """Raise one ConfigError listing every conflict with the model at model.path (no-op when empty)."""
    if not config.model.path:
        return  # the embedded tiny model, built to fit
    conflicts = model_conflicts(config, read_model_config(config.model.path))
    if conflicts:
        raise ConfigError(f"the run config conflicts with the model at {config.model.path}: " + "; ".join(conflicts))
