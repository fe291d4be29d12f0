"""Which shard a content hash belongs to: stable as items are added, the same in every stage."""

from __future__ import annotations


def shard_of(sha256: str, shards: int) -> int:
    """The shard of a hex digest: its first 48 bits modulo ``shards``."""
    return int(sha256[:12], 16) % shards
