"""Placement: which replica starts a request, given each replica's load and cache.

Plain Python and numpy, no clock reads: the caller passes how long the
request has waited. A policy sees each live replica's load (plus bindings the
replica has not reported yet), its exact cached prefix for this request, and
whether it can start the request now, and picks one. The scheduler hands these
over as columns (a `ReplicaTable` and arrays, `start_columns`), which
`kv_aware` scores all at once, so a decision costs about the same at 256
replicas as at 4; `choose` takes the same as a list of `ReplicaView`s.

Policies, selectable by name (`make_policy`):

- `round_robin`: the next replica in id order that can start the request.
- `pow2`: power of two choices, Serve's default: two random replicas that can
  start it, the one with fewer active requests wins.
- `prefix_approx`: SGLang's cache-aware router. A character radix tree per
  replica of the prompt texts routed there (one shared tree, nodes tagged with
  the replicas that hold them, LRU-evicted to `max_tree_chars` per replica).
  If the cluster is imbalanced (max active - min active > `balance_abs` and
  max > `balance_rel` * min) the least active replica wins. Otherwise the
  replica whose tree matches the longest prefix of the text wins if the match
  covers more than `cache_threshold` of the text (the request waits in the
  global queue while that replica is full, as it would queue at an SGLang
  worker), else the replica with the smallest tree (the most room). The text
  is inserted into the winner's tree.
- `kv_aware` (the default): exact. The cost of a replica is the time-to-first
  token in prefill-token units:

      cost = (prompt tokens - cached prefix tokens)      # what it must prefill
           + backlog_weight * prefill tokens queued there  # before ours
           + decode_weight * active requests               # decodes sharing each step
           + eviction_weight * tokens of others' cache it would evict
           + occupancy_weight * share of its pool indexed * prompt tokens
           + duplicate_weight * prefix tokens another replica holds and it lacks

  and the lowest cost wins (ties: fewer blocks indexed, then id). The
  duplicate term is what a recompute costs the cluster beyond this request's
  TTFT: a second copy of a context takes KV blocks (evicting some other
  tenant's) and a core's time. Without it, a request whose context is being
  prefilled on a busy replica recomputes it on an idle one whenever that is
  a few tokens faster, and near capacity the copies evict each other. The
  occupancy term spreads new prefixes over the cluster's caches: a prompt
  whose cached prefix is short (a chat template's first block, say) goes to
  the emptier replica rather than fill the one that matches a few tokens and
  later evict contexts there; a match covering more than
  `occupancy_weight` of the prompt always outweighs it. Guard: a
  replica whose active count exceeds the least active replica's by more than
  `balance_abs` and by a factor `balance_rel` is skipped (unless no other
  replica can start the request), so a hot prefix spreads to the next best
  replica instead of piling up; that replica then caches it too. Affinity
  wait: when the best replica overall holds more of the prompt than the best
  one that can start it now, cannot start it itself, and would save at least
  `affinity_min_saving` tokens, the request waits in the global queue for up
  to `affinity_wait_s` rather than recompute its prefix elsewhere. The
  default, 5 s, is about what recomputing a few thousand tokens costs a CPU
  replica; on GPUs, where that takes tens of milliseconds, set it lower.

Feasibility ("can start now") is mechanism: a free batch slot (active <
max_num_seqs, and either at most `max_replica_waiting` requests queued there
or the prompt tokens queued there plus this prompt's fit in the replica's
next engine step) and, for
`kv_aware`, free KV blocks for the uncached part of the prompt plus one
generated token, above a small watermark. The KV-blind policies know nothing
of blocks, as Serve's and SGLang's routers do not: a free slot is enough and
the replica's engine queues what it has no blocks for. Batch work is held to
a utilisation ceiling (`StartLimits.max_seq_util`, `max_kv_util`).
"""

from __future__ import annotations

import enum
import heapq
import random
from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import numpy as np

from shardline.cluster.kv_index import BlockHash
from shardline.cluster.replica_load import ReplicaLoad, ReplicaTable


