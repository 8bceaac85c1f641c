"""The memory tier's value digest (docs/memory-tier.md, "Verification"): what a snapshot's
manifest records over `values.bin` then `strings.bin`, and what a restore recomputes.

xxh3_128: ~8x less CPU than zlib's CRC32 here, which was the largest part of a snapshot's CPU.
The manifest names the algorithm (`xxh3_128:<hex>`), so snapshots digested with CRC32 before it
still verify.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import xxhash

DIGEST_ALGO = "xxh3_128"
_CHUNK = 16 << 20


def value_digest(buffers: Iterable[Any], algo: str = DIGEST_ALGO) -> str:
    """The digest of the buffers in turn, as `ALGO:<hex>`; chunked, so the step loop gets the
    GIL between chunks. `algo` is the manifest's, to verify a snapshot written with another."""
    if algo == "crc32":
        crc = 0
        for view in _chunks(buffers):
            crc = zlib.crc32(view, crc)
        return f"crc32:{crc:08x}"
    if algo != "xxh3_128":
        raise ValueError(f"unknown value digest algorithm {algo!r}")
    h = value_hasher()
    for view in _chunks(buffers):
        h.update(view)
    return sealed(h)


def value_hasher() -> xxhash.xxh3_128:
    """A streaming value digest (DIGEST_ALGO), for a writer that digests as it copies."""
    return xxhash.xxh3_128()


def sealed(hasher: xxhash.xxh3_128) -> str:
    return f"{DIGEST_ALGO}:{hasher.hexdigest()}"


def _chunks(buffers: Iterable[Any]) -> Iterator[memoryview]:
    for buf in buffers:
        view = memoryview(buf).cast("B")
        for i in range(0, len(view), _CHUNK):
            yield view[i : i + _CHUNK]
