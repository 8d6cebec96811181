"""Config loading: every shipped config loads, overrides apply, bad keys and values are named."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tether.common.config import RunConfig, load_config, save_resolved
from tether.common.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_there_are_shipped_configs():
    assert SHIPPED, f"no configs in {CONFIG_DIR}"


MATCHING_MODEL = {
    # config file -> the tiny-model variant with the same shape as the model it names (tether tiny-model)
    "demo.yaml": {},  # the embedded tiny model itself (model.path empty)
    "gpu-qwen2.5-0.5b-gsm8k.yaml": {"tied": True, "max_position_embeddings": 32768},  # Qwen2.5-0.5B ties
}


@pytest.fixture(scope="module")
def matching_models(tmp_path_factory):
    from tether.common.tiny_model import build_tiny_model

    built = {}
    for variant in {tuple(sorted(v.items())) for v in MATCHING_MODEL.values()}:
        out = tmp_path_factory.mktemp("model")
        build_tiny_model(out, seed=0, warm_start=False, **dict(variant))
        built[variant] = out
    return built


def test_every_shipped_config_has_a_matching_model():
    assert sorted(MATCHING_MODEL) == [p.name for p in SHIPPED], "add the new config's model shape to MATCHING_MODEL"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_against_its_model(path, matching_models):
    model = matching_models[tuple(sorted(MATCHING_MODEL[path.name].items()))]
    config = load_config(path, [f"model.path={model}"])
    assert isinstance(config, RunConfig)
    # The file's own values win over the defaults.
    raw = yaml.safe_load(path.read_text())
    assert config.run.name == raw.get("run", {}).get("name", config.run.name)


def _model_dir(tmp_path, **fields):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"],
                                                      "max_position_embeddings": 512, **fields}))
    return tmp_path


@pytest.mark.parametrize(
    ("fields", "overrides", "message"),
    [
        ({}, ["actor.engine.max_model_len=1024"], r"actor\.engine\.max_model_len: 1024 exceeds the model's 512"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["actor.engine.max_model_len=4096"],
         r"exceeds the model's 2048"),
        ({"torch_dtype": "bfloat16"}, ["model.dtype=float16"], r"model\.dtype: float16 for a model stored in bfloat16"),
        ({"quantization_config": {"quant_method": "awq"}}, [], r"model\.fp32_lm_head: the checkpoint is quantized \(awq\)"),
        ({"architectures": ["Qwen2VLForConditionalGeneration"]}, [], r"no \*ForCausalLM class"),
    ],
)
def test_model_conflicts_are_named_before_any_daemon_starts(tmp_path, fields, overrides, message):
    model = _model_dir(tmp_path, **fields)
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"model.path={model}", *overrides])


def test_model_checks_pass_when_the_config_fits_and_can_be_skipped(tmp_path):
    model = _model_dir(tmp_path, torch_dtype="bfloat16", tie_word_embeddings=True,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert load_config(None, [f"model.path={model}", "actor.engine.max_model_len=2048"]).model.path == str(model)
    with pytest.raises(ConfigError, match=r"model\.path: .* has no config\.json"):
        load_config(None, [f"model.path={tmp_path / 'missing'}"])
    # tools that never load the model (tether status) skip the check
    assert load_config(None, [f"model.path={tmp_path / 'missing'}"], check_model_dir=False)


def test_defaults_are_the_parity_settings():
    engine = load_config().actor.engine
    assert engine.logprobs_mode == "processed_logprobs"
    assert engine.enable_prefix_caching is False
    assert engine.async_scheduling is False
    assert engine.generation_config == "vllm"
    assert load_config().model.fp32_lm_head is True


def test_overrides_win_over_the_file_and_keep_types():
    config = load_config(CONFIG_DIR / "demo.yaml", ["learner.lr=0.5", "actor.sampling.top_k=20", "task.options.max_operand=9"])
    assert config.learner.lr == 0.5
    assert config.actor.sampling.top_k == 20
    assert config.task.options == {"max_operand": "9"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["learner.lrr=1"], r"learner\.lrr: unknown config key"),
        (["nonsense.key=1"], r"nonsense: unknown config key"),
        (["learner.steps=many"], r"learner\.steps: .*could not be converted"),
        (["actor.engine.enable_prefix_caching=maybe"], r"actor\.engine\.enable_prefix_caching"),
        (["actor.engine.logprobs_mode=raw"], r"actor\.engine\.logprobs_mode: must be one of"),
        (["actor.sampling.top_p=1.5"], r"actor\.sampling\.top_p: must be in \(0, 1\]"),
        (["learner.rollouts_per_step=12"], r"learner\.rollouts_per_step: must be a multiple of actor\.sampling\.group_size"),
        (["broker.buffer_capacity=8"], r"broker\.buffer_capacity: must hold at least one step"),
        (["broker.curve_enabled=true"], r"broker\.keys_dir: is required"),
        (["learner.lr"], r"key=value"),
        (["learner.algorithm=grpo2"], r"learner\.algorithm: must be one of grpo, gspo, ppo, reinforce, rloo"),
        (["learner.dual_clip=1.2"], r"learner\.dual_clip: must be 0 \(off\) or >= 1 \+ learner\.clip_high \(1\.28\)"),
        (["learner.dual_clip=1.1", "learner.clip_high=0.05"], None),
        (["learner.tis_cap=0.5"], r"learner\.tis_cap: must be 0 \(off\) or >= 1"),
        (["learner.advantage_std=biased"], r"learner\.advantage_std: must be one of sample, population"),
        (["learner.advantage_eps=0"], r"learner\.advantage_eps: must be > 0"),
        (["learner.empty_completions=skip"], r"learner\.empty_completions: must be one of group, drop"),
        (["learner.grad_clip=-1"], r"learner\.grad_clip: must be >= 0"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    if message is None:  # the valid neighbour of a rule: it must load
        load_config(None, overrides)
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_config_checks_need_no_torch():
    """The broker and the status command load the config too: checking learner.algorithm against
    the registry must not pull torch into them."""
    code = ("import sys; from tether.common.config import load_config; "
            "load_config(None, ['learner.algorithm=rloo']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_config_dataclass_is_keyword_only_and_documents_every_field():
    """The house style: @dataclass(kw_only=True) and a docstring under every field, nested ones too."""
    from tether.common.config import base
    from tether.common.config.reference import field_docs

    classes = [cls for module in _config_modules() for cls in vars(module).values()
               if dataclasses.is_dataclass(cls) and isinstance(cls, type) and issubclass(cls, base.Section)]
    assert {c.__name__ for c in classes} >= {"RunConfig", "LearnerConfig", "BrokerConfig", "EngineConfig"}
    for cls in classes:
        params = dataclasses.fields(cls)
        assert all(f.kw_only for f in params), f"{cls.__name__} is not @dataclass(kw_only=True)"
        missing = [f.name for f in params if f.name not in field_docs(cls)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
        with pytest.raises(TypeError):
            cls(*[getattr(cls(), f.name) for f in params[:1]])  # positional arguments are refused


def _config_modules():
    import importlib
    import pkgutil

    import tether.common.config as package

    return [importlib.import_module(f"{package.__name__}.{info.name}") for info in pkgutil.iter_modules(package.__path__)]


def test_bad_file_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learner:\n  algoritm: grpo\n")
    with pytest.raises(ConfigError, match=r"learner\.algoritm: unknown config key in .*bad\.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    config = load_config(CONFIG_DIR / "demo.yaml", ["learner.steps=7"])
    written = save_resolved(config, tmp_path, "learner")
    assert written == tmp_path / "config" / "learner.yaml"
    assert load_config(written) == config


def test_every_key_is_documented_and_the_reference_is_current():
    from tether.common.config.reference import _sections, render

    undocumented = [key for _, _, rows in _sections(RunConfig, "") for key, _, _, doc in rows if not doc]
    assert not undocumented, f"config keys without a docstring: {undocumented}"
    reference = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert reference.read_text() == render(), "docs/config.md is stale: python -m tether.common.config.reference > docs/config.md"
