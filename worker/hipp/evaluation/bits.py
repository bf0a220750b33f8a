"""Per-question outcomes packed as bits (base64), torch-free so the task modules and their loaders stay light.

A task metric keeps one bit per question next to its counts (``per_question``); ``evaluation.intervals`` turns
them into bootstrap intervals.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence


def pack_bits(bits: Sequence[bool]) -> str:
    """``bits`` as base64 of their packed bytes (first question in the high bit of the first byte)."""
    data = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            data[i // 8] |= 0x80 >> (i % 8)
    return base64.b64encode(bytes(data)).decode()


def unpack_bits(text: str, n: int) -> list[bool]:
    """The ``n`` bits :func:`pack_bits` wrote."""
    data = base64.b64decode(text)
    if len(data) * 8 < n:
        raise ValueError(f"{n} outcomes asked for, {len(data) * 8} stored")
    return [bool(data[i // 8] & (0x80 >> (i % 8))) for i in range(n)]
