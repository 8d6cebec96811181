"""The embedded tiny model: deterministic build, Hugging Face format, byte-level tokenizer, warm start."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tether.common.tiny_model import (
    EOS_ID,
    EOS_TOKEN,
    REPORT_FILE,
    WARM_START_BAND,
    build_tiny_model,
    greedy_complete,
    main,
)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """The tokenizer as saved by the build and loaded back through AutoTokenizer (no model needed)."""
    from transformers import AutoTokenizer

    from tether.common.tiny_model import build_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer().save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def _weights(directory):
    return (directory / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_same_seed_gives_bit_identical_weights(tmp_path):
    kwargs = dict(max_steps=4, eval_interval=2, batch_size=8)
    first = build_tiny_model(tmp_path / "a", seed=7, **kwargs)
    second = build_tiny_model(tmp_path / "b", seed=7, **kwargs)
    build_tiny_model(tmp_path / "c", seed=8, **kwargs)
    assert first.warm_start_steps == second.warm_start_steps == 4
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")
    assert _weights(tmp_path / "a") != _weights(tmp_path / "c")
    assert first.accuracy_curve == second.accuracy_curve


@pytest.mark.slow
def test_saved_model_loads_in_transformers_with_its_own_lm_head(tiny_model_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == "qwen2"
    assert config.tie_word_embeddings is False
    assert config.vocab_size == EOS_ID + 1 and config.eos_token_id == EOS_ID
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    assert head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed)
    report = json.loads((tiny_model_dir / REPORT_FILE).read_text())
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= report["parameters"] <= 10_000_000
    # Sampling defaults from a generation_config.json would bypass tether's explicit settings.
    assert not (tiny_model_dir / "generation_config.json").exists()


@pytest.mark.slow
def test_warm_start_report_is_in_band_and_matches_the_saved_weights(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tether.actor.tasks import build_task
    from tether.common.config import TaskConfig

    report = json.loads((tiny_model_dir / REPORT_FILE).read_text())
    low, high = WARM_START_BAND
    assert report["in_band"] is True
    assert low <= report["heldout_accuracy"] <= high
    assert 0.2 <= report["heldout_accuracy"] <= 0.6
    assert report["warm_start_steps"] > 0 and report["heldout_prompts"] == 200
    # Re-evaluating the saved files gives the accuracy the build measured in memory.
    task = build_task(TaskConfig(name="arithmetic", seed=0))
    prompts = task.eval_prompts()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    completions = greedy_complete(model, tokenizer, [p.text for p in prompts], max_new_tokens=8)
    accuracy = sum(task.reward(p, c) for p, c in zip(prompts, completions, strict=True)) / len(prompts)
    assert accuracy == report["heldout_accuracy"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=64))
def test_tokenizer_round_trips_any_text_as_utf8_bytes(hf_tokenizer, text):
    assume(EOS_TOKEN not in text)
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8"))
    assert hf_tokenizer.decode(ids) == text


def test_tokenizer_special_token_and_byte_ids(hf_tokenizer):
    assert hf_tokenizer.eos_token == EOS_TOKEN and hf_tokenizer.eos_token_id == EOS_ID
    assert hf_tokenizer.pad_token_id == EOS_ID
    assert hf_tokenizer.encode("7" + EOS_TOKEN, add_special_tokens=False) == [ord("7"), EOS_ID]
    assert hf_tokenizer.decode([ord("4"), ord("2"), EOS_ID], skip_special_tokens=True) == "42"
    # Any byte sequence, valid UTF-8 or not, has ids; invalid UTF-8 decodes with replacement.
    assert hf_tokenizer.decode([0xFF, ord("a")]) == "\ufffda"


def test_cli_without_warm_start(tmp_path, capsys):
    assert main([str(tmp_path / "m"), "--seed", "3", "--no-warm-start"]) == 0
    report = json.loads((tmp_path / "m" / REPORT_FILE).read_text())
    assert report["warm_start"] is False and report["warm_start_steps"] == 0 and report["seed"] == 3
    # Untrained: a 2-digit sum by chance is very unlikely.
    assert report["heldout_accuracy"] <= 0.02
    assert "parameters" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "m" / name).is_file()


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        build_tiny_model(tmp_path / "x", max_steps=0)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "y"), "--seed", "notanint"])
