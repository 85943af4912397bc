"""The paper's slow timescale in the simulator: re-optimise t and N_p/N_d every few minutes.

From the lengths observed recently (an empirical histogram) and the bandwidth the link telemetry
said it delivers since the last re-plan (the median of ``LinkView.effective_gbps``: the measured
deliverable bandwidth, or the budget when nothing shows less), it runs the same configuration search as ``prfaas plan`` and proposes a
new threshold and local split when that raises the modelled Lambda_max by more than ``min_gain``
(hysteresis, so the roles do not flap on noise).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from libs.planner.search import PlanInputs, search_prfaas_pd
from libs.planner.throughput import at_threshold
from libs.planner.workloads import Empirical, Workload

MIN_OBSERVED = 500  # below this many observed lengths, plan with the configured workload


class SlowTimescale:
    """Proposes (t, N_p) from observed lengths and the measured deliverable bandwidth."""

    def __init__(self, inputs: PlanInputs, history: int = 2000, min_gain: float = 0.02) -> None:
        self.inputs = inputs
        self.lengths: deque[int] = deque(maxlen=history)
        self.min_gain = min_gain
        self.bandwidths: list[float] = []  # effective link Gbps seen since the last proposal

    def observe(self, prompt_tokens: int) -> None:
        """Record one arriving request's uncached length."""
        self.lengths.append(prompt_tokens)

    def observe_link(self, effective_gbps: float) -> None:
        """Record the link's effective bandwidth as the router sees it now."""
        self.bandwidths.append(effective_gbps)

    def _workload(self) -> Workload:
        if len(self.lengths) < MIN_OBSERVED:
            return self.inputs.workload
        return Empirical(lengths=np.fromiter(self.lengths, dtype=np.int64), source="observed")

    def measured_link_gbps(self) -> float | None:
        """The median effective bandwidth observed since the last call (a transient does not re-plan roles)."""
        if not self.bandwidths:
            return None
        median = float(np.median(self.bandwidths))
        self.bandwidths.clear()
        return median

    def propose(self, link_gbps: float, threshold_tokens: int, n_p: int) -> tuple[int, int] | None:
        """A better (t, N_p) for a link measured to deliver ``link_gbps``, or None to keep the current plan."""
        base = self.inputs
        inputs = PlanInputs(
            model=base.model,
            prfaas_hw=base.prfaas_hw,
            n_prfaas=base.n_prfaas,
            pd_hw=base.pd_hw,
            n_pd=base.n_pd,
            link_gbps=link_gbps,
            workload=self._workload(),
            output_tokens=base.output_tokens,
        )
        best = search_prfaas_pd(inputs).throughput
        current = at_threshold(
            inputs.deployment(base.n_prfaas, n_p, base.n_pd - n_p), inputs.workload, threshold_tokens
        )
        if best.lambda_max <= current.lambda_max * (1 + self.min_gain):
            return None
        return int(best.threshold_tokens), best.n_p
