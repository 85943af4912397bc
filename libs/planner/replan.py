"""The paper's slow timescale in the simulator: re-optimise t and N_p/N_d every few minutes.

From the lengths observed recently (an empirical histogram) and the bandwidth the link telemetry
said it delivers since the last re-plan (the median of ``LinkView.effective_gbps``: the measured
deliverable bandwidth, or the budget when nothing shows less), it runs the same configuration search as ``prfaas plan`` and proposes a
new threshold and local split when that raises the modelled Lambda_max by more than ``min_gain``
(hysteresis, so the roles do not flap on noise).
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import numpy as np

from libs.planner.search import PlanInputs, search_prfaas_pd
from libs.planner.throughput import at_threshold
from libs.planner.workloads import Empirical, Workload

MIN_OBSERVED = 500  # below this many observed lengths, plan with the configured workload


class SlowTimescale:
    """Keeps the history a re-plan needs (recent uncached lengths, link readings per site) and proposes (t, N_p).

    One long-lived object per router (or simulated cluster): it only observes between re-plans;
    ``propose`` takes the deployment as it is then.
    """

    def __init__(self, history: int = 2000, min_gain: float = 0.02) -> None:
        self.lengths: deque[int] = deque(maxlen=history)
        self.min_gain = min_gain
        self._bandwidths: dict[str, deque[float]] = {}  # effective link Gbps seen per site since the last reading
        self._history = history

    def observe(self, prompt_tokens: int) -> None:
        """Record one arriving request's uncached length."""
        self.lengths.append(prompt_tokens)

    def observe_link(self, effective_gbps: float, site: str = "") -> None:
        """Record the effective bandwidth of the link from ``site`` as the policy read it now."""
        readings = self._bandwidths.get(site)
        if readings is None:
            readings = self._bandwidths[site] = deque(maxlen=self._history)
        readings.append(effective_gbps)

    def measured_link_gbps(self, site: str = "") -> float | None:
        """The median effective bandwidth from ``site`` observed since the last call (a transient does not re-plan)."""
        readings = self._bandwidths.pop(site, None)
        return float(np.median(readings)) if readings else None

    def observed(self) -> int:
        """How many lengths are in the history (a re-plan needs ``MIN_OBSERVED``)."""
        return sum(1 for n in self.lengths if n > 0)

    def _workload(self, configured: Workload) -> Workload:
        if len(self.lengths) < MIN_OBSERVED:
            return configured
        return Empirical(lengths=np.fromiter(self.lengths, dtype=np.int64), source="observed")

    def propose(self, inputs: PlanInputs, link_gbps: float, threshold_tokens: int, n_p: int) -> tuple[int, int] | None:
        """A better (t, N_p) for ``inputs``' deployment on a link measured to deliver ``link_gbps``, or None to keep the plan."""
        inputs = replace(inputs, link_gbps=link_gbps, workload=self._workload(inputs.workload))
        best = search_prfaas_pd(inputs).throughput
        current = at_threshold(
            inputs.deployment(inputs.n_prfaas, n_p, inputs.n_pd - n_p), inputs.workload, threshold_tokens
        )
        if best.lambda_max <= current.lambda_max * (1 + self.min_gain):
            return None
        return int(best.threshold_tokens), best.n_p
