"""Prometheus metrics of the KV index (one registry per service object)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class KvIndexMetrics:
    """Counters and histograms the KV index updates."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batches = Counter("prfaas_kv_index_batches", "Event batches by outcome", ["outcome"], registry=registry)
        self.block_events = Counter("prfaas_kv_index_block_events", "Block events applied", ["op"], registry=registry)
        self.bad_messages = Counter("prfaas_kv_index_bad_messages", "Malformed messages", ["source"], registry=registry)
        self.sequence_gaps = Counter(
            "prfaas_kv_index_sequence_gaps", "Sequence gaps (instance marked stale)", registry=registry
        )
        self.store_errors = Counter("prfaas_kv_index_store_errors", "Redis errors", ["op"], registry=registry)
        self.replays = Counter(
            "prfaas_kv_index_replays", "Rebuilds from the event stream after Redis lost its data", registry=registry
        )
        self.lookups = Counter("prfaas_kv_index_lookups", "Lookups by outcome", ["outcome"], registry=registry)
        self.lookup_seconds = Histogram(
            "prfaas_kv_index_lookup_seconds",
            "Lookup latency inside the service",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
            registry=registry,
        )
        self.engine_unmapped = Counter(
            "prfaas_kv_index_engine_unmapped_blocks",
            "Engine blocks whose parent or tokens were unknown",
            ["instance"],
            registry=registry,
        )
        self.engine_skipped = Counter(
            "prfaas_kv_index_engine_skipped_blocks",
            "Engine blocks that are not ours (LoRA, extra keys, held remotely)",
            ["instance", "reason"],
            registry=registry,
        )
        self.engine_ignored_events = Counter(
            "prfaas_kv_index_engine_ignored_events",
            "Engine events of types the bridge does not know",
            ["instance"],
            registry=registry,
        )
        self.engine_baselines = Counter(
            "prfaas_kv_index_engine_baselines",
            "Engine event streams taken as a new baseline (first contact, reconnect, engine restart)",
            ["instance", "reason"],
            registry=registry,
        )
        self.engine_gaps_repaired = Counter(
            "prfaas_kv_index_engine_gaps_repaired",
            "Engine sequence gaps repaired from the replay socket",
            ["instance"],
            registry=registry,
        )
        self.engine_replayed_batches = Counter(
            "prfaas_kv_index_engine_replayed_batches",
            "Engine batches received from replay sockets",
            ["instance"],
            registry=registry,
        )
        self.engine_resets = Counter(
            "prfaas_kv_index_engine_resets",
            "Unrepairable engine sequence gaps: the instance's blocks were dropped",
            ["instance", "reason"],
            registry=registry,
        )
