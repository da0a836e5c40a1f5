"""Packed metadata (broker/index/packing.py): what is packed unpacks to the same bytes, whatever
its size, and a small instance's metadata stays as small as deflate's defaults make it (the
index's size per instance is a target of its own)."""

from __future__ import annotations

import random
import zlib

import orjson
import pytest

from broker.index.packing import pack_metadata, unpack_metadata


def _metadata(n_elements: int, seed: int) -> bytes:
    rng = random.Random(seed)
    attrs = {
        f"{0x00100000 + 2 * k:08X}": {"vr": "LO", "Value": [f"VALUE {rng.randrange(10**6)} OF ELEMENT {k}"]}
        for k in range(n_elements)
    }
    return orjson.dumps(attrs)


@pytest.mark.parametrize("n_elements", [0, 1, 60, 400, 4000], ids=lambda n: f"{n}-elements")
def test_packed_metadata_unpacks_to_the_same_bytes(n_elements: int) -> None:
    metadata = _metadata(n_elements, seed=n_elements)
    packed = pack_metadata(metadata)
    assert unpack_metadata(packed) == metadata
    assert unpack_metadata(memoryview(packed)) == metadata


def test_small_metadata_packs_as_small_as_with_deflates_default_memory() -> None:
    metadata = _metadata(60, seed=7)
    assert len(metadata) < 16384
    default = zlib.compressobj(6, zlib.DEFLATED, -15)
    as_default = default.compress(metadata) + default.flush()
    assert len(pack_metadata(metadata)) <= len(as_default) + 1 + 8  # format byte, a few bytes of slack
