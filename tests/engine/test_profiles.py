"""Model and hardware profiles: the paper's numbers come out of the one set of profiles."""

from __future__ import annotations

import pytest

from libs.common.errors import BadRequest
from libs.engine.profiles import HARDWARE, MODELS, PAPER_PHI_GBPS, hardware_profile, model_profile
from libs.engine.reference_config import ReferenceConfig

MIB = 1 << 20
H200 = HARDWARE["h200"]
H20 = HARDWARE["h20"]
CASE = MODELS["kimi-linear-1t"]


def test_unknown_names_raise_bad_request_listing_known_names():
    """An unknown model or hardware name is a BadRequest that names the valid choices."""
    with pytest.raises(BadRequest, match="kimi-linear-1t"):
        model_profile("gpt-17")
    with pytest.raises(BadRequest, match="h200"):
        hardware_profile("tpu-v9")
    assert model_profile("reference") is MODELS["reference"]
    assert set(HARDWARE) >= {"h200", "h20", "h100", "b200", "rubin-cpx", "groq-lpu"}


@pytest.mark.parametrize(
    ("tokens", "size_mib", "time_s"),
    [(1024, 190.8, 0.44), (8192, 308.9, 0.72), (32768, 701.3, 1.84), (131072, 2316.3, 7.40)],
)
def test_case_study_profile_matches_paper_table(tokens, size_mib, time_s):
    """The 1T hybrid's S_kv and H200 prefill time are within 7% of the paper's profile table."""
    assert CASE.kv_bytes(tokens) / MIB == pytest.approx(size_mib, rel=0.02)
    # The paper's own fit uses k = tokens/1000, so its 1K point is 6% under the table.
    assert CASE.prefill_time_s(tokens, H200) == pytest.approx(time_s, rel=0.07)


def test_h20_slowdown_grows_through_the_calibration_points():
    """H20 prefill is ~2.24x H200 at 10.2K and ~2.63x at 27.5K, growing with length."""
    assert CASE.prefill_time_s(10_200, H20) == pytest.approx(1.83, rel=0.01)
    assert CASE.prefill_time_s(27_500, H20) == pytest.approx(4.27, rel=0.01)
    slowdowns = [H20.prefill_slowdown(n) for n in (1024, 10_200, 27_500, 131_072)]
    assert slowdowns == sorted(slowdowns)
    assert H200.prefill_slowdown(50_000) == pytest.approx(1.0)


def test_h20_decode_capacity_matches_paper():
    """One 8xH20 instance finishes ~0.78 req/s of the case-study model at 1,024 output tokens."""
    assert CASE.decode_rps(H20, 1024) == pytest.approx(0.782, rel=0.02)
    assert CASE.max_batch(H20) == 20
    assert CASE.decode_step_s(20, H20) <= CASE.tpot_slo_s < CASE.decode_step_s(21, H20)


@pytest.mark.parametrize("name", sorted(PAPER_PHI_GBPS))
def test_public_models_reproduce_paper_phi(name):
    """Each public model's KV throughput on 8xH200 is within 8% of the paper's table."""
    model = MODELS[name]
    for tokens, phi in zip((1024, 8192, 32768, 131072), PAPER_PHI_GBPS[name], strict=True):
        assert model.phi_gbps(tokens, H200) == pytest.approx(phi, rel=0.08)


def test_hybrids_emit_far_less_kv_than_dense_models():
    """At 32K the hybrid models' KV throughput is several times lower than the dense GQA models'."""
    hybrid = max(MODELS[n].phi_gbps(32768, H200) for n in ("kimi-linear-1t", "kimi-linear-48b", "ring-2.5-1t"))
    dense = min(MODELS[n].phi_gbps(32768, H200) for n in ("minimax-m2.5", "qwen3-235b"))
    assert dense > 5 * hybrid


def test_reference_sizes_come_from_its_config():
    """The reference profile's KV sizes are exactly the reference model's config properties."""
    cfg = ReferenceConfig()
    ref = MODELS["reference"]
    assert ref.attn_kv_bytes_per_token == cfg.attn_kv_bytes_per_token
    assert ref.linear_state_bytes == cfg.linear_state_bytes
    assert ref.full_layer_indices == cfg.full_layers


@pytest.mark.parametrize("name", sorted(MODELS))
def test_layer_sizes_sum_to_kv_bytes(name):
    """Per-layer state sizes add up exactly to kv_bytes, so a layer-wise stream sends all of it."""
    model = MODELS[name]
    for tokens in (0, 777, 50_000):
        assert sum(model.layer_state_bytes(i, tokens) for i in range(model.n_layers)) == model.kv_bytes(tokens)


def test_faster_chips_prefill_faster_and_lpu_decodes_small_batches_fast():
    """Rubin CPX and B200 prefill faster than H200; the LPU decodes small batches in fast steps; memory caps batches."""
    for tokens in (8192, 131072):
        assert CASE.prefill_time_s(tokens, HARDWARE["rubin-cpx"]) < CASE.prefill_time_s(tokens, H200)
        assert CASE.prefill_time_s(tokens, HARDWARE["b200"]) < CASE.prefill_time_s(tokens, H200)
    lpu = HARDWARE["groq-lpu"]
    assert CASE.max_batch(lpu) == lpu.max_decode_batch < CASE.max_batch(H200)
    assert CASE.decode_step_s(CASE.max_batch(lpu), lpu) < CASE.decode_step_s(1, H200)
    assert CASE.max_batch(H200) > CASE.max_batch(H20)
    assert MODELS["ring-2.5-1t"].max_batch(H20) == 0  # 1T at FP8 does not fit in 768 GB
    assert all(hw.price_per_hour > 0 for hw in HARDWARE.values())
    assert H200.price_per_hour == pytest.approx(2 * H20.price_per_hour)


def test_prefill_only_chips_have_no_decode_batch() -> None:
    """A prefill-only chip (Rubin CPX) never gets decode work, even for a model that would fit."""
    cpx = hardware_profile("rubin-cpx")
    assert cpx.prefill_only
    assert all(model.max_batch(cpx) == 0 for model in MODELS.values())


def test_cpu_profile_predicts_the_reference_model_in_its_measured_units() -> None:
    """The reference model on ``cpu``: a 4K prefill in about 0.44 s and 16K in about 3.5 s (the fit's points)."""
    model, cpu = model_profile("reference"), hardware_profile("cpu")
    assert 0.40 <= model.prefill_time_s(4096, cpu) <= 0.48
    assert 3.3 <= model.prefill_time_s(16384, cpu) <= 3.7
    assert model.decode_step_s(1, cpu) < model.decode_step_s(16, cpu) < 0.025