class Priority(str, enum.Enum):
    """Interactive requests go first; batch requests take only idle capacity."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


@dataclass(slots=True, frozen=True)
class RouteRequest:
    """What the scheduler needs to know about a request; the ingress builds it.

    NOTE: `block_hashes` come from the engine's `hash_prompt_blocks(token_ids,
    block_size, extra_keys)` with the tenant's salt from the server's tenant
    record in `extra_keys`, so they equal the replica's hashes bit for bit.
    """

    request_id: str
    tenant_id: str
    # Hashes of the prompt's full blocks, chained from the root.
    block_hashes: tuple[BlockHash, ...]
    block_size: int
    num_prompt_tokens: int
    # Generation budget (fair-share cost; 0 when unknown).
    max_tokens: int = 0
    priority: Priority = Priority.INTERACTIVE
    # The rendered prompt text, for `prefix_approx` only.
    prompt_text: str = ""

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.num_prompt_tokens < 0 or self.max_tokens < 0:
            raise ValueError(
                f"request {self.request_id!r}: block_size must be positive and token counts non-negative, "
                f"got block_size={self.block_size}, num_prompt_tokens={self.num_prompt_tokens}, "
                f"max_tokens={self.max_tokens}"
            )
        if len(self.block_hashes) > self.num_prompt_tokens // self.block_size:
            raise ValueError(
                f"request {self.request_id!r}: {len(self.block_hashes)} block hashes for a prompt of "
                f"{self.num_prompt_tokens} tokens in blocks of {self.block_size}"
            )


@dataclass(slots=True, frozen=True)
class StartLimits:
    """When a replica counts as able to start a request now."""

    # Requests a replica may hold in its own queue (0: bind only to a free slot)
    # beyond those its next step can take anyway (see `can_start`).
    # One: a request that reached the replica during a step shows as waiting
    # until the next step admits it; at 0 that replica took nothing new for a
    # whole (one-second) prefill step, and its tenants' requests recomputed
    # their contexts elsewhere.
    max_replica_waiting: int = 1
    # Fraction of the pool kept free after the prompt's blocks are taken.
    kv_watermark: float = 0.01
    # Ceilings for this class of work (batch work: below 1).
    max_seq_util: float = 1.0
    max_kv_util: float = 1.0


@dataclass(slots=True)
class ReplicaView:
    """One replica as a policy sees it for one request."""

    replica_id: str
    # Reported load plus bindings not yet reported.
    load: ReplicaLoad
    # Leading prompt blocks cached there (exact index, capped as the engine caps hits).
    cached_blocks: int
    # Whether it can start the request now (see `can_start`).
    can_start: bool
    # Blocks the index holds for this replica (its cache's occupancy).
    indexed_blocks: int = 0


def usable_cached_blocks(num_prompt_tokens: int, block_size: int, matched_blocks):
    """Cached blocks the engine would reuse: at least one prompt token is always computed.

    `matched_blocks` is an int, or an array with one count per row (then an array).
    """
    cap = max(0, (num_prompt_tokens - 1) // block_size)
    if isinstance(matched_blocks, np.ndarray):
        return np.clip(matched_blocks, 0, cap)
    return max(0, min(matched_blocks, cap))


def blocks_needed(num_prompt_tokens: int, block_size: int, cached_blocks: int) -> int:
    """New blocks to start a request: its prompt plus one generated token, minus hits.

    NOTE: an estimate. A hit on a cached block that is free in the replica
    also leaves the free queue; the index does not know which hits are free.
    """
    return -(-(num_prompt_tokens + 1) // block_size) - cached_blocks


def has_slot(load: ReplicaLoad | ReplicaTable, new_tokens, limits: StartLimits):
    """A free batch slot for a prompt of `new_tokens` uncached tokens.

    Below max_num_seqs, and the replica's queue short: at most
    `max_replica_waiting` requests, or prompts that, with this one, fit in the
    replica's next step (`max_step_tokens`). The engine starts all of those in
    that step, so a burst binds at once and is prefilled together; counting
    requests alone held the third request of a burst in the global queue
    until the replica's next step had begun, and it then waited a whole step
    more at the replica (about three steps to the first token, not two).
    """
    fits_next_step = (load.max_step_tokens > 0) & (load.num_tokens_in_flight + new_tokens <= load.max_step_tokens)
    short_queue = (load.num_waiting <= limits.max_replica_waiting) | fits_next_step
    return short_queue & (load.active < load.max_num_seqs * limits.max_seq_util)


def can_start(load: ReplicaLoad | ReplicaTable, need_blocks, limits: StartLimits, new_tokens=0):
    """A free batch slot (`has_slot`) and enough free KV blocks, within the class's ceilings.

    On a ReplicaTable, with `need_blocks` and `new_tokens` per row, it answers
    for every row at once (a boolean array); on a ReplicaLoad, a bool.
    """
    ok = has_slot(load, new_tokens, limits)
    ok = ok & (load.num_free_blocks - need_blocks >= np.floor(limits.kv_watermark * load.num_blocks))
    if limits.max_kv_util < 1.0:
        ok = ok & (load.num_blocks - load.num_free_blocks + need_blocks <= limits.max_kv_util * load.num_blocks)
    return ok if isinstance(ok, np.ndarray) else bool(ok)


def start_columns(
    request: RouteRequest,
    table: ReplicaTable,
    matches: Mapping[str, int],
    limits: StartLimits,
    check_kv: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `table`: the prompt blocks its cache would serve, and whether it can start `request` now.

    `matches`: leading prompt blocks each replica holds (replicas missing
    from the table are ignored). With `check_kv=False` (the KV-blind
    policies) a free batch slot is enough to start, as with Serve's own
    routing: the replica's engine queues a request it has no blocks for.
    """
    n, bs = request.num_prompt_tokens, request.block_size
    matched = np.zeros(len(table))
    rows = table.rows
    for rid, blocks in matches.items():
        row = rows.get(rid)
        if row is not None:
            matched[row] = blocks
    cached = usable_cached_blocks(n, bs, matched)
    new_tokens = n - cached * bs
    if not check_kv:
        return cached, has_slot(table, new_tokens, limits)
    return cached, can_start(table, blocks_needed(n, bs, cached), limits, new_tokens)


def build_views(
    request: RouteRequest,
    loads: Mapping[str, ReplicaLoad],
    matches: Mapping[str, int],
    limits: StartLimits,
    indexed_blocks: Mapping[str, int] | None = None,
    check_kv: bool = True,
) -> list[ReplicaView]:
    """One view per replica in `loads` (effective loads), in the mapping's order (see `start_columns`)."""
    indexed_blocks = indexed_blocks or {}
    table = ReplicaTable.of((rid, load, indexed_blocks.get(rid, 0)) for rid, load in loads.items())
    cached, start = start_columns(request, table, matches, limits, check_kv)
    return [
        ReplicaView(rid, load, int(cached[i]), bool(start[i]), indexed_blocks.get(rid, 0))
        for i, (rid, load) in enumerate(loads.items())
    ]


def is_overloaded(active: int, min_active: int, balance_abs: float, balance_rel: float) -> bool:
    """SGLang's imbalance test: ahead of the least loaded by an absolute and a relative margin."""
    return active - min_active > balance_abs and active > balance_rel * min_active


class PlacementPolicy:
    """Picks a replica for a request among views; stateful policies learn from `on_placed`."""

    name: ClassVar[str] = ""
    # Whether the policy reads the exact KV index; KV-blind policies bind on a free slot alone.
    uses_kv: ClassVar[bool] = False

    def choose(self, request: RouteRequest, views: Sequence[ReplicaView], waited_s: float = 0.0) -> str | None:
        """A replica that can start `request` now, or None to keep it queued."""
        raise NotImplementedError

    def choose_columns(
        self,
        request: RouteRequest,
        table: ReplicaTable,
        cached: np.ndarray,
        start: np.ndarray,
        eligible: np.ndarray,
        waited_s: float = 0.0,
    ) -> str | None:
        """`choose` over the table's `eligible` rows (the scheduler's call; see `start_columns`)."""
        views = [
            ReplicaView(table.ids[i], table.load(i), int(cached[i]), bool(start[i]), int(table.indexed_blocks[i]))
            for i in np.flatnonzero(eligible).tolist()
        ]
        return self.choose(request, views, waited_s)

    def on_placed(self, request: RouteRequest, replica_id: str) -> None:
        """The scheduler bound `request` to `replica_id`."""

    def remove_replica(self, replica_id: str) -> None:
        """A replica left the cluster."""


class RoundRobinPolicy(PlacementPolicy):
    """The next replica, in id order after the last one chosen, that can start it."""

    name = "round_robin"

    def __init__(self) -> None:
        self._last: str | None = None

    def choose(self, request, views, waited_s=0.0):
        ids = sorted(v.replica_id for v in views if v.can_start)
        if not ids:
            return None
        after = [rid for rid in ids if self._last is None or rid > self._last]
        return (after or ids)[0]

    def on_placed(self, request, replica_id):
        self._last = replica_id


class Pow2Policy(PlacementPolicy):
    """Power of two choices on active requests (Serve's default router).

    Args:
        seed: seeds the policy's own random generator, for reproducible runs.
    """

    name = "pow2"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, request, views, waited_s=0.0):
        startable = [v for v in views if v.can_start]
        if len(startable) <= 1:
            return startable[0].replica_id if startable else None
        a, b = self._rng.sample(startable, 2)
        key = lambda v: (v.load.active, v.load.num_tokens_in_flight)  # noqa: E731
        return (b if key(b) < key(a) else a).replica_id


class KVAwarePolicy(PlacementPolicy):
    """Exact prefix-cache-aware placement (see the module docstring for the cost).

    Args:
        decode_weight: prefill tokens one active request on a replica is worth.
        backlog_weight: weight of the replica's queued prefill tokens.
        eviction_weight: weight of the cached tokens the prompt would evict there.
        occupancy_weight: weight of how full the replica's cache is, per prompt token.
        duplicate_weight: weight of the prefix tokens it would recompute that another replica holds.
        balance_abs, balance_rel: the guard's margins over the least active replica.
        affinity_wait_s: how long a request may wait for the replica holding its prefix.
        affinity_min_saving: prefill tokens the wait must save to be worth it.
    """

    name = "kv_aware"
    uses_kv = True

    def __init__(
        self,
        decode_weight: float = 8.0,
        backlog_weight: float = 1.0,
        eviction_weight: float = 0.5,
        occupancy_weight: float = 0.25,
        duplicate_weight: float = 0.5,
        balance_abs: float = 8,
        balance_rel: float = 1.5,
        affinity_wait_s: float = 5.0,
        affinity_min_saving: int = 256,
    ) -> None:
        self.decode_weight = decode_weight
        self.backlog_weight = backlog_weight
        self.eviction_weight = eviction_weight
        self.occupancy_weight = occupancy_weight
        self.duplicate_weight = duplicate_weight
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.affinity_wait_s = affinity_wait_s
        self.affinity_min_saving = affinity_min_saving

    def costs(
        self, request: RouteRequest, loads: ReplicaLoad | ReplicaTable, cached_blocks, indexed_blocks, best_cached=0
    ):
        """Estimated prefill-token-equivalents before this request's first token, plus what a recompute costs the cluster.

        For one replica (a ReplicaLoad, ints) or every row of a ReplicaTable
        (arrays of cached and indexed blocks per row): one formula for both.
        `best_cached`: the most leading blocks any replica holds.
        """
        bs, n = request.block_size, request.num_prompt_tokens
        num_blocks = loads.num_blocks
        # Scalar factors folded first: on a table every operator below is one pass over the rows.
        uncached = n - bs * cached_blocks
        need = blocks_needed(n, bs, cached_blocks)
        evicted_blocks = np.maximum(0, need - (num_blocks - indexed_blocks))
        occupancy = np.minimum(1.0, indexed_blocks / np.maximum(1, num_blocks))
        return (
            uncached
            + self.backlog_weight * loads.num_tokens_in_flight
            + self.decode_weight * loads.active
            + (self.eviction_weight * bs) * evicted_blocks
            + (self.occupancy_weight * n) * occupancy
            + (self.duplicate_weight * bs) * np.maximum(0, best_cached - cached_blocks)
        )

    def cost(self, request: RouteRequest, view: ReplicaView) -> float:
        """`costs` for one view."""
        return float(self.costs(request, view.load, view.cached_blocks, view.indexed_blocks))

    def choose(self, request, views, waited_s=0.0):
        if not views:
            return None
        table = ReplicaTable.of((v.replica_id, v.load, v.indexed_blocks) for v in views)
        cached = np.array([v.cached_blocks for v in views], dtype=float)
        start = np.array([v.can_start for v in views], dtype=bool)
        return self.choose_columns(request, table, cached, start, np.ones(len(views), dtype=bool), waited_s)

    def choose_columns(self, request, table, cached, start, eligible, waited_s=0.0):
        if not eligible.any():
            return None
        costs = self.costs(request, table, cached, table.indexed_blocks, cached[eligible].max())
        # The guard: a replica is overloaded when its active count exceeds
        # both min + balance_abs and balance_rel * min.
        active = table.active
        min_active = active[eligible].min()
        allowed = eligible & (active <= max(min_active + self.balance_abs, self.balance_rel * min_active))
        start = start & eligible
        best = self._lowest(costs, table, start & allowed)
        if best is None:
            best = self._lowest(costs, table, start)
        if best is None:
            return None
        if waited_s < self.affinity_wait_s and (allowed & ~start).any():
            best_any = self._lowest(costs, table, allowed)
            if (
                best_any is not None
                and not start[best_any]
                and cached[best_any] > cached[best]
                and costs[best] - costs[best_any] >= self.affinity_min_saving
            ):
                return None  # its cache is worth the wait; a mere load difference is not
        return table.ids[best]

    @staticmethod
    def _lowest(costs: np.ndarray, table: ReplicaTable, mask: np.ndarray) -> int | None:
        """The row of lowest cost among `mask`; ties: fewer blocks indexed, then replica id."""
        masked = np.where(mask, costs, np.inf)
        best = int(masked.argmin())
        lowest = masked[best]
        if lowest == np.inf:
            return None
        tied = masked == lowest
        if np.count_nonzero(tied) == 1:
            return best
        tied = np.flatnonzero(tied)
        indexed = table.indexed_blocks[tied]
        tied = tied[indexed == indexed.min()]
        if len(tied) == 1:
            return int(tied[0])
        return min(tied.tolist(), key=table.ids.__getitem__)


class _Node:
    """An edge of the radix tree: `text` leads here from `parent`."""

    __slots__ = ("text", "parent", "children", "replicas")

    def __init__(self, text: str, parent: "_Node | None") -> None:
        self.text = text
        self.parent = parent
        # Children by the first character of their edge.
        self.children: dict[str, _Node] = {}
        # Replica -> tick of its last insert through this node.
        self.replicas: dict[str, int] = {}


class TextPrefixTree:
    """Approximate per-replica cache of prompt texts: one radix tree, nodes tagged by replica.

    NOTE: a replica tagged on a node is tagged on all its ancestors (insert tags
    the whole path; eviction removes a replica from its leaves first).
    """

    def __init__(self) -> None:
        self.root = _Node("", None)
        # Characters held per replica.
        self.sizes: dict[str, int] = {}
        self._tick = 0

    def match(self, text: str) -> dict[str, int]:
        """Characters of `text` matched, per replica with a match."""
        result: dict[str, int] = {}
        node, pos = self.root, 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                break
            common = _common_prefix(child.text, text, pos)
            for rid in child.replicas:
                result[rid] = pos + common
            if common < len(child.text):
                break
            pos += common
            node = child
        return result

    def insert(self, text: str, replica_id: str) -> None:
        """Tag the path of `text` with `replica_id`, splitting edges as needed."""
        self._tick += 1
        tick = self._tick
        node, pos = self.root, 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                child = _Node(text[pos:], node)
                node.children[text[pos]] = child
            else:
                common = _common_prefix(child.text, text, pos)
                if common < len(child.text):
                    child = self._split(child, common)
            if replica_id not in child.replicas:
                self.sizes[replica_id] = self.sizes.get(replica_id, 0) + len(child.text)
            child.replicas[replica_id] = tick
            pos += len(child.text)
            node = child

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut `node`'s edge after `at` characters; return the new upper half."""
        parent = node.parent
        assert parent is not None and 0 < at < len(node.text)
        upper = _Node(node.text[:at], parent)
        upper.replicas = dict(node.replicas)
        parent.children[upper.text[0]] = upper
        node.text = node.text[at:]
        node.parent = upper
        upper.children[node.text[0]] = node
        return upper

    def evict(self, replica_id: str, max_chars: int) -> None:
        """Drop the replica's least recently used leaves until it holds at most `max_chars`."""
        if self.sizes.get(replica_id, 0) <= max_chars:
            return
        heap = [(n.replicas[replica_id], id(n), n) for n in self._nodes_of(replica_id) if self._is_leaf_of(n, replica_id)]
        heapq.heapify(heap)
        while heap and self.sizes[replica_id] > max_chars:
            _, _, node = heapq.heappop(heap)
            del node.replicas[replica_id]
            self.sizes[replica_id] -= len(node.text)
            parent = node.parent
            if not node.replicas and not node.children:
                assert parent is not None
                del parent.children[node.text[0]]
            if parent is not None and parent is not self.root and self._is_leaf_of(parent, replica_id):
                heapq.heappush(heap, (parent.replicas[replica_id], id(parent), parent))

    def remove_replica(self, replica_id: str) -> None:
        self.evict(replica_id, 0)
        self.sizes.pop(replica_id, None)

    def _nodes_of(self, replica_id: str) -> list[_Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            if replica_id in node.replicas:
                out.append(node)
                stack.extend(node.children.values())
        return out

    @staticmethod
    def _is_leaf_of(node: _Node, replica_id: str) -> bool:
        return replica_id in node.replicas and not any(replica_id in c.replicas for c in node.children.values())


def _common_prefix(edge: str, text: str, pos: int) -> int:
    """Length of the common prefix of `edge` and `text[pos:]` (C-speed compares, binary search)."""
    n = min(len(edge), len(text) - pos)
    if text.startswith(edge[:n], pos):
        return n
    lo, hi = 0, n  # edge[:lo] matches, edge[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if text.startswith(edge[:mid], pos):
            lo = mid
        else:
            hi = mid
    return lo


class PrefixApproxPolicy(PlacementPolicy):
    """SGLang's cache-aware router on prompt text (see the module docstring).

    Args:
        cache_threshold: fraction of the text a match must cover to follow it.
        balance_abs, balance_rel: imbalance margins that switch to least active.
        max_tree_chars: characters kept per replica; evicted LRU down to
            `evict_to` of it once exceeded.
    """

    name = "prefix_approx"

    def __init__(
        self,
        cache_threshold: float = 0.5,
        balance_abs: float = 32,
        balance_rel: float = 1.0001,
        max_tree_chars: int = 1 << 22,
        evict_to: float = 0.9,
    ) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.max_tree_chars = max_tree_chars
        self.evict_to = evict_to
        self.tree = TextPrefixTree()

    def choose(self, request, views, waited_s=0.0):
        startable = [v for v in views if v.can_start]
        if not startable:
            return None
        actives = [v.load.active for v in views]
        least = min(startable, key=lambda v: (v.load.active, v.replica_id))
        if is_overloaded(max(actives), min(actives), self.balance_abs, self.balance_rel):
            return least.replica_id
        text = request.prompt_text
        matched = self.tree.match(text) if text else {}
        best = min(views, key=lambda v: (-matched.get(v.replica_id, 0), not v.can_start, v.load.active, v.replica_id))
        if text and matched.get(best.replica_id, 0) / len(text) > self.cache_threshold:
            # As SGLang's router would queue it at that worker, wait here for it.
            return best.replica_id if best.can_start else None
        sizes = self.tree.sizes
        return min(startable, key=lambda v: (sizes.get(v.replica_id, 0), v.load.active, v.replica_id)).replica_id

    def on_placed(self, request, replica_id):
        if not request.prompt_text:
            return
        self.tree.insert(request.prompt_text, replica_id)
        if self.tree.sizes[replica_id] > self.max_tree_chars:
            self.tree.evict(replica_id, int(self.max_tree_chars * self.evict_to))

    def remove_replica(self, replica_id):
        self.tree.remove_replica(replica_id)


POLICIES: dict[str, type[PlacementPolicy]] = {
    p.name: p for p in (RoundRobinPolicy, Pow2Policy, PrefixApproxPolicy, KVAwarePolicy)
}
DEFAULT_POLICY = KVAwarePolicy.name


def make_policy(name: str, **knobs) -> PlacementPolicy:
    """A policy by name, with its knobs (see each class's Args)."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown routing policy {name!r}; expected one of {', '.join(POLICIES)}")
    return cls(**knobs)
