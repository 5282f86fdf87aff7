"""A replica's load as a record (`ReplicaLoad`) and every replica's as columns (`ReplicaTable`).

Plain numpy, no torch or Ray. The scheduler keeps one table current as loads
change (a report, a binding, a finish), so that a placement decision scores
every replica with a few array operations instead of a Python loop over
replicas: the decision costs about the same at 4 replicas as at 256.

The columns carry `ReplicaLoad`'s field names, so the placement formulas
(`cluster.placement.can_start`, `KVAwarePolicy.costs`) read one `ReplicaLoad`
or a whole table alike. Rows keep the order replicas joined in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np


@dataclass(slots=True, frozen=True)
class ReplicaLoad:
    """A replica's load as it reports it (deployments/replica.py: `ModelReplica.routing_load`)."""

    # Requests in the running batch.
    num_running: int
    # Requests queued inside the replica (it could not start them yet).
    num_waiting: int
    # KV blocks that can be handed out now (cached free blocks included).
    num_free_blocks: int
    # KV blocks in the pool.
    num_blocks: int
    # Prompt tokens admitted but not computed yet (the prefill backlog).
    num_tokens_in_flight: int = 0
    # Batch slots.
    max_num_seqs: int = 128
    # Tokens one engine step computes at most (its max_num_batched_tokens; 0: not reported).
    # Requests whose prompts fit in the next step's budget may queue there (`can_start`).
    max_step_tokens: int = 0

    @property
    def active(self) -> int:
        """Requests the replica holds, running or queued."""
        return self.num_running + self.num_waiting

    def with_pending(self, num_requests: int, num_blocks: int, num_tokens: int) -> "ReplicaLoad":
        """This load plus bindings the replica has not reported yet."""
        if not num_requests:
            return self
        return ReplicaLoad(
            self.num_running + num_requests,
            self.num_waiting,
            self.num_free_blocks - num_blocks,
            self.num_blocks,
            self.num_tokens_in_flight + num_tokens,
            self.max_num_seqs,
            self.max_step_tokens,
        )


# ReplicaLoad's fields, then the table's own.
LOAD_COLUMNS = (
    "num_running",
    "num_waiting",
    "num_free_blocks",
    "num_blocks",
    "num_tokens_in_flight",
    "max_num_seqs",
    "max_step_tokens",
)
COLUMNS = LOAD_COLUMNS + ("indexed_blocks", "last_report", "active")


class ReplicaTable:
    """Replica loads (plus indexed blocks, last report time, draining) as columns.

    Columns are float64 views of the live rows, named as `ReplicaLoad`'s fields;
    `ids[i]` names row i.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.ids: list[str] = []
        self._rows: dict[str, int] = {}
        self._data = np.zeros((len(COLUMNS), capacity))
        self._draining = np.zeros(capacity, dtype=bool)

    @classmethod
    def of(cls, loads: Iterable[tuple[str, ReplicaLoad, int]]) -> "ReplicaTable":
        """A table of `(replica id, load, indexed blocks)` rows, in that order."""
        table = cls()
        for rid, load, indexed in loads:
            table.set_load(rid, load)
            table.set_indexed(rid, indexed)
        return table

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, replica_id: str) -> bool:
        return replica_id in self._rows

    def row(self, replica_id: str) -> int:
        return self._rows[replica_id]

    @property
    def rows(self) -> Mapping[str, int]:
        """Row of each replica id (read-only use)."""
        return self._rows

    num_running = property(lambda self: self._data[0, : len(self.ids)])
    num_waiting = property(lambda self: self._data[1, : len(self.ids)])
    num_free_blocks = property(lambda self: self._data[2, : len(self.ids)])
    num_blocks = property(lambda self: self._data[3, : len(self.ids)])
    num_tokens_in_flight = property(lambda self: self._data[4, : len(self.ids)])
    max_num_seqs = property(lambda self: self._data[5, : len(self.ids)])
    max_step_tokens = property(lambda self: self._data[6, : len(self.ids)])
    indexed_blocks = property(lambda self: self._data[7, : len(self.ids)])
    last_report = property(lambda self: self._data[8, : len(self.ids)])
    # Requests each replica holds, running or queued (ReplicaLoad.active).
    active = property(lambda self: self._data[9, : len(self.ids)])

    def _row_of(self, replica_id: str) -> int:
        row = self._rows.get(replica_id)
        if row is None:
            row = self._rows[replica_id] = len(self.ids)
            self.ids.append(replica_id)
            if row == self._data.shape[1]:
                self._data = np.concatenate([self._data, np.zeros_like(self._data)], axis=1)
                self._draining = np.concatenate([self._draining, np.zeros_like(self._draining)])
            self._data[:, row] = 0.0
            self._draining[row] = False
        return row

    def set_load(self, replica_id: str, load: ReplicaLoad) -> None:
        """Row `replica_id` (added if new) takes `load`."""
        row = self._row_of(replica_id)
        d = self._data
        d[0, row] = load.num_running
        d[1, row] = load.num_waiting
        d[2, row] = load.num_free_blocks
        d[3, row] = load.num_blocks
        d[4, row] = load.num_tokens_in_flight
        d[5, row] = load.max_num_seqs
        d[6, row] = load.max_step_tokens
        d[9, row] = load.num_running + load.num_waiting

    def set_indexed(self, replica_id: str, num_blocks: int) -> None:
        self._data[7, self._row_of(replica_id)] = num_blocks

    def set_last_report(self, replica_id: str, now: float) -> None:
        self._data[8, self._row_of(replica_id)] = now

    def set_draining(self, replica_id: str, draining: bool) -> None:
        self._draining[self._row_of(replica_id)] = draining

    def load(self, row: int) -> ReplicaLoad:
        """Row `row` as a ReplicaLoad."""
        return ReplicaLoad(*(int(v) for v in self._data[: len(LOAD_COLUMNS), row]))

    def eligible(self, now: float, timeout_s: float) -> np.ndarray:
        """Rows that may get new requests: not draining, reported within `timeout_s`."""
        n = len(self.ids)
        return ~self._draining[:n] & (now - self.last_report <= timeout_s)

    def remove(self, replica_id: str) -> None:
        """Drop a row; later rows move up one, keeping the join order."""
        row = self._rows.pop(replica_id, None)
        if row is None:
            return
        n = len(self.ids)
        self._data[:, row : n - 1] = self._data[:, row + 1 : n]
        self._draining[row : n - 1] = self._draining[row + 1 : n]
        del self.ids[row]
        for rid in self.ids[row:]:
            self._rows[rid] -= 1
