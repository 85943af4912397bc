"""How long one prefill instance takes per layer: the profile split by layer kind, scaled by what it measured.

The profile's prefill time ``a + b*k + c*k^2`` is spread over the layers: the fixed and per-token
work evenly, the quadratic attention work over the full-attention layers only, which is why a long
prompt's attention layers take far longer than the others. The profile was fitted on some quiet
machine; the instance corrects it per layer kind by the ratio of measured to modelled seconds
(an EWMA over every layer it computes), so its predictions come in this host's units under its
current load. Not thread-safe: the instance's event loop owns it.
"""

from __future__ import annotations

import time

from libs.engine.profiles import HardwareProfile, ModelProfile

_GAIN = 0.3  # EWMA gain of a measured layer's ratio


class LayerTimes:
    """Predicted compute seconds per layer of a prefill on one instance; learns from each layer it times."""

    def __init__(self, model: ModelProfile, hardware: HardwareProfile, time_scale: float = 1.0) -> None:
        self.model = model
        self.hardware = hardware
        self.time_scale = time_scale
        self.ratio = {True: 1.0, False: 1.0}  # by "is a full-attention layer": measured / modelled seconds
        self._measured = {True: False, False: False}

    def modelled_s(self, layer: int, uncached: int, cached: int = 0) -> float:
        """The profile's seconds of ``layer`` for ``uncached`` new tokens after ``cached`` held ones."""
        m, hw = self.model, self.hardware
        k_new, k_all, k_held = uncached / 1000.0, (uncached + cached) / 1000.0, cached / 1000.0
        even = hw.prefill_fixed_factor * m.prefill_fixed_s + hw.prefill_linear_factor * m.prefill_s_per_ktoken * k_new
        seconds = even / m.n_layers
        if m.is_full_attention(layer):
            quadratic = hw.prefill_attention_factor * m.prefill_s_per_ktoken_sq * (k_all * k_all - k_held * k_held)
            seconds += quadratic / m.n_full_layers
        return seconds * self.time_scale

    def layer_s(self, layer: int, uncached: int, cached: int = 0) -> float:
        """Predicted seconds of ``layer`` on this instance."""
        return self.modelled_s(layer, uncached, cached) * self.ratio[self.model.is_full_attention(layer)]

    def slowest_layer_s(self, uncached: int, cached: int = 0) -> float:
        """Predicted seconds of the prompt's slowest layer: the longest wait between two layers' KV."""
        return max(self.layer_s(layer, uncached, cached) for layer in range(self.model.n_layers))

    def prefill_s(self, uncached: int, cached: int = 0) -> float:
        """Predicted seconds of a whole prefill."""
        return sum(self.layer_s(layer, uncached, cached) for layer in range(self.model.n_layers))

    def measured(self, layer: int, uncached: int, cached: int, seconds: float) -> None:
        """Fold one computed layer's seconds into its kind's ratio (the first measurement replaces the prior)."""
        modelled = self.modelled_s(layer, uncached, cached)
        if modelled <= 0:
            return
        full = self.model.is_full_attention(layer)
        ratio = seconds / modelled
        self.ratio[full] = ratio if not self._measured[full] else self.ratio[full] + _GAIN * (ratio - self.ratio[full])
        self._measured[full] = True

    def stopped(self, layer: int, uncached: int, cached: int, seconds: float) -> None:
        """A layer stopped after ``seconds`` unfinished: its kind takes at least that long."""
        modelled = self.modelled_s(layer, uncached, cached)
        if modelled > 0:
            full = self.model.is_full_attention(layer)
            self.ratio[full] = max(self.ratio[full], seconds / modelled)


class LayerClock:
    """Times one prefill's layers as they come and reports them to the instance's ``LayerTimes``."""

    def __init__(self, times: LayerTimes, uncached: int, cached: int) -> None:
        self.times = times
        self.uncached = uncached
        self.cached = cached
        self.next_layer = 0
        self._since = time.monotonic()

    def slowest_layer_s(self) -> float:
        """Predicted seconds of this prefill's slowest layer."""
        return self.times.slowest_layer_s(self.uncached, self.cached)

    def prefill_s(self) -> float:
        """Predicted seconds of this whole prefill."""
        return self.times.prefill_s(self.uncached, self.cached)

    def lap(self, layer: int) -> None:
        """``layer`` is done now (the head after the last layer is not a layer and is not timed)."""
        now = time.monotonic()
        if layer < self.times.model.n_layers:
            self.times.measured(layer, self.uncached, self.cached, now - self._since)
            self.next_layer = layer + 1
        self._since = now

    def stop(self) -> None:
        """The prefill stopped before its end: the layer under way took at least this long."""
        if self.next_layer < self.times.model.n_layers:
            self.times.stopped(self.next_layer, self.uncached, self.cached, time.monotonic() - self._since)
