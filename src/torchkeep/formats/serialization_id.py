"""torch's ``.data/serialization_id``: 40 digits derived from record names and CRC-32s.

torch never checks it; torchkeep computes it the way torch's C++ writer does so that a
file torchkeep writes can be byte-identical to ``torch.save``'s. The name hash iterates
a libstdc++ ``std::unordered_set<std::string>``, whose order this module simulates
(bucket growth by libstdc++'s prime rehash policy, MurmurHash64A-style string hash).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Iterable

__all__ = ["serialization_id"]

_MASK = (1 << 64) - 1
_MUL = 0xC6A4A7935BD1E995
_SEED = 0xC70F6907

# libstdc++'s __prime_list from its 7th entry on (what _M_next_bkt searches), 64-bit.
_PRIMES = (
    17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97, 103, 109, 113,
    127, 137, 139, 149, 157, 167, 179, 193, 199, 211, 227, 241, 257, 277, 293, 313, 337, 359,
    383, 409, 439, 467, 503, 541, 577, 619, 661, 709, 761, 823, 887, 953, 1031, 1109, 1193,
    1289, 1381, 1493, 1613, 1741, 1879, 2029, 2179, 2357, 2549, 2753, 2971, 3209, 3469, 3739,
    4027, 4349, 4703, 5087, 5503, 5953, 6427, 6949, 7517, 8123, 8783, 9497, 10273, 11113,
    12011, 12983, 14033, 15173, 16411, 17749, 19183, 20753, 22447, 24281, 26267, 28411, 30727,
    33223, 35933, 38873, 42043, 45481, 49201, 53201, 57557, 62233, 67307, 72817, 78779, 85229,
    92203, 99733, 107897, 116731, 126271, 136607, 147793, 159871, 172933, 187091, 202409,
    218971, 236897, 256279, 277261, 299951, 324503, 351061, 379787, 410857, 444487, 480881,
    520241, 562841, 608903, 658753, 712697, 771049, 834181, 902483, 976369, 1056323, 1142821,
    1236397, 1337629, 1447153, 1565659, 1693859, 1832561, 1982627, 2144977, 2320627, 2510653,
    2716249, 2938679, 3179303, 3439651, 3721303, 4026031, 4355707, 4712381, 5098259, 5515729,
    5967347, 6456007, 6984629, 7556579, 8175383, 8844859, 9569143, 10352717, 11200489,
    12117689, 13109983, 14183539, 15345007, 16601593, 17961079, 19431899, 21023161, 22744717,
    24607243, 26622317, 28802401, 31160981, 33712729, 36473443, 39460231, 42691603, 46187573,
    49969847, 54061849, 58488943, 63278561, 68460391, 74066549, 80131819, 86693767, 93793069,
)
_FAST_BUCKETS = (2, 2, 2, 3, 5, 5, 7, 7, 11, 11, 11, 11, 13, 13)


def _shift_mix(v: int) -> int:
    return v ^ (v >> 47)


@functools.lru_cache(maxsize=1 << 20)
def cached_string_hash(data: bytes) -> int:
    """``string_hash`` remembered per name (record names repeat from save to save)."""
    return string_hash(data)


def string_hash(data: bytes) -> int:
    """libstdc++'s ``std::hash<std::string>`` on 64-bit (``_Hash_bytes``, seed 0xc70f6907)."""
    n = len(data)
    h = (_SEED ^ (n * _MUL)) & _MASK
    aligned = n & ~7
    for i in range(0, aligned, 8):
        word = int.from_bytes(data[i : i + 8], "little")
        h ^= (_shift_mix((word * _MUL) & _MASK) * _MUL) & _MASK
        h = (h * _MUL) & _MASK
    if n & 7:
        h ^= int.from_bytes(data[aligned:], "little")
        h = (h * _MUL) & _MASK
    h = (_shift_mix(h) * _MUL) & _MASK
    return _shift_mix(h)


def hash_combine(seed: int, value: int) -> int:
    """c10's ``hash_combine`` on 64-bit unsigned values."""
    return (seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & _MASK)) & _MASK


class _Policy:
    """libstdc++'s _Prime_rehash_policy with max_load_factor 1."""

    def __init__(self) -> None:
        self.next_resize = 0

    def next_bucket(self, n: int) -> int:
        if n < len(_FAST_BUCKETS):
            if n == 0:
                return 1
            self.next_resize = _FAST_BUCKETS[n]
            return _FAST_BUCKETS[n]
        i = bisect.bisect_left(_PRIMES, n)
        if i >= len(_PRIMES):
            raise ValueError("too many records to simulate the serialization id")
        self.next_resize = _PRIMES[i]
        return _PRIMES[i]

    def need_rehash(self, buckets: int, elements: int, inserting: int) -> int | None:
        if elements + inserting > self.next_resize:
            min_buckets = max(elements + inserting, 0 if self.next_resize else 11)
            if min_buckets >= buckets:
                return self.next_bucket(max(math.floor(min_buckets) + 1, buckets * 2))
            self.next_resize = buckets
        return None


def _unordered_set_order(hashes: list[int]) -> list[int]:
    """Indices of ``hashes`` in the iteration order of a libstdc++ unordered_set."""
    head = -1  # the "before begin" sentinel
    nxt: dict[int, int | None] = {head: None}
    buckets: dict[int, int] = {}  # bucket -> node before the bucket's first node
    n_buckets = 1
    policy = _Policy()

    def insert_node(node: int, bucket: int, table: dict[int, int], count: int) -> None:
        before = table.get(bucket)
        if before is not None:
            nxt[node] = nxt[before]
            nxt[before] = node
            return
        first = nxt[head]
        nxt[node] = first
        nxt[head] = node
        if first is not None:
            table[hashes[first] % count] = node
        table[bucket] = head

    for index, value in enumerate(hashes):
        grow = policy.need_rehash(n_buckets, index, 1)
        if grow is not None:
            order = []
            node = nxt[head]
            while node is not None:
                order.append(node)
                node = nxt[node]
            nxt = {head: None}
            buckets = {}
            for node in order:
                insert_node(node, hashes[node] % grow, buckets, grow)
            n_buckets = grow
        insert_node(index, value % n_buckets, buckets, n_buckets)

    result = []
    node = nxt[head]
    while node is not None:
        result.append(node)
        node = nxt[node]
    return result


def serialization_id(names: Iterable[str], crcs: Iterable[int]) -> str:
    """The 40-digit id for records ``names`` (write order) with non-empty-record ``crcs``."""
    names = list(names)
    hashes = [cached_string_hash(name.encode("utf-8")) for name in names]
    name_hash = 0
    for i in _unordered_set_order(hashes):
        name_hash = hash_combine(name_hash, hashes[i])
    crc_hash = 0
    for crc in crcs:
        crc_hash = hash_combine(crc_hash, crc)
    return f"{name_hash:020d}{crc_hash:020d}"
