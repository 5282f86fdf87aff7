"""The exact KV index: which replica holds which prefix block.

Plain Python, no engine import. Replicas send the KV events of their block
pool in batches, one batch per report, numbered by a per-replica sequence
number `seq` that starts at 0 when the replica starts and grows by one per
report (also for a report with no events). Hashes are the engine's own
32-byte chained SHA-256 digests, so a hash names a whole prefix: if a replica
holds hash `h_i` it held every block before it when `h_i` was stored. The
index is then two maps, hash -> replicas and replica -> hashes, and the
longest cached prefix of a request is found by walking its hashes until the
first miss, exactly as the engine's `get_computed_blocks` does.

Wire format of one event (what crosses the replica -> scheduler border):

    ("stored", (hash, hash, ...))    blocks now reusable under these hashes
    ("removed", (hash, hash, ...))   blocks evicted; these hashes no longer hit

a plain `(kind, tuple[bytes, ...])` tuple: cheap to pickle through Ray and
free of any engine class. `to_wire()` also accepts the engine's own
`BlockStored` / `BlockRemoved` dataclasses (by duck typing: an object with
`block_hashes` and `parent_hash` is a store, one with `block_hashes` only a
removal), so a replica may send `engine.take_kv_events()` as is.

Gaps: a report whose `seq` is not the next one expected (a lost report, a
replica the index has never seen at `seq > 0`, a restarted scheduler) makes
the replica's entries untrustworthy. The index then drops them, marks the
replica stale and asks for a snapshot (`replace_replica(replica_id,
all_hashes, seq)`): every hash the replica caches as of report `seq`.
Batches that arrive while the snapshot is on its way are kept and replayed
after it. A stale replica scores no hits, it is never wrong.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Iterable, NewType, Sequence

BlockHash = NewType("BlockHash", bytes)
ReplicaId = NewType("ReplicaId", str)

STORED = "stored"
REMOVED = "removed"
# (kind, hashes): kind is STORED or REMOVED.
WireEvent = tuple[str, tuple[bytes, ...]]


def to_wire(event: Any) -> WireEvent:
    """One event in the wire format; accepts wire tuples and the engine's dataclasses."""
    if isinstance(event, tuple) and len(event) == 2 and event[0] in (STORED, REMOVED):
        return event[0], tuple(event[1])
    hashes = getattr(event, "block_hashes", None)
    if hashes is None:
        raise ValueError(
            f"expected a KV event: ('stored'|'removed', hashes) or an object with block_hashes, got {event!r}"
        )
    kind = STORED if hasattr(event, "parent_hash") else REMOVED
    return kind, tuple(hashes)


class ApplyResult(enum.Enum):
    """What `KVIndex.apply` did with a batch."""

    APPLIED = "applied"
    # seq already applied (a retried report): ignored.
    DUPLICATE = "duplicate"
    # Stale: a snapshot is needed and is requested now (send `replace_replica`).
    RESYNC = "resync"
    # Stale and a snapshot was requested recently: the batch is kept for replay.
    STALE = "stale"


@dataclass(slots=True)
class _ReplicaEntry:
    """The index's view of one replica."""

    # This replica's bit in the holder masks.
    bit: int
    hashes: set[BlockHash] = field(default_factory=set)
    # The seq the next batch must carry.
    next_seq: int = 0
    stale: bool = False
    # When the last snapshot was requested (clock seconds); None when none is pending.
    resync_requested_at: float | None = None
    # Batches received while stale, by seq, replayed after the snapshot.
    buffered: dict[int, tuple[WireEvent, ...]] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class IndexStats:
    """Counts for metrics and tests."""

    # Distinct hashes held by at least one replica.
    num_hashes: int
    # Hashes per replica.
    blocks_per_replica: dict[str, int]
    stale_replicas: tuple[str, ...]
    # Batches that revealed a gap since the index was created.
    num_gaps: int


