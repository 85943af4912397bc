"""Every ``prfaas bench NAME``: its module (imported only when run), what it measures and its targets."""

from __future__ import annotations

from libs.bench.targets import Benchmark, Target

MS, US, S = " ms", " us", " s"
CHAOS_FAULTS = (  # libs.bench.chaos_faults.FAULT_NAMES (a test checks; the catalog imports no benchmark)
    "prefill_kill_dc-a",
    "prefill_kill_dc-b",
    "decode_kill",
    "kv_index_kill",
    "redis_restart",
    "nats_restart_dc-a",
    "nats_restart_dc-b",
    "partition",
    "router_kill",
    "link_loss",
    "prefill_stop",
    "overload",
)

BENCHMARKS: dict[str, Benchmark] = {
    "kvindex": Benchmark(
        "libs.bench.kvindex",
        "KV index lookup of a 2,048-block prompt over 1M indexed blocks, end to end through NATS; ingest rate "
        "through JetStream",
        (
            Target("lookup_p50_ms", at_most=5.0, unit=MS),
            Target("lookup_p99_ms", at_most=20.0, unit=MS),
            Target("ingest_events_per_s", at_least=20_000.0),
        ),
    ),
    "engine": Benchmark(
        "libs.bench.engine",
        "reference-model prefill and decode tokens/s; 4K prefill in model FLOPs as a share of numpy GEMM "
        "measured in the same run",
        (Target("prefill_4k_gemm_fraction.median", at_least=0.30),),
    ),
    "policy": Benchmark(
        "libs.bench.policy",
        "routing decision time of every policy on a 32-instance view",
        (Target("decision_p50_us", at_most=50.0, unit=US),),
    ),
    "router": Benchmark(
        "libs.bench.router",
        "router decision at 1K/32K tokens (tokenizer.json, populated index) against the index lookup alone; "
        "TTFT through the router minus straight to the gateways (1 and 50 clients, remote across a relay, "
        "cache hits)",
        (
            Target("decision_32k.vs_floor", at_most=1.5),
            Target("overhead_c50.p50_ms", at_most=3.0, unit=MS),
            Target("overhead_remote.p50_ms", at_most=3.0, unit=MS),
            Target("overhead_hit.p50_ms", at_most=3.0, unit=MS),
            Target("overhead_remote.remote_share", at_least=1.0),
            Target("overhead_hit.remote_share", at_least=1.0),
            Target("overhead_hit.hit_share", at_least=1.0),
            Target("decision_32k.p50_ms", at_most=2.0, unit=MS, binding=False),
            Target("decision_32k.p99_ms", at_most=10.0, unit=MS, binding=False),
        ),
    ),
    "kv": Benchmark(
        "libs.bench.kv",
        "KV transfer between processes against raw sockets / plain NATS of the same shape; pacing against its budget; "
        "with --tls, the same transfer over mutual TLS against plain",
        (
            Target("tcp_vs_raw_sockets.median", at_least=0.7, optional=True),
            Target("jetstream_vs_core_nats.median", at_least=0.6, optional=True),
            Target("tls_vs_plain.median", at_least=0.2, optional=True),  # --tls: both ends' crypto on loopback
            Target("achieved_vs_budget.median", at_least=0.95, at_most=1.05, optional=True),
            Target("max_window_vs_budget", at_most=1.05, optional=True),
            Target("alone_vs_budget.median", at_least=0.95, at_most=1.05, optional=True),
        ),
    ),
    "gateways": Benchmark(
        "libs.bench.gateways",
        "gateways across two sites: reference tokens vs monolithic generation; exposed transfer with layer-wise "
        "streaming vs without it; bytes of an 80%-shared prompt; TTFT over the modelled prefill and step; TTFT of a "
        "16K-token request across a 20/80 ms relay, cold and warm connection pool, beyond the same request at 0 ms",
        (
            Target.true("tokens_identical"),
            Target("pipelining.exposed_fraction.median", at_most=0.25),
            Target("pipelining.receiver_vs_budget.median", at_least=0.9, at_most=1.1),
            Target("prefix_reuse.bytes_fraction.median", at_most=0.3),
            Target("overhead_p50_ms", at_most=5.0, unit=MS),
            Target("warm_pool.exposed_rtts", at_most=1.0, optional=True),
            Target("cold_pool.exposed_rtts", at_least=1.0, optional=True, binding=False),
        ),
    ),
    "wan": Benchmark(
        "libs.bench.wan",
        "the WAN link relay: achieved bandwidth and RTT against what was set; its ceiling vs direct loopback; "
        "delivery times on new, idle and kept-alive connections against the TCP model; kvwire transfers over it with "
        "each host setting (pool, keepalive, slow start after idle, receive window); with --breaker-rounds, the "
        "router's link breaker on a lab whose link is cut and restored",
        (
            Target("bandwidth_ratio.min", at_least=0.95),
            Target("bandwidth_ratio.max", at_most=1.05),
            Target("delay.error_ms", at_most=2.0, unit=MS),
            Target("tcp_model.max_error", at_most=0.10),
            Target("keepalive.max_error", at_most=0.10),
            Target("host_settings.max_error", at_most=0.25, optional=True, binding=False),
            Target("breaker.cut_to_local_s", at_most=2.0, unit=S, optional=True),
            Target("breaker.failed_attempts_after_cut", at_most=0.0, optional=True),
            Target("breaker.restore_to_remote_s", at_most=10.0, unit=S, optional=True),
            Target("breaker.lost_requests", at_most=0.0, optional=True, binding=False),
        ),
    ),
    "case-study": Benchmark(
        "libs.bench.case_study",
        "the paper's case study on the lab (simulated chips, scaled): each planned deployment's sustainable "
        "throughput through the router against the planner's Lambda_max, PrfaaS-PD over each baseline, light-load "
        "TTFT against the simulator's",
        (
            Target("deployments_failed", at_most=0),
            Target("ratio_vs_homogeneous", at_least=1.54 * 0.9, at_most=1.54 * 1.1, optional=True),
            Target("ratio_vs_naive", at_least=1.32 * 0.9, at_most=1.32 * 1.1, optional=True),
            *(
                Target(f"configs.{name}.{figure}", at_least=low, at_most=high, optional=True)
                for name in ("prfaas_pd", "homogeneous", "naive_heterogeneous")
                for figure, low, high in (
                    ("throughput_vs_planner", 0.9, 1.1),
                    ("ttft_mean_vs_sim", 0.85, 1.15),
                    ("ttft_p90_vs_sim", 0.85, 1.15),
                )
            ),
        ),
    ),
    "bridge": Benchmark(
        "libs.bench.bridge",
        "the KV index's engine bridge: repaired and reset batches against the normal path; a replayed first "
        "contact against the same batches live",
        (
            Target("repaired.vs_baseline", at_most=2.0),
            Target("reset.vs_baseline", at_most=2.0),
            Target("first_contact_replay.vs_baseline", at_most=1.0),
        ),
    ),
    "chaos": Benchmark(
        "libs.bench.chaos",
        "faults under steady load on the default lab with two router replicas, one at a time (kill -9 of each "
        "gateway, kv_index, a router; Redis and nats-server restarts; a partition; 1% loss; a hung prefill; a 3x "
        "burst): requests sent, completed, failed with a clear error, lost, seconds to recover",
        (
            Target("lost_total", at_most=0.0),
            *(
                target
                for name in CHAOS_FAULTS
                for target in (
                    Target(f"faults.{name}.lost", at_most=0.0, optional=True),
                    Target(f"faults.{name}.cut", at_most=0.0, optional=True),
                    Target(f"faults.{name}.unexpected_errors", at_most=0.0, optional=True),
                    Target(f"faults.{name}.recovered", at_least=1.0, must_be_true=True, optional=True),
                    Target(f"faults.{name}.recovery_s", at_most=30.0, unit=S, optional=True, binding=False),
                )
            ),
            Target("faults.overload.last_503_after_s", at_most=5.0, unit=S, optional=True),
        ),
    ),
}
