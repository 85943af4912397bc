"""A prefill instance's per-layer time predictions: the profile split by layer kind, corrected by what it measured."""

from __future__ import annotations

import time

import pytest

from libs.common.hashing import hash_list
from libs.engine.backends import ReferenceBackend
from libs.engine.build import BackendSpec, build_backend
from libs.engine.profiles import hardware_profile, model_profile
from services.prefill_gateway.instance import _CALIBRATION_TOKENS, PrefillInstance, QueuedJob
from services.prefill_gateway.layer_time import LayerClock, LayerTimes

MODEL = model_profile("reference")  # 8 layers, full attention in layers 3 and 7
CPU = hardware_profile("cpu")


def test_layers_add_up_to_the_profile_and_attention_layers_carry_the_quadratic_work():
    """The layers sum to the profile's prefill (with a cached prefix as the simulated backend counts it); 3 and 7 are slowest."""
    times = LayerTimes(MODEL, CPU, time_scale=4.0)
    n, held = 27_700, 4096
    assert sum(times.modelled_s(layer, n) for layer in range(8)) == pytest.approx(MODEL.prefill_time_s(n, CPU) * 4)
    with_prefix = MODEL.prefill_time_s(n + held, CPU) + MODEL.prefill_time_s(0, CPU) - MODEL.prefill_time_s(held, CPU)
    assert times.prefill_s(n, held) == pytest.approx(with_prefix * 4)
    layers = [times.layer_s(layer, n) for layer in range(8)]
    assert layers[3] == layers[7] == times.slowest_layer_s(n) > 10 * layers[0]  # a long prompt's attention dominates


def test_measured_layers_correct_their_own_kind():
    """Attention layers measured 3x slower than modelled triple the attention prediction; linear layers keep theirs."""
    times = LayerTimes(MODEL, CPU)
    linear, full = times.layer_s(0, 8192), times.layer_s(3, 8192)
    times.measured(3, 8192, 0, 3 * full)
    assert times.layer_s(3, 8192) == pytest.approx(3 * full) and times.layer_s(0, 8192) == pytest.approx(linear)
    times.measured(7, 8192, 0, full)  # later measurements move it by the EWMA gain, not all the way
    assert full < times.layer_s(3, 8192) < 3 * full


def test_a_layer_stopped_past_its_prediction_raises_it():
    """A layer cut off after longer than predicted raises its kind's prediction to at least that; a shorter one does not."""
    times = LayerTimes(MODEL, CPU)
    full = times.layer_s(3, 20_000)
    times.stopped(3, 20_000, 0, full / 2)
    assert times.layer_s(3, 20_000) == pytest.approx(full)
    times.stopped(3, 20_000, 0, 4 * full)
    assert times.layer_s(7, 20_000) == pytest.approx(4 * full)


def test_a_prefill_stopped_mid_layer_teaches_the_layer_under_way():
    """A clock stopped after layer 0 finished reports layer 1 as running at least until then; a finished prefill does not."""
    times = LayerTimes(MODEL, CPU, time_scale=1e-9)  # any elapsed time is far past these predictions
    started = time.perf_counter()
    clock = LayerClock(times, 1024, 0)
    clock.lap(0)
    layer_0_s = time.perf_counter() - started
    linear = times.ratio[False]
    lapped = time.perf_counter()
    while time.perf_counter() - lapped < 2 * layer_0_s:  # layer 1 runs longer than layer 0 took (a busy host
        pass  # may have stretched layer 0), so stopping now teaches more than layer 0 did
    clock.stop()
    assert times.ratio[False] > linear and times.ratio[True] == 1.0
    done = LayerTimes(MODEL, CPU, time_scale=1e-9)
    clock = LayerClock(done, 1024, 0)
    for layer in range(9):  # eight layers, then the head
        clock.lap(layer)
    before = dict(done.ratio)
    clock.stop()
    assert done.ratio == before


async def test_the_queue_wait_is_the_predicted_prefills_ahead():
    """An instance's expected wait is its queued jobs' predicted prefills (a cached prefix counted as the backend does)."""
    spec = BackendSpec(backend="simulated:h200", model="kimi-linear-1t", time_scale=0.5)
    backend = build_backend(spec)
    try:
        instance = PrefillInstance(None, "s", "c", "i", backend, spec)
        instance.queue = [QueuedJob(8192), QueuedJob(4096, 4096)]
        kimi, h200 = model_profile("kimi-linear-1t"), hardware_profile("h200")
        whole, part = kimi.prefill_time_s(8192, h200), kimi.prefill_time_s(4096, h200)
        assert instance.expected_wait_s() == pytest.approx((2 * whole + kimi.prefill_time_s(0, h200) - part) * 0.5)
    finally:
        await backend.close()


async def test_a_reference_instance_times_itself_without_caching_anything():
    """calibrate() times one reference prefill (both layer kinds measured) and stores no blocks; a simulated one skips it."""
    backend = ReferenceBackend()
    try:
        instance = PrefillInstance(None, "s", "c", "i", backend, BackendSpec())
        await instance.calibrate()
        assert 1.0 not in instance.times.ratio.values()  # both kinds measured (no ratio is exactly the prior)
        tokens = [i % 256 for i in range(_CALIBRATION_TOKENS)]
        assert backend.cache.usable_blocks(hash_list(tokens, backend.block_size)) == 0
    finally:
        await backend.close()
    simulated = PrefillInstance(None, "s", "c", "i", backend, BackendSpec(backend="simulated:h200", time_scale=0.1))
    await simulated.calibrate()
    assert simulated.times.ratio == {True: 1.0, False: 1.0}