class KVIndex:
    """Exact map of cached prefix blocks across replicas.

    Args:
        resync_retry_s: a stale replica is asked again for its snapshot after
            this many seconds without one.
        max_buffered: batches kept per stale replica for replay; older ones are
            dropped (the replay then finds a gap and asks again).
    """

    def __init__(self, resync_retry_s: float = 5.0, max_buffered: int = 256):
        self.resync_retry_s = resync_retry_s
        self.max_buffered = max_buffered
        # Hash -> bitmask of the replicas holding it. NOTE: ints, not sets: a
        # dict of bytes -> int is invisible to Python's cyclic GC, whose full
        # collections would otherwise walk a million holder sets (ms pauses).
        self._holders: dict[BlockHash, int] = {}
        self._replicas: dict[ReplicaId, _ReplicaEntry] = {}
        # Bit -> replica; freed bits are reused.
        self._by_bit: dict[int, ReplicaId] = {}
        self._free_bits: list[int] = []
        self._num_gaps = 0

    def _entry(self, rid: ReplicaId) -> _ReplicaEntry:
        entry = self._replicas.get(rid)
        if entry is None:
            bit = self._free_bits.pop() if self._free_bits else len(self._by_bit)
            entry = self._replicas[rid] = _ReplicaEntry(bit)
            self._by_bit[bit] = rid
        return entry

    # ---- updates -----------------------------------------------------------

    def apply(self, replica_id: str, seq: int, events: Iterable[Any], now: float) -> ApplyResult:
        """Apply one report's batch of events (oldest first)."""
        rid = ReplicaId(replica_id)
        entry = self._entry(rid)
        if entry.stale:
            self._buffer(entry, seq, events)
            return self._ask_resync(entry, now)
        if seq < entry.next_seq:
            return ApplyResult.DUPLICATE
        if seq > entry.next_seq:
            self._num_gaps += 1
            self._clear(rid, entry)
            entry.stale = True
            self._buffer(entry, seq, events)
            return self._ask_resync(entry, now)
        self._apply_batch(rid, entry, [to_wire(e) for e in events])
        entry.next_seq = seq + 1
        return ApplyResult.APPLIED

    def replace_replica(self, replica_id: str, all_hashes: Iterable[bytes], seq: int) -> ApplyResult:
        """Install a full snapshot: every hash the replica caches as of report `seq`.

        Buffered batches after `seq` are replayed; if they leave a gap the
        replica stays stale (the next report asks for a snapshot again).
        """
        rid = ReplicaId(replica_id)
        entry = self._entry(rid)
        self._clear(rid, entry)
        self._apply_batch(rid, entry, [(STORED, tuple(all_hashes))])
        entry.stale = False
        entry.resync_requested_at = None
        entry.next_seq = seq + 1
        buffered, entry.buffered = entry.buffered, {}
        for s in sorted(k for k in buffered if k > seq):
            if s != entry.next_seq:
                self._num_gaps += 1
                self._clear(rid, entry)
                entry.stale = True
                entry.buffered = {k: v for k, v in buffered.items() if k >= s}
                return ApplyResult.STALE
            self._apply_batch(rid, entry, list(buffered[s]))
            entry.next_seq = s + 1
        return ApplyResult.APPLIED

    def remove_replica(self, replica_id: str) -> None:
        """Forget a replica (it left the cluster)."""
        rid = ReplicaId(replica_id)
        entry = self._replicas.pop(rid, None)
        if entry is not None:
            self._clear(rid, entry)
            del self._by_bit[entry.bit]
            self._free_bits.append(entry.bit)

    def _apply_batch(self, rid: ReplicaId, entry: _ReplicaEntry, events: Sequence[WireEvent]) -> None:
        mask = 1 << entry.bit
        holders = self._holders
        for kind, hashes in events:
            if kind == STORED:
                for h in hashes:
                    entry.hashes.add(h)
                    holders[h] = holders.get(h, 0) | mask
            elif kind == REMOVED:
                for h in hashes:
                    entry.hashes.discard(h)
                    held = holders.get(h, 0) & ~mask
                    if held:
                        holders[h] = held
                    else:
                        holders.pop(h, None)
            else:
                raise ValueError(f"unknown KV event kind {kind!r}; expected {STORED!r} or {REMOVED!r}")

    def _clear(self, rid: ReplicaId, entry: _ReplicaEntry) -> None:
        keep = ~(1 << entry.bit)
        holders = self._holders
        for h in entry.hashes:
            held = holders[h] & keep
            if held:
                holders[h] = held
            else:
                del holders[h]
        entry.hashes = set()

    def _buffer(self, entry: _ReplicaEntry, seq: int, events: Iterable[Any]) -> None:
        entry.buffered[seq] = tuple(to_wire(e) for e in events)
        while len(entry.buffered) > self.max_buffered:
            del entry.buffered[min(entry.buffered)]

    def _ask_resync(self, entry: _ReplicaEntry, now: float) -> ApplyResult:
        asked = entry.resync_requested_at
        if asked is not None and now - asked < self.resync_retry_s:
            return ApplyResult.STALE
        entry.resync_requested_at = now
        return ApplyResult.RESYNC

    # ---- queries -----------------------------------------------------------

    def match(self, block_hashes: Sequence[bytes], replica_id: str) -> int:
        """Number of leading hashes cached on one replica: O(prefix length)."""
        entry = self._replicas.get(ReplicaId(replica_id))
        if entry is None:
            return 0
        held = entry.hashes
        n = 0
        for h in block_hashes:
            if h not in held:
                break
            n += 1
        return n

    def matches(self, block_hashes: Sequence[bytes]) -> dict[str, int]:
        """Leading hashes cached, per replica with at least one hit.

        One walk down the hash list, and-ing the holder masks: O(prefix
        length), plus the replicas dropped along the way.
        """
        result: dict[str, int] = {}
        holders = self._holders
        active = -1  # all bits
        depth = 0
        for h in block_hashes:
            held = active & holders.get(h, 0)
            if held != active:
                if depth:
                    self._record(active & ~held, depth, result)
                if not held:
                    return result
                active = held
            depth += 1
        if depth:
            self._record(active, depth, result)
        return result

    def _record(self, mask: int, depth: int, result: dict[str, int]) -> None:
        while mask:
            low = mask & -mask
            result[self._by_bit[low.bit_length() - 1]] = depth
            mask ^= low

    def is_stale(self, replica_id: str) -> bool:
        entry = self._replicas.get(ReplicaId(replica_id))
        return entry is not None and entry.stale

    def replicas(self) -> list[str]:
        return list(self._replicas)

    def hashes_of(self, replica_id: str) -> frozenset[bytes]:
        """A copy of one replica's hashes (tests, debugging)."""
        entry = self._replicas.get(ReplicaId(replica_id))
        return frozenset(entry.hashes) if entry else frozenset()

    def block_count(self, replica_id: str) -> int:
        """Hashes held by one replica (0 if unknown)."""
        entry = self._replicas.get(replica_id)
        return len(entry.hashes) if entry else 0

    def block_counts(self) -> dict[str, int]:
        """Hashes held per replica (its cache's occupancy as the index sees it)."""
        return {rid: len(e.hashes) for rid, e in self._replicas.items()}

    def stats(self) -> IndexStats:
        return IndexStats(
            num_hashes=len(self._holders),
            blocks_per_replica=self.block_counts(),
            stale_replicas=tuple(rid for rid, e in self._replicas.items() if e.stale),
            num_gaps=self._num_gaps,
        )



