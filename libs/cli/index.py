"""``prfaas index lookup``: where does a prompt's prefix live (per site and instance)?"""

from __future__ import annotations

import argparse
import asyncio
import json

from libs.common.errors import BadRequest
from libs.common.hashing import DEFAULT_BLOCK_SIZE, hash_list


def add_parser(subparsers) -> None:
    """Register ``index lookup``."""
    index = subparsers.add_parser("index", description="Query the KV index: where a prompt's prefix is cached.")
    verbs = index.add_subparsers(dest="verb", required=True, metavar="VERB")
    lookup = verbs.add_parser("lookup", help="print, as JSON, the usable prefix per site and instance for a prompt")
    lookup.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS URL of any site (default %(default)s)")
    prompt = lookup.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--text", help="prompt text (tokenized with the reference byte-level tokenizer, BOS first)")
    prompt.add_argument("--tokens", help="comma-separated token ids, e.g. 1,2,3")
    lookup.add_argument(
        "--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per block (default %(default)s)"
    )
    lookup.add_argument("--sites", help="comma-separated sites to include (default: all)")
    lookup.add_argument(
        "--no-hybrid", action="store_true", help="pure attention model: ignore linear_state checkpoints"
    )
    lookup.add_argument("--timeout-s", type=float, default=2.0, help="deadline for the answer (default %(default)s)")
    lookup.set_defaults(func=run_lookup)


def parse_tokens(text: str) -> list[int]:
    """Token ids from ``1,2,3``; a clear error otherwise."""
    try:
        tokens = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise BadRequest(f"--tokens must be comma-separated integers, got {text!r}") from None
    if not tokens or any(t < 0 or t >= 2**32 for t in tokens):
        raise BadRequest("--tokens needs at least one id, each in [0, 2**32)")
    return tokens


def run_lookup(args: argparse.Namespace) -> int:
    """Hash the prompt, ask the index, print JSON."""
    import msgspec  # the NATS client and the index's messages are imported only when a lookup runs

    from libs.common.bus import connect
    from libs.engine.tokenizer import ByteTokenizer
    from services.kv_index.client import KvIndexClient

    if args.block_size <= 0:
        raise BadRequest(f"--block-size must be positive, got {args.block_size}")
    if not args.timeout_s > 0:
        raise BadRequest(f"--timeout-s must be positive, got {args.timeout_s}")
    tokens = ByteTokenizer().encode(args.text) if args.text is not None else parse_tokens(args.tokens)
    hashes = hash_list(tokens, args.block_size)
    sites = [s for s in args.sites.split(",") if s] if args.sites else None

    async def ask():
        nc = await connect(args.nats, name="prfaas-cli", connect_timeout_s=args.timeout_s)
        try:
            return await KvIndexClient(nc, args.timeout_s).lookup(hashes, hybrid=not args.no_hybrid, sites=sites)
        finally:
            await nc.close()

    reply = asyncio.run(ask())
    out = {
        "tokens": len(tokens),
        "block_size": args.block_size,
        "blocks_total": reply.blocks_total,
        "sites": msgspec.to_builtins(reply.sites),
        "instances": msgspec.to_builtins(reply.instances),
    }
    for row in out["sites"] + out["instances"]:
        row["usable_tokens"] = row["usable_blocks"] * args.block_size
    print(json.dumps(out, indent=2))
    return 0
