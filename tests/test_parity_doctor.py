"""`tether parity` end to end on the embedded tiny model with real vLLM engines (small sizes).

The doctor runs once for the module (five engine start-ups, ~2-3 minutes on 2 cores); the bf16 head
rows are skipped here (--no-bf16: two engines fewer) and covered by tests/test_engine_bf16.py.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def doctor(tiny_model_dir, tmp_path_factory):
    from tether.common.cli import main

    out = tmp_path_factory.mktemp("parity")
    code = main(["parity", "--model", str(tiny_model_dir), "--out", str(out), "--prompts", "8",
                 "--max-tokens", "12", "--no-bf16"])
    report = json.loads((out / "parity.json").read_text())
    return code, report, out


def _row(report, key):
    return next(r for r in report["rows"] if r["key"] == key)


def test_all_on_row_is_at_the_fp32_floor(doctor):
    _, report, _ = doctor
    on = _row(report, "all_on")
    assert on["tokens"] == 8 * 12
    assert on["mean_abs_delta"] < 1e-5 and on["max_abs_delta"] < 1e-4
    assert on["outside_support"] == 0 and on["frac_abs_delta_gt_1e-3"] == 0.0
    assert on["ratio_outside_trust_region"] == 0.0 and on["clipped_fraction"] == 0.0 and on["kl_new_old"] < 1e-8
    assert on["effective"]["logprobs_mode"] == "processed_logprobs"


def test_raw_logprobs_row_is_orders_of_magnitude_worse(doctor):
    _, report, _ = doctor
    on, raw = _row(report, "all_on"), _row(report, "raw_logprobs")
    assert raw["effective"]["logprobs_mode"] == "raw_logprobs"
    assert raw["mean_abs_delta"] > 1e-2
    assert raw["mean_abs_delta"] > 1000 * max(on["mean_abs_delta"], 1e-9)
    assert raw["frac_abs_delta_gt_1e-3"] > 0.5


def test_runtime_defaults_reuse_stale_prefix_cache(doctor):
    """Prefix caching kept across the update: batch B's shared prompt prefix hits KV written by W0."""
    _, report, _ = doctor
    defaults = _row(report, "runtime_defaults")
    assert defaults["effective"]["enable_prefix_caching"] is True
    assert defaults["mean_abs_delta"] > 1e-3
    assert report["update_check_runtime_defaults_contrast"]["max_abs_delta"] > 1e-3


def test_abort_and_reload_keeps_parity_but_discards_tokens(doctor):
    _, report, _ = doctor
    abort = _row(report, "abort_reload")
    assert abort["mean_abs_delta"] < 1e-5
    # Both counts are measured (tokens of requests that ended aborted): the keep-the-requests update
    # must abort none, abort-and-reload aborts requests that were already decoding.
    assert abort["tokens_discarded"] > 0 and _row(report, "all_on")["tokens_discarded"] == 0


def test_update_path_check_passes_and_outputs_exist(doctor):
    code, report, out = doctor
    check = report["update_check"]
    assert code == 0 and check["passed"] is True
    assert check["identical_sequences"] == check["sequences"] == 8
    assert check["max_abs_delta"] <= 1e-5
    assert check["head_checksum_after_update"] == pytest.approx(check["head_checksum_w1"], rel=1e-6)
    assert (out / "parity.png").stat().st_size > 1000
    # The clip can only change the loss of a token whose ratio left the trust region (the dual clip
    # starts beyond 1 + clip_high): on every row the second share is within the first.
    for row in report["rows"]:
        assert 0.0 <= row["clipped_fraction"] <= row["ratio_outside_trust_region"] <= 1.0, row["key"]
    # The printed table shows the JSON's numbers, row by row, and the check's verdict.
    from tether.launch.parity import format_report

    lines = format_report(report).splitlines()
    for row in report["rows"]:
        line = next(line for line in lines if line.startswith(row["config"]))
        assert f"{row['mean_abs_delta']:9.2e}" in line and f"{row['clipped_fraction']:7.3f}" in line, line
    assert next(line for line in lines if line.startswith("update path check")).endswith(": PASS")
    # No GPU here: both sides on the CPU, the update over gloo, the engines eager (auto on CPU).
    assert report["devices"] == {"actor": "cpu", "learner": "cpu", "weight_update_backend": "gloo"}
    assert report["enforce_eager"] is True
