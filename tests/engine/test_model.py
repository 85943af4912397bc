"""The reference model: layer-wise prefill, state parts, resumption from cached blocks, decode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from libs.common.errors import BadRequest, ConfigError
from libs.engine.batch import DecodeBatch, DecodeSequence
from libs.engine.generate import decode, generate
from libs.engine.model import ReferenceModel
from libs.engine.reference_config import ReferenceConfig
from libs.engine.sampling import Sampling
from libs.engine.state import RequestState, plan_parts
from libs.engine.tokenizer import ByteTokenizer
from libs.engine.weights import init_weights
from tests.engine.parts_io import dump_parts

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. " * 7,
    "Prefill-as-a-Service: KVCache of next-generation models could go cross-datacenter.\n" * 4,
    "héllo, wörld ✓",
]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model() -> ReferenceModel:
    """One reference model for the module (weights are deterministic, so sharing is safe)."""
    return ReferenceModel()


def _tokens(text: str) -> list[int]:
    return ByteTokenizer().encode(text)


def _prefix_from(model: ReferenceModel, tokens: list[int], results: list, n_blocks: int) -> RequestState:
    """A prefix state built the way a cache does: KV rows and the linear checkpoint at the boundary."""
    cfg, bs = model.config, model.config.block_size
    ckpts = {r.layer: {p.name: p.array for p in r.checkpoints} for r in results}
    return RequestState(
        cfg,
        tokens=np.asarray(tokens[: n_blocks * bs], dtype=np.int32),
        keys={layer: results[layer].parts[0].array[: n_blocks * bs] for layer in cfg.full_layers},
        values={layer: results[layer].parts[1].array[: n_blocks * bs] for layer in cfg.full_layers},
        linear={layer: ckpts[layer][f"ckpt.{n_blocks}"] for layer in cfg.linear_layers},
        logits=None,
    )


def test_tokenizer_round_trips_utf8() -> None:
    """Byte-level ids: BOS first, every string decodes back exactly, EOS/BOS are dropped on decode."""
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓")
    assert ids[0] == tok.bos_id and max(ids[1:]) < 256
    assert tok.decode([*ids, tok.eos_id]) == "héllo ✓"


def test_weights_are_deterministic_from_the_seed() -> None:
    """Equal configs give bitwise-equal weights; another seed gives other weights."""
    a, b = init_weights(ReferenceConfig()), init_weights(ReferenceConfig())
    c = init_weights(ReferenceConfig(seed=7))
    assert np.array_equal(a.layers[5].w_down, b.layers[5].w_down)
    assert not np.array_equal(a.layers[5].w_down, c.layers[5].w_down)


def test_prefill_yields_layer_by_layer_with_planned_parts(model: ReferenceModel) -> None:
    """Prefill yields layers 0..n-1 then the head; the parts are exactly the plan, C-contiguous."""
    tokens = _tokens(PROMPTS[0])
    results = list(model.prefill(tokens))
    assert [r.layer for r in results] == list(range(model.config.n_layers + 1))
    parts = [p for r in results for p in r.parts]
    specs = plan_parts(model.config, len(tokens))
    assert [p.key for p in parts] == [s.key for s in specs]
    for part, spec in zip(parts, specs, strict=True):
        assert part.array.shape == spec.shape and part.array.dtype == np.dtype(spec.dtype)
        assert part.array.flags.c_contiguous and part.nbytes == spec.nbytes
    kv_bytes = sum(p.nbytes for p in parts if p.layer < model.config.n_layers)
    assert kv_bytes == model.config.linear_state_bytes + model.config.attn_kv_bytes_per_token * len(tokens)


def test_linear_layers_checkpoint_every_block_boundary(model: ReferenceModel) -> None:
    """Each linear layer yields ckpt.1..ckpt.k for the k full blocks; attention layers yield none."""
    tokens = _tokens(PROMPTS[0])
    n_blocks = len(tokens) // model.config.block_size
    for r in model.prefill(tokens):
        names = [p.name for p in r.checkpoints]
        if r.layer in model.config.linear_layers:
            assert names == [f"ckpt.{b}" for b in range(1, n_blocks + 1)]
        else:
            assert names == []


def test_state_parts_round_trip_without_copies(model: ReferenceModel) -> None:
    """to_parts gives views of the state; from_parts uses the arrays as they are."""
    state = model.prefill_state(_tokens(PROMPTS[1]))
    parts = state.to_parts()
    layer = model.config.full_layers[0]
    assert np.shares_memory(parts[[p.key for p in parts].index(f"{layer}/attn_kv/k")].array, state.keys[layer].view)
    again = RequestState.from_parts(model.config, parts)
    assert all(np.shares_memory(a.array, b.array) for a, b in zip(parts, again.to_parts(), strict=True))


def test_from_parts_rejects_missing_or_misshapen_parts(model: ReferenceModel) -> None:
    """A state with a part missing or of the wrong shape is a BadRequest naming the part."""
    parts = model.prefill_state(_tokens(PROMPTS[2])).to_parts()
    with pytest.raises(BadRequest, match="0/linear_state/state"):
        RequestState.from_parts(model.config, parts[1:])
    bad = [*parts[:-1], type(parts[-1])(parts[-1].layer, parts[-1].kind, parts[-1].name, parts[-1].array[:5])]
    with pytest.raises(BadRequest, match="logits"):
        RequestState.from_parts(model.config, bad)


def test_generation_survives_serialisation_to_another_process(model: ReferenceModel, tmp_path: Path) -> None:
    """Monolithic generation == prefill, serialise, deserialise and decode in another process."""
    tokens = _tokens(PROMPTS[0])
    expected = generate(model, tokens, 24, Sampling(ignore_eos=True))
    blob = tmp_path / "state.msgpack"
    blob.write_bytes(dump_parts(model.prefill_state(tokens).to_parts()))
    script = (
        "import json, sys\n"
        "from libs.engine.generate import decode\n"
        "from libs.engine.model import ReferenceModel\n"
        "from libs.engine.sampling import Sampling\n"
        "from libs.engine.state import RequestState\n"
        "from tests.engine.parts_io import load_parts\n"
        "m = ReferenceModel()\n"
        "state = RequestState.from_parts(m.config, load_parts(open(sys.argv[1], 'rb').read()))\n"
        "print(json.dumps(list(decode(m, state, 24, Sampling(ignore_eos=True)))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(blob)], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(out.stdout) == expected
    assert len(expected) == 24


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_prefill_resumed_from_cached_blocks_matches_full_prefill(model: ReferenceModel, prompt: str) -> None:
    """Resuming after k blocks gives logits within 1e-4 (relative) of a full prefill and the same greedy tokens."""
    tokens = _tokens(prompt)
    results = list(model.prefill(tokens))
    full_logits = results[-1].parts[1].array
    full_tokens = generate(model, tokens, 16, Sampling(ignore_eos=True))
    for n_blocks in range(1, (len(tokens) - 1) // model.config.block_size + 1):
        prefix = _prefix_from(model, tokens, results, n_blocks)
        resumed = model.prefill_state(tokens, prefix)
        rel = np.abs(resumed.logits - full_logits).max() / np.abs(full_logits).max()
        assert rel <= 1e-4, (n_blocks, rel)
        assert list(decode(model, resumed, 16, Sampling(ignore_eos=True))) == full_tokens


def test_prefix_must_be_whole_blocks_of_the_same_tokens(model: ReferenceModel) -> None:
    """A prefix that is not whole blocks, covers the prompt, or holds other tokens is refused."""
    tokens = _tokens(PROMPTS[0])
    results = list(model.prefill(tokens))
    prefix = _prefix_from(model, tokens, results, 2)
    other = list(tokens)
    other[5] = (other[5] + 1) % 256
    with pytest.raises(BadRequest, match="other tokens"):
        model.prefill_state(other, prefix)
    with pytest.raises(BadRequest, match="whole number of blocks"):
        model.prefill_state(tokens[:128], prefix)


def test_decode_step_matches_prefill_of_the_longer_prompt(model: ReferenceModel) -> None:
    """Feeding one token to a prefilled state gives the logits a prefill of the longer prompt gives."""
    tokens = _tokens(PROMPTS[1])
    state = model.prefill_state(tokens[:-1])
    model.forward_step([state], [tokens[-1]])
    full = model.prefill_state(tokens)
    assert np.abs(state.logits - full.logits).max() / np.abs(full.logits).max() <= 1e-4
    assert state.n_tokens == len(tokens)


def test_batched_decode_equals_each_request_alone(model: ReferenceModel) -> None:
    """Requests decoded in one batch, joining at different steps, give the tokens each gives alone."""
    greedy = Sampling(ignore_eos=True)
    sampled = Sampling(temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    jobs = [(PROMPTS[0], 20, greedy), (PROMPTS[1], 12, sampled), (PROMPTS[2], 16, greedy)]
    alone = [generate(model, _tokens(p), n, s) for p, n, s in jobs]
    batch = DecodeBatch(model)
    got: dict[str, list[int]] = {}
    for step in range(40):
        if step < len(jobs):  # one request joins per step
            p, n, s = jobs[step]
            batch.add(DecodeSequence(str(step), model.prefill_state(_tokens(p)), n, s, model.config.eos_id))
        for rid, out in batch.step().items():
            got.setdefault(rid, []).extend(out.token_ids)
    assert not batch.sequences
    assert [got[str(i)] for i in range(len(jobs))] == alone


def test_seeded_sampling_is_reproducible(model: ReferenceModel) -> None:
    """The same seed gives the same tokens; another seed gives others; greedy is temperature 0."""
    state_tokens = _tokens(PROMPTS[1])
    s1 = Sampling(temperature=1.0, top_p=0.95, seed=42, ignore_eos=True)
    a = generate(model, state_tokens, 24, s1)
    assert generate(model, state_tokens, 24, s1) == a
    assert generate(model, state_tokens, 24, Sampling(temperature=1.0, top_p=0.95, seed=43, ignore_eos=True)) != a
    tiny_top_p = Sampling(temperature=1.0, top_p=1e-6, seed=1, ignore_eos=True)
    assert generate(model, state_tokens, 24, tiny_top_p) == generate(model, state_tokens, 24, Sampling(ignore_eos=True))


def test_stop_rules(model: ReferenceModel) -> None:
    """Stop tokens and stop sequences end a request without returning them; max_tokens caps it."""
    tokens = _tokens(PROMPTS[0])
    free = generate(model, tokens, 30, Sampling(ignore_eos=True))
    assert len(free) == 30
    assert (
        generate(model, tokens, 30, Sampling(stop_token_ids=(free[5],), ignore_eos=True)) == free[: free.index(free[5])]
    )
    stop_text = ByteTokenizer().decode(free[6:9])
    got = generate(model, tokens, 30, Sampling(stop=(stop_text,), ignore_eos=True))
    assert ByteTokenizer().decode(got) + stop_text in ByteTokenizer().decode(free)
    assert len(got) <= 6


def test_eos_ends_decode(model: ReferenceModel) -> None:
    """Decode stops at EOS (not returned) unless ignore_eos is set."""
    weights = init_weights(model.config)
    weights.output_bias[model.config.eos_id] = 100.0  # EOS always wins
    eager = ReferenceModel(model.config, weights)
    tokens = _tokens(PROMPTS[2])
    assert generate(eager, tokens, 10) == []
    assert generate(eager, tokens, 10, Sampling(ignore_eos=True)) == [model.config.eos_id] * 10


def test_bad_requests_are_typed(model: ReferenceModel) -> None:
    """Empty or out-of-vocabulary prompts and bad sampling values raise BadRequest."""
    with pytest.raises(BadRequest):
        list(model.prefill([]))
    with pytest.raises(BadRequest):
        list(model.prefill([1, 999]))
    with pytest.raises(BadRequest):
        Sampling(top_p=0.0)
    with pytest.raises(BadRequest):
        Sampling(temperature=-1.0)
    with pytest.raises(BadRequest):
        generate(model, [1, 2], 0)


def test_long_prompts_carry_state_across_slabs(model: ReferenceModel) -> None:
    """Past one slab of rows, prefill still equals decode-step continuation and resumption at an odd block."""
    rng = np.random.default_rng(0)
    tokens = [model.config.bos_id, *rng.integers(32, 127, 1400).tolist()]
    results = list(model.prefill(tokens))
    full = results[-1].parts[1].array
    state = model.prefill_state(tokens[:-1])
    model.forward_step([state], [tokens[-1]])
    assert np.abs(state.logits - full).max() / np.abs(full).max() <= 1e-4
    resumed = model.prefill_state(tokens, _prefix_from(model, tokens, results, 9))  # 576 tokens: mid-slab
    assert np.abs(resumed.logits - full).max() / np.abs(full).max() <= 1e-4


def test_config_rejects_unsafe_numerics() -> None:
    """Chunks that are not powers of two dividing a block, or exponents that could overflow, are ConfigErrors."""
    for bad in ({"chunk_size": 48}, {"chunk_size": 128}, {"max_log_decay": 2.0}, {"qk_scale": 100.0}):
        with pytest.raises(ConfigError):
            ReferenceConfig(**bad)