def common_prefix_blocks(a: Sequence[bytes], b: Sequence[bytes]) -> int:
    """Leading blocks two chained hash lists share.

    A chained hash names its whole prefix, so `a[i] == b[i]` implies every
    block before it matches too: a binary search on one element finds the
    answer in O(log n) compares.
    """
    lo, hi = 0, min(len(a), len(b))  # a[:lo] matches; a[:hi + 1] cannot
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class RunningPrompts:
    """The prompts of requests bound to each replica and not finished, by first block.

    A request's prompt blocks sit in its replica's cache from its first step
    until it finishes, but the index hears of them only once the replica
    reports them stored, after the prefill. `matches` gives, per replica, the
    leading blocks of a prompt that a running request there holds, so that
    requests arriving during a long prefill of a shared context follow it.
    """

    def __init__(self) -> None:
        # First block hash -> replica -> the hash lists of its running prompts.
        self._by_first: dict[bytes, dict[str, list[Sequence[bytes]]]] = {}

    def hold(self, replica_id: str, block_hashes: Sequence[bytes]) -> None:
        if block_hashes:
            self._by_first.setdefault(block_hashes[0], {}).setdefault(replica_id, []).append(block_hashes)

    def release(self, replica_id: str, block_hashes: Sequence[bytes]) -> None:
        """Forget one `hold` of these hashes (the request finished)."""
        if not block_hashes:
            return
        by_replica = self._by_first.get(block_hashes[0], {})
        prompts = by_replica.get(replica_id)
        if prompts is None:
            return
        prompts.remove(block_hashes)
        if not prompts:
            del by_replica[replica_id]
            if not by_replica:
                del self._by_first[block_hashes[0]]

    def matches(self, block_hashes: Sequence[bytes]) -> dict[str, int]:
        """Leading blocks of `block_hashes` held by a running prompt, per replica with one."""
        if not block_hashes:
            return {}
        return {
            rid: max(common_prefix_blocks(p, block_hashes) for p in prompts)
            for rid, prompts in self._by_first.get(block_hashes[0], {}).items()
        }

    def forget_replica(self, replica_id: str) -> None:
        for first in [f for f, by_replica in self._by_first.items() if replica_id in by_replica]:
            del self._by_first[first][replica_id]
            if not self._by_first[first]:
                del self._by_first[first]
