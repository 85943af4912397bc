"""The one set of model and hardware profiles (planner, simulator, simulated backends, router).

Every number says where it comes from. "Paper" means ``shared/reference/prfaas-paper.md`` (the
PrfaaS case study and its KV-throughput table); "assumed" and "estimated" mark our own choices.

Time model. A model's prefill time on one 8xH200 instance is ``a + b*k + c*k**2`` seconds with
``k = tokens / 1000`` (fixed overhead, token-proportional GEMM work, quadratic attention work). A
hardware profile scales the three parts by its own factors, so its slowdown vs H200 grows with
length when its compute factors exceed its fixed factor (the paper's H20 calibration note).
Decode is memory-bound: one step streams the active weights plus, per sequence in the batch, its
routed-expert weights and its KV/state; ``max_batch`` is the largest batch whose step meets the
model's TPOT target and whose KV fits next to the weights (and, for chips that cap it, such as
the SRAM-bound LPU, no larger than the chip's own limit: small batches, fast steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from libs.common.errors import BadRequest
from libs.engine.reference_config import ReferenceConfig

MIB = 1 << 20
_PROFILE_LENGTHS_TOKENS = (1024, 8192, 32768, 131072)  # the paper's 1K/8K/32K/128K columns


@dataclass(frozen=True)
class HardwareProfile:
    """One serving instance of a chip type: speed relative to 8xH200, memory, decode and price."""

    name: str
    chip: str
    gpus_per_instance: int
    memory_gb_per_gpu: float
    memory_bandwidth_tb_per_s_per_gpu: float
    price_per_gpu_hour: float
    prefill_fixed_factor: float  # scales the model's fixed prefill overhead (1.0 = H200)
    prefill_linear_factor: float  # scales token-proportional prefill work (1.0 = H200)
    prefill_attention_factor: float  # scales quadratic attention work (1.0 = H200)
    decode_overhead_s: float  # per decode step: collectives, launches (assumed)
    decode_bw_efficiency: float  # achieved fraction of peak memory bandwidth in decode
    usable_memory_fraction: float = 0.9  # rest: activations, fragmentation (assumed)
    prefill_only: bool = False  # a chip built for prefill (no decode instances on it)
    max_decode_batch: int = 0  # the chip's own cap on a decode batch (0: none beyond memory and TPOT)
    source: str = ""

    @property
    def memory_gb(self) -> float:
        """Memory of the whole instance in GB."""
        return self.memory_gb_per_gpu * self.gpus_per_instance

    @property
    def memory_bytes(self) -> int:
        """Memory of the whole instance in bytes."""
        return int(self.memory_gb * 1e9)

    @property
    def memory_bandwidth_bytes_per_s(self) -> float:
        """Peak memory bandwidth of the whole instance in bytes/s."""
        return self.memory_bandwidth_tb_per_s_per_gpu * 1e12 * self.gpus_per_instance

    @property
    def price_per_hour(self) -> float:
        """Price of the whole instance in USD per hour."""
        return self.price_per_gpu_hour * self.gpus_per_instance

    def prefill_slowdown(self, tokens: int, model: ModelProfile | None = None) -> float:
        """Prefill time on this hardware over the time on 8xH200 (default model: the case study)."""
        model = model or MODELS["kimi-linear-1t"]
        return model.prefill_time_s(tokens, self) / model.prefill_time_s(tokens, HARDWARE["h200"])


@dataclass(frozen=True)
class ModelProfile:
    """KV sizes, prefill time and decode traffic of one model (sizes are whole-model totals)."""

    name: str
    n_layers: int
    n_full_layers: int
    n_linear_layers: int  # linear-attention or sliding-window layers (fixed-size state)
    linear_state_bytes: int  # fixed state of the whole model, independent of length
    attn_kv_bytes_per_token: int  # full-attention KV per token, whole model
    prefill_fixed_s: float  # a: on one 8xH200 instance
    prefill_s_per_ktoken: float  # b
    prefill_s_per_ktoken_sq: float  # c
    weight_bytes: int  # resident weights
    decode_weight_bytes: int  # weights streamed per decode step regardless of batch
    decode_bytes_per_seq: int  # extra weights streamed per sequence in the batch (routed experts)
    decode_context_tokens: int = 32768  # context length assumed for KV reads and KV memory
    tpot_slo_s: float = 0.025  # per-step latency target that caps the batch (assumed)
    max_running_requests: int = 256  # engine cap on a decode batch (assumed, SGLang-like)
    max_prompt_tokens: int = 131072  # longest prompt served (the paper's 128K profile column)
    source: str = ""
    full_layer_indices: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.n_full_layers + self.n_linear_layers != self.n_layers:
            raise ValueError(f"{self.name}: full + linear layers != n_layers")
        if self.n_full_layers and self.attn_kv_bytes_per_token % self.n_full_layers:
            raise ValueError(f"{self.name}: attn_kv_bytes_per_token not divisible by full layers")
        if self.n_linear_layers and self.linear_state_bytes % self.n_linear_layers:
            raise ValueError(f"{self.name}: linear_state_bytes not divisible by linear layers")
        # Full-attention layers spread evenly, the last layer being one (3:1 -> layers 3, 7, ...).
        full = tuple(round((j + 1) * self.n_layers / self.n_full_layers) - 1 for j in range(self.n_full_layers))
        object.__setattr__(self, "full_layer_indices", full)

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of KV/state after prefilling ``tokens``: fixed linear state + per-token attention KV."""
        return self.linear_state_bytes + self.attn_kv_bytes_per_token * int(tokens)

    def is_full_attention(self, layer: int) -> bool:
        """True when ``layer`` is a full-attention layer (its KV grows per token)."""
        return layer in self.full_layer_indices

    def layer_state_bytes(self, layer: int, tokens: int) -> int:
        """Bytes one layer contributes to :meth:`kv_bytes` (they sum exactly to it)."""
        if self.is_full_attention(layer):
            return self.attn_kv_bytes_per_token // self.n_full_layers * int(tokens)
        return self.linear_state_bytes // self.n_linear_layers

    def prefill_time_s(self, tokens: int, hardware: HardwareProfile) -> float:
        """Seconds to prefill ``tokens`` uncached tokens on one instance of ``hardware``."""
        k = max(0, tokens) / 1000.0
        return (
            hardware.prefill_fixed_factor * self.prefill_fixed_s
            + hardware.prefill_linear_factor * self.prefill_s_per_ktoken * k
            + hardware.prefill_attention_factor * self.prefill_s_per_ktoken_sq * k * k
        )

    def phi_gbps(self, tokens: int, hardware: HardwareProfile) -> float:
        """KV throughput of one prefill instance: kv_bytes / prefill time, in Gbit/s."""
        return self.kv_bytes(tokens) * 8 / 1e9 / self.prefill_time_s(tokens, hardware)

    def decode_step_s(self, batch: int, hardware: HardwareProfile) -> float:
        """Seconds of one decode step of ``batch`` sequences on one instance of ``hardware``."""
        per_seq = self.decode_bytes_per_seq + self.kv_bytes(self.decode_context_tokens)
        streamed = self.decode_weight_bytes + max(1, batch) * per_seq
        return hardware.decode_overhead_s + streamed / (
            hardware.memory_bandwidth_bytes_per_s * hardware.decode_bw_efficiency
        )

    def max_batch(self, hardware: HardwareProfile) -> int:
        """Largest decode batch meeting the TPOT target and fitting in memory (0: weights do not fit, or a prefill-only chip)."""
        if hardware.prefill_only:
            return 0
        free = hardware.memory_bytes * hardware.usable_memory_fraction - self.weight_bytes
        if free <= 0:
            return 0
        by_memory = int(free // self.kv_bytes(self.decode_context_tokens))
        per_seq = self.decode_bytes_per_seq + self.kv_bytes(self.decode_context_tokens)
        budget = (self.tpot_slo_s - hardware.decode_overhead_s) * (
            hardware.memory_bandwidth_bytes_per_s * hardware.decode_bw_efficiency
        ) - self.decode_weight_bytes
        by_latency = math.floor(budget / per_seq + 1e-9)
        cap = min(self.max_running_requests, hardware.max_decode_batch or self.max_running_requests)
        return max(0, min(by_memory, max(1, by_latency), cap))

    def decode_rps(self, hardware: HardwareProfile, output_tokens: int) -> float:
        """Requests/s one instance finishes at full batch: BS_max / (T_decode * L_out)."""
        batch = self.max_batch(hardware)
        if batch == 0:
            return 0.0
        return batch / (self.decode_step_s(batch, hardware) * output_tokens)


# --- Hardware ------------------------------------------------------------------------------
#
# Peak numbers are public datasheet values per GPU; prices are assumed on-demand cloud rates
# (USD per GPU-hour, 2025). H200 at 2x H20 is what the paper's ~15% cost-normalised gain implies
# (32 H200 + 64 H20 at 3.24 req/s vs 96 H20 at 2.11 req/s).
#
# H20 calibration (paper's note): the table implies T_H20(10.2K) = 1.83 s and T_H20(27.5K) =
# 4.27 s, i.e. 2.24x and 2.63x the H200 fit. Solving fixed*a + compute*(b*k + c*k^2) through both
# points gives compute factor 3.037 and fixed factor 1.270; the same curve gives T_H20(62.6K) =
# 9.75 s, matching the paper's homogeneous P90 TTFT (9.73 s) without being fitted to it. (The
# peak-FLOPs ratio H200/H20 is ~6.7x; the paper's numbers imply ~3x on the compute part.)
#
# Decode calibration: the paper implies ~0.782 req/s per 8xH20 instance at 1,024 output tokens
# (e.g. BS_max 20 at 25 ms). With the case-study model's decode traffic below and an assumed
# 5 ms per-step overhead, a bandwidth efficiency of 0.35 gives step(20) = 24.9 ms on 8xH20 and
# step(21) > 25 ms, so BS_max = 20 and 0.784 req/s. The same efficiency is used for every chip.
_HOPPER_DECODE_EFFICIENCY = 0.35
_GPU_STEP_OVERHEAD_S = 0.005

HARDWARE: dict[str, HardwareProfile] = {
    hw.name: hw
    for hw in (
        HardwareProfile(
            name="h200",
            chip="NVIDIA H200 SXM",
            gpus_per_instance=8,
            memory_gb_per_gpu=141.0,  # datasheet: 141 GB HBM3e
            memory_bandwidth_tb_per_s_per_gpu=4.8,  # datasheet
            price_per_gpu_hour=3.50,  # assumed on-demand rate
            prefill_fixed_factor=1.0,  # the reference: prefill fits are measured on 8xH200
            prefill_linear_factor=1.0,
            prefill_attention_factor=1.0,
            decode_overhead_s=_GPU_STEP_OVERHEAD_S,
            decode_bw_efficiency=_HOPPER_DECODE_EFFICIENCY,
            source="datasheet (989 TFLOPS BF16 dense); prefill is the paper's measured reference",
        ),
        HardwareProfile(
            name="h20",
            chip="NVIDIA H20",
            gpus_per_instance=8,
            memory_gb_per_gpu=96.0,  # datasheet: 96 GB HBM3
            memory_bandwidth_tb_per_s_per_gpu=4.0,  # datasheet
            price_per_gpu_hour=1.75,  # assumed: half an H200 (what the paper's cost gain implies)
            prefill_fixed_factor=1.270,  # calibrated to the paper's table (see note above)
            prefill_linear_factor=3.037,
            prefill_attention_factor=3.037,
            decode_overhead_s=_GPU_STEP_OVERHEAD_S,
            decode_bw_efficiency=_HOPPER_DECODE_EFFICIENCY,
            source="datasheet (148 TFLOPS BF16 dense); prefill and decode calibrated to the paper",
        ),
        HardwareProfile(
            name="h100",
            chip="NVIDIA H100 SXM",
            gpus_per_instance=8,
            memory_gb_per_gpu=80.0,  # datasheet: 80 GB HBM3
            memory_bandwidth_tb_per_s_per_gpu=3.35,  # datasheet
            price_per_gpu_hour=2.99,  # assumed on-demand rate
            prefill_fixed_factor=1.0,  # same die and FLOPs as H200 (989 TFLOPS BF16 dense)
            prefill_linear_factor=1.1,  # estimated: lower bandwidth and memory cost ~10%
            prefill_attention_factor=1.1,
            decode_overhead_s=_GPU_STEP_OVERHEAD_S,
            decode_bw_efficiency=_HOPPER_DECODE_EFFICIENCY,
            source="datasheet; prefill factors estimated",
        ),
        HardwareProfile(
            name="b200",
            chip="NVIDIA B200",
            gpus_per_instance=8,
            memory_gb_per_gpu=180.0,  # datasheet (DGX B200: 1,440 GB per 8 GPUs)
            memory_bandwidth_tb_per_s_per_gpu=8.0,  # datasheet
            price_per_gpu_hour=5.99,  # assumed on-demand rate
            prefill_fixed_factor=0.9,  # estimated
            prefill_linear_factor=0.5,  # estimated: 2.25 PFLOPS BF16 dense = 2.3x H200 peak, ~2x achieved
            prefill_attention_factor=0.5,
            decode_overhead_s=_GPU_STEP_OVERHEAD_S,
            decode_bw_efficiency=_HOPPER_DECODE_EFFICIENCY,
            source="datasheet; prefill factors estimated from the peak-FLOPs ratio",
        ),
        HardwareProfile(
            name="rubin-cpx",
            chip="NVIDIA Rubin CPX (announced Sep 2025, ships end of 2026)",
            gpus_per_instance=8,
            memory_gb_per_gpu=128.0,  # announced: 128 GB GDDR7
            memory_bandwidth_tb_per_s_per_gpu=2.0,  # estimated: GDDR7 ~2 TB/s (public write-ups)
            price_per_gpu_hour=2.50,  # estimated: no HBM/CoWoS; not yet sold
            prefill_fixed_factor=1.2,  # estimated: PCIe Gen6, no NVLink -> slower collectives
            prefill_linear_factor=0.25,  # estimated: 30 PFLOPS NVFP4 (~20 dense) vs 1.98 FP8 on H200
            prefill_attention_factor=0.15,  # estimated: announced 3x attention vs GB300 (~2.3x H200)
            decode_overhead_s=_GPU_STEP_OVERHEAD_S,
            decode_bw_efficiency=_HOPPER_DECODE_EFFICIENCY,
            prefill_only=True,  # announced as a context (prefill) accelerator beside Rubin GPUs that decode
            source="NVIDIA announcement (30 PFLOPS NVFP4, 128 GB GDDR7, 3x attention vs GB300); "
            "bandwidth, price and achieved speed estimated",
        ),
        HardwareProfile(
            name="groq-lpu",
            chip="Groq LPU (GroqChip, 230 MB SRAM, ~80 TB/s on-chip)",
            gpus_per_instance=4096,  # assumed: enough chips to hold a 1T 4-bit model in SRAM
            memory_gb_per_gpu=0.23,  # public: 230 MB SRAM per chip
            memory_bandwidth_tb_per_s_per_gpu=80.0,  # public: ~80 TB/s SRAM bandwidth per chip
            price_per_gpu_hour=0.10,  # estimated: not sold; GroqCloud prices per token
            prefill_fixed_factor=0.5,  # estimated: deterministic pipeline, no launch overhead
            prefill_linear_factor=0.5,  # estimated: ~750 TOPS INT8 per chip, low utilisation
            prefill_attention_factor=0.5,
            decode_overhead_s=0.004,  # estimated: pipeline latency across the chip chain
            decode_bw_efficiency=_HOPPER_DECODE_EFFICIENCY,
            max_decode_batch=16,  # estimated: SRAM holds the weights, little room for KV; served in small batches
            source="public write-ups (230 MB SRAM, 80 TB/s, ~750 TOPS INT8 per chip); "
            "instance size, price and prefill speed estimated",
        ),
        # The reference model (numpy) on one host CPU: what the lab's reference instances run on,
        # so a router's predictions for them are in the right units. Fitted to `prfaas bench
        # engine` medians with one BLAS thread (a gateway's default) on a 2-core build machine
        # running other work: prefill 1K / 4K / 16K tokens in 93 / 441 / 3,517 ms (a + b*k + c*k^2
        # through the three points), decode ~1 ms per step alone and ~8 ms for 16 sequences at 4K
        # context. Other machines differ by their speed.
        HardwareProfile(
            name="cpu",
            chip="host CPU running the numpy reference model",
            gpus_per_instance=1,
            memory_gb_per_gpu=24.0,  # the build machine's RAM
            memory_bandwidth_tb_per_s_per_gpu=0.0103,  # fitted: effective bytes/s of a decode step
            price_per_gpu_hour=0.05,  # assumed: two cores of a cloud VM
            prefill_fixed_factor=7.33,  # fitted: 15 ms of Python per prefill
            prefill_linear_factor=6273.0,  # fitted: 68 ms per 1K tokens
            prefill_attention_factor=3447.0,  # fitted: 8.9 ms per (1K tokens)^2
            decode_overhead_s=0.0005,  # fitted
            decode_bw_efficiency=1.0,  # the bandwidth above is already the effective one
            source="fitted to prfaas bench engine on the build machine (reference model only)",
        ),
    )
}


# --- Models --------------------------------------------------------------------------------


def _fit_prefill_s(times_s: tuple[float, float, float, float]) -> tuple[float, float, float]:
    """Fit a + b*k + c*k^2 (k in thousands of tokens) to the four profile points, relative error."""
    k = np.array(_PROFILE_LENGTHS_TOKENS) / 1000.0
    t = np.array(times_s)
    design = np.stack([np.ones_like(k), k, k * k], axis=1) / t[:, None]
    coef, *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    a, b, c = (float(x) for x in coef)
    return a, b, c


# The paper's KV-throughput table (Gbps on 8xH200), kept beside the profiles built from it.
PAPER_PHI_GBPS: dict[str, tuple[float, float, float, float]] = {
    "kimi-linear-48b": (1.19, 2.29, 3.87, 4.88),
    "mimo-v2-flash": (0.82, 2.85, 4.66, 4.71),
    "qwen3.5-397b": (4.13, 6.28, 8.25, 7.47),
    "ring-2.5-1t": (7.27, 4.47, 2.59, 1.46),
    "minimax-m2.5": (4.94, 32.87, 59.93, 47.82),
    "qwen3-235b": (4.12, 22.42, 33.35, 21.50),
}


def _from_phi_table(
    name: str,
    *,
    n_layers: int,
    n_full_layers: int,
    linear_state_bytes_per_layer: int,
    attn_kv_bytes_per_token_per_layer: int,
    total_params_b: float,
    active_params_b: float,
    bytes_per_param: float,
    source: str,
) -> ModelProfile:
    """A public model: sizes from its architecture, H200 prefill time = S_kv / phi from the paper."""
    n_linear = n_layers - n_full_layers
    linear = linear_state_bytes_per_layer * n_linear
    per_token = attn_kv_bytes_per_token_per_layer * n_full_layers
    times = tuple(
        (linear + per_token * n) * 8 / 1e9 / phi
        for n, phi in zip(_PROFILE_LENGTHS_TOKENS, PAPER_PHI_GBPS[name], strict=True)
    )
    a, b, c = _fit_prefill_s(times)
    active_bytes = int(active_params_b * 1e9 * bytes_per_param)
    return ModelProfile(
        name=name,
        n_layers=n_layers,
        n_full_layers=n_full_layers,
        n_linear_layers=n_linear,
        linear_state_bytes=linear,
        attn_kv_bytes_per_token=per_token,
        prefill_fixed_s=a,
        prefill_s_per_ktoken=b,
        prefill_s_per_ktoken_sq=c,
        weight_bytes=int(total_params_b * 1e9 * bytes_per_param),
        decode_weight_bytes=active_bytes,
        decode_bytes_per_seq=int(active_bytes * _ROUTED_FRACTION),
        source=source,
    )


# Assumed for every MoE model: routed experts are ~60% of the active parameters, and each extra
# sequence in a decode batch streams its own routed experts (linearised; overlap ignored).
_ROUTED_FRACTION = 0.6
_MLA_BYTES_PER_TOKEN = (512 + 64) * 2  # MLA latent (kv_lora_rank 512 + rope 64), bf16
_STATE_128x128_FP32 = 128 * 128 * 4  # one linear-attention head's recurrent state, fp32


def _case_study_model() -> ModelProfile:
    """The paper's internal 1T hybrid (Kimi Linear design, KDA:MLA 3:1) profiled on 8xH200."""
    sizes_mib = np.array([190.8, 308.9, 701.3, 2316.3])  # paper's profile table, S_kv column
    lengths = np.array(_PROFILE_LENGTHS_TOKENS, dtype=float)
    per_token, fixed = np.polyfit(lengths, sizes_mib * MIB, 1)  # ~172 MiB + ~16.7 KiB/token
    n_full, n_linear = 15, 45  # assumed: 60 layers, 3:1 (4 MiB KDA state and ~1.1 KB MLA per layer)
    active = 32e9 * 0.5  # assumed Kimi-K2-like: 32B active params at 4-bit
    return ModelProfile(
        name="kimi-linear-1t",
        n_layers=n_full + n_linear,
        n_full_layers=n_full,
        n_linear_layers=n_linear,
        linear_state_bytes=round(fixed / n_linear) * n_linear,
        attn_kv_bytes_per_token=round(per_token / n_full) * n_full,
        prefill_fixed_s=0.371,  # paper reference fit on 8xH200 (k = tokens/1000)
        prefill_s_per_ktoken=0.0429,
        prefill_s_per_ktoken_sq=0.0000938,
        weight_bytes=int(1.04e12 * 0.5 + 40e9),  # assumed: 1.04T params at 4-bit + bf16 embeddings/norms
        decode_weight_bytes=int(active),
        decode_bytes_per_seq=int(active * _ROUTED_FRACTION),
        source="paper: S_kv fitted to the profile table (least squares), T_prefill from the "
        "reference fit; layer split, weights and decode traffic assumed (Kimi K2-like, 4-bit)",
    )


def _reference_model() -> ModelProfile:
    """The numpy reference model: sizes from ReferenceConfig, time estimated from its FLOPs."""
    cfg = ReferenceConfig()
    per_layer = 4 * cfg.d_model * cfg.d_model + 3 * cfg.d_model * cfg.d_ff  # projections + gated MLP
    params = cfg.n_layers * per_layer + cfg.vocab_size * cfg.d_model
    weight_bytes = params * cfg.dtype_bytes
    h200_flops = 8 * 989e12 * 0.05  # estimated: a tiny model reaches ~5% of an 8xH200 peak
    return ModelProfile(
        name="reference",
        n_layers=cfg.n_layers,
        n_full_layers=len(cfg.full_layers),
        n_linear_layers=len(cfg.linear_layers),
        linear_state_bytes=cfg.linear_state_bytes,
        attn_kv_bytes_per_token=cfg.attn_kv_bytes_per_token,
        prefill_fixed_s=0.002,  # estimated: kernel launches for 8 layers
        prefill_s_per_ktoken=2 * params * 1000 / h200_flops,
        prefill_s_per_ktoken_sq=4 * len(cfg.full_layers) * cfg.d_model * 1e6 / h200_flops,
        weight_bytes=weight_bytes,
        decode_weight_bytes=weight_bytes,
        decode_bytes_per_seq=0,
        decode_context_tokens=4096,
        max_prompt_tokens=cfg.max_prompt_tokens,
        source="libs.engine.reference_config.ReferenceConfig (sizes exact); times estimated from FLOPs",
    )


MODELS: dict[str, ModelProfile] = {
    m.name: m
    for m in (
        _case_study_model(),
        _from_phi_table(
            "kimi-linear-48b",
            n_layers=27,
            n_full_layers=7,  # public config: 20 KDA + 7 MLA
            linear_state_bytes_per_layer=32 * _STATE_128x128_FP32,  # 32 KDA heads of 128x128, fp32
            attn_kv_bytes_per_token_per_layer=_MLA_BYTES_PER_TOKEN,
            total_params_b=48,
            active_params_b=3,
            bytes_per_param=1.0,  # assumed FP8 serving
            source="Kimi-Linear-48B-A3B public config (as recalled); phi from the paper's table",
        ),
        _from_phi_table(
            "mimo-v2-flash",
            n_layers=48,
            n_full_layers=8,  # SWA:GQA 5:1
            linear_state_bytes_per_layer=128 * 8 * (192 + 128) * 2,  # 128-token window, 8 KV heads
            attn_kv_bytes_per_token_per_layer=4 * (192 + 128) * 2,  # 4 KV heads, K 192 + V 128, bf16
            total_params_b=309,
            active_params_b=15,
            bytes_per_param=1.0,
            source="MiMo-V2-Flash public description (309B-A15B, window 128); head counts assumed; "
            "SWA layers counted as fixed-size state (full window)",
        ),
        _from_phi_table(
            "qwen3.5-397b",
            n_layers=60,
            n_full_layers=15,  # GDN:GQA 3:1
            linear_state_bytes_per_layer=64 * _STATE_128x128_FP32,  # 64 GDN value heads, fp32 state
            attn_kv_bytes_per_token_per_layer=2 * 2 * 256 * 2,  # 2 KV heads of 256, K+V, bf16
            total_params_b=397,
            active_params_b=17,
            bytes_per_param=1.0,
            source="Qwen3.5-397B-A17B public config (as recalled); phi from the paper's table",
        ),
        _from_phi_table(
            "ring-2.5-1t",
            n_layers=80,
            n_full_layers=10,  # linear:MLA 7:1
            linear_state_bytes_per_layer=64 * _STATE_128x128_FP32,  # assumed 64 heads of 128x128 fp32
            attn_kv_bytes_per_token_per_layer=_MLA_BYTES_PER_TOKEN,
            total_params_b=1000,
            active_params_b=50,
            bytes_per_param=1.0,
            source="Ring-2.5-1T: depth and head counts assumed (Ling-2.x-1T-like); phi from the paper",
        ),
        _from_phi_table(
            "minimax-m2.5",
            n_layers=62,
            n_full_layers=62,  # dense GQA
            linear_state_bytes_per_layer=0,
            attn_kv_bytes_per_token_per_layer=2 * 8 * 128 * 2,  # 8 KV heads of 128, K+V, bf16
            total_params_b=230,
            active_params_b=10,
            bytes_per_param=1.0,
            source="MiniMax-M2 public config (assumed unchanged in M2.5); phi from the paper's table",
        ),
        _from_phi_table(
            "qwen3-235b",
            n_layers=94,
            n_full_layers=94,  # dense GQA
            linear_state_bytes_per_layer=0,
            attn_kv_bytes_per_token_per_layer=2 * 4 * 128 * 2,  # 4 KV heads of 128, K+V, bf16
            total_params_b=235,
            active_params_b=22,
            bytes_per_param=1.0,
            source="Qwen3-235B-A22B public config; phi from the paper's table",
        ),
        _reference_model(),
    )
}


def model_profile(name: str) -> ModelProfile:
    """The model profile called ``name`` (BadRequest lists the known names)."""
    try:
        return MODELS[name]
    except KeyError:
        raise BadRequest(f"unknown model profile {name!r}; known: {', '.join(sorted(MODELS))}") from None


def hardware_profile(name: str) -> HardwareProfile:
    """The hardware profile called ``name`` (BadRequest lists the known names)."""
    try:
        return HARDWARE[name]
    except KeyError:
        raise BadRequest(f"unknown hardware profile {name!r}; known: {', '.join(sorted(HARDWARE))}") from None
