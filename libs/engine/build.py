"""A gateway's backend from its settings: ``reference`` or ``simulated:<hardware>`` with a model profile."""

from __future__ import annotations

from dataclasses import dataclass

from threadpoolctl import threadpool_limits

from libs.common.config import EnvReader
from libs.common.errors import BadRequest, ConfigError
from libs.engine.backends import DEFAULT_CACHE_BYTES, Backend, ReferenceBackend
from libs.engine.profiles import HARDWARE, MODELS, HardwareProfile, ModelProfile
from libs.engine.simulated import SimulatedBackend

REFERENCE = "reference"
REFERENCE_HARDWARE = "cpu"
SIMULATED = "simulated:"


@dataclass(frozen=True)
class BackendSpec:
    """Which backend an instance runs, and its scaling (simulated chips) and cache size."""

    backend: str = REFERENCE  # "reference" or "simulated:<hardware>"
    model: str = "kimi-linear-1t"  # model profile of a simulated chip (the reference backend is its own model)
    time_scale: float = 1.0
    byte_scale: float = 1.0
    cache_bytes: int = DEFAULT_CACHE_BYTES
    max_batch: int = 0  # decode batch limit (0: the backend's own limit)
    # Simulated decode: steps a wake-up may advance (after each first token; an arrival ends it early): the same
    # tokens at the same modelled times in fewer messages, so a time-scaled decode does not flood the bus.
    decode_chunk: int = 1
    # BLAS threads of the process. One by default: a gateway shares its host with other processes,
    # and BLAS threads that spin-wait for a busy core make a reference prefill 5-10x slower.
    compute_threads: int = 1

    @property
    def simulated(self) -> bool:
        """True for a simulated chip."""
        return self.backend.startswith(SIMULATED)

    @property
    def hardware(self) -> HardwareProfile | None:
        """The simulated chip's hardware profile (None for the reference backend)."""
        return HARDWARE[self.backend.removeprefix(SIMULATED)] if self.simulated else None

    @property
    def model_profile(self) -> ModelProfile:
        """The profile of the model this instance serves."""
        return MODELS[self.model if self.simulated else REFERENCE]

    @property
    def model_name(self) -> str:
        """Name of the served model, as jobs must give it."""
        return self.model_profile.name

    @property
    def hardware_name(self) -> str:
        """Hardware profile name (``cpu`` for the reference model, whose profile is fitted to a host CPU)."""
        return self.backend.removeprefix(SIMULATED) if self.simulated else REFERENCE_HARDWARE

    def decode_limit(self) -> int:
        """Largest decode batch the backend supports (0: cannot decode)."""
        if not self.simulated:
            return 256
        hardware = self.hardware
        return 0 if hardware.prefill_only else self.model_profile.max_batch(hardware)

    @classmethod
    def from_env(cls, r: EnvReader) -> BackendSpec:
        """Read ``BACKEND``, ``MODEL``, ``TIME_SCALE``, ``BYTE_SCALE``, ``CACHE_BYTES``, ``MAX_BATCH``, ``DECODE_CHUNK``,
        ``COMPUTE_THREADS``."""
        d = cls()
        backend = r.str("BACKEND", d.backend)
        if backend != REFERENCE:
            hardware = backend.removeprefix(SIMULATED)
            if not backend.startswith(SIMULATED) or hardware not in HARDWARE:
                raise ConfigError(
                    f"{r.prefix}BACKEND={backend!r}: expected {REFERENCE!r} or "
                    f"'simulated:<hardware>' with hardware one of {', '.join(sorted(HARDWARE))}"
                )
        model = r.str("MODEL", d.model)
        if model not in MODELS:
            raise ConfigError(f"{r.prefix}MODEL={model!r}: expected one of {', '.join(sorted(MODELS))}")
        if backend == REFERENCE and r.str("MODEL", REFERENCE) != REFERENCE:
            raise ConfigError(
                f"{r.prefix}MODEL={model!r}: the reference backend serves the model {REFERENCE!r}; "
                f"other models run on 'simulated:<hardware>'"
            )
        time_scale = r.float("TIME_SCALE", d.time_scale, minimum=0.0)
        byte_scale = r.float("BYTE_SCALE", d.byte_scale)
        if byte_scale <= 0:
            raise ConfigError(f"{r.prefix}BYTE_SCALE={byte_scale!r}: expected a number > 0")
        return cls(
            backend=backend,
            model=model,
            time_scale=time_scale,
            byte_scale=byte_scale,
            cache_bytes=r.int("CACHE_BYTES", d.cache_bytes, minimum=0),
            max_batch=r.int("MAX_BATCH", d.max_batch, minimum=0),
            decode_chunk=r.int("DECODE_CHUNK", d.decode_chunk, minimum=1),
            compute_threads=r.int("COMPUTE_THREADS", d.compute_threads, minimum=1),
        )


def build_backend(spec: BackendSpec) -> Backend:
    """A fresh backend instance for ``spec`` (and the process's BLAS threads set to ``spec.compute_threads``)."""
    threadpool_limits(limits=spec.compute_threads, user_api="blas")
    try:
        if spec.simulated:
            return SimulatedBackend(
                spec.hardware_name,
                spec.model,
                spec.time_scale,
                spec.byte_scale,
                cache_capacity_bytes=spec.cache_bytes,
                max_batch=spec.max_batch or None,
                decode_chunk=spec.decode_chunk,
            )
        return ReferenceBackend(cache_capacity_bytes=spec.cache_bytes, max_batch=spec.max_batch or spec.decode_limit())
    except BadRequest as e:
        raise ConfigError(f"backend {spec.backend}: {e.message}") from None
