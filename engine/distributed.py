"""Running one engine across tensor-parallel ranks.

Rank 0 lives in the engine's process: it schedules, prepares each step's
inputs, samples. Ranks 1..N-1 are workers that only run the model. Each step
reaches them as two torch.distributed broadcasts from rank 0 (a fixed-size
header, then one packed int64 tensor with every input), not as one RPC per
worker per step: the workers wait in `broadcast` and the cost is a couple of
small messages.

How workers are started is up to a `WorkerLauncher`: Ray actors in a
placement group (shardline.deployments.tensor_parallel, found through an entry
point) or local processes (`LocalProcessLauncher`, for one machine and for
tests). Nothing here imports ray or the layers above the engine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from shardline.engine.model import AttentionMetadata, Transformer
from shardline.engine.shm_comm import SharedMemoryComm
from shardline.engine.tensor_parallel import ParallelContext, apply_tensor_parallel
from shardline.engine.weights import build_model
from shardline.kernels.step import select_rows

# Header: [command, num_tokens, num_decodes, decode_width, num_prefills, prefill_width, num_sample_rows, 0]
_HEADER = 8
CMD_STOP, CMD_STEP = 0, 1


@dataclass
class StepInput:
    """What every rank needs to run the model for one step."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    # Rows of the hidden states whose logits are computed.
    sample_rows: torch.Tensor


def pack_step(inp: StepInput) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, body): every tensor of a step in one int64 buffer."""
    m = inp.meta
    parts = [
        inp.input_ids,
        inp.positions,
        m.slot_mapping,
        m.decode_block_tables.flatten(),
        m.decode_context_lens,
        m.prefill_block_tables.flatten(),
        m.prefill_query_start_loc,
        m.prefill_context_lens,
        inp.sample_rows,
    ]
    body = torch.cat([p.to(torch.int64) for p in parts])
    header = torch.tensor(
        [
            CMD_STEP,
            inp.input_ids.numel(),
            m.num_decode_tokens,
            m.decode_block_tables.shape[1] if m.decode_block_tables.dim() == 2 else 0,
            m.prefill_block_tables.shape[0],
            m.prefill_block_tables.shape[1] if m.prefill_block_tables.dim() == 2 else 0,
            inp.sample_rows.numel(),
            0,
        ],
        dtype=torch.int64,
    )
    return header, body


def body_size(header: torch.Tensor) -> int:
    _, t, nd, wd, np_, wp, ns, _ = header.tolist()
    return 3 * t + nd * wd + nd + np_ * wp + (np_ + 1) + np_ + ns


def unpack_step(header: torch.Tensor, body: torch.Tensor) -> StepInput:
    _, t, nd, wd, np_, wp, ns, _ = header.tolist()
    sizes = [t, t, t, nd * wd, nd, np_ * wp, np_ + 1, np_, ns]
    ids, pos, slots, dbt, dlen, pbt, pqsl, plen, rows = torch.split(body, sizes)
    i32 = torch.int32
    meta = AttentionMetadata(
        slot_mapping=slots.clone(),
        num_decode_tokens=nd,
        decode_block_tables=dbt.view(nd, wd).to(i32),
        decode_context_lens=dlen.to(i32),
        prefill_block_tables=pbt.view(np_, wp).to(i32),
        prefill_query_start_loc=pqsl.to(i32),
        prefill_context_lens=plen.to(i32),
    )
    return StepInput(ids.clone(), pos.clone(), meta, rows.clone())


class StepBroadcaster:
    """Rank 0 sends each step's inputs to the workers; workers receive them."""

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx
        # Seconds rank 0 spent packing and broadcasting steps (dispatch cost).
        self.send_seconds = 0.0

    def send(self, inp: StepInput) -> None:
        start = time.perf_counter()
        header, body = pack_step(inp)
        dist.broadcast(header, src=0, group=self.ctx.group)
        dist.broadcast(body, src=0, group=self.ctx.group)
        self.send_seconds += time.perf_counter() - start

    def send_stop(self) -> None:
        header = torch.zeros(_HEADER, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.ctx.group)

    def recv(self) -> StepInput | None:
        """The next step, or None when rank 0 says stop."""
        header = torch.empty(_HEADER, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.ctx.group)
        if int(header[0]) == CMD_STOP:
            return None
        body = torch.empty(body_size(header), dtype=torch.int64)
        dist.broadcast(body, src=0, group=self.ctx.group)
        return unpack_step(header, body)


def run_step(model: Transformer, inp: StepInput) -> torch.Tensor | None:
    """The model's part of a step, identical on every rank: fp32 logits of the sample rows.

    Only the sample rows' hidden states are read, so the last layer runs past
    its K/V for them alone (`select_rows`; a decode step samples every row).
    """
    rows = inp.sample_rows
    out = None if rows.numel() == inp.input_ids.numel() else select_rows(inp.meta, rows)
    hidden = model(inp.input_ids, inp.positions, inp.meta, out)
    if rows.numel() == 0:
        return None  # every rank skips the logits all-gather together
    return model.compute_logits(hidden)


@dataclass
class WorkerSpec:
    """Everything a worker rank needs to build its shard."""

    folder: str
    dtype: str
    max_positions: int
    num_blocks: int
    block_size: int
    world_size: int
    # tcp://host:port of rank 0's rendezvous.
    init_method: str
    timeout_s: float = 120.0
    num_threads: int = 0


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def init_process_group(spec: WorkerSpec, rank: int) -> ParallelContext:
    """Join the group (gloo on CPU, NCCL when CUDA is present).

    On the CPU, when every rank runs on this host, collectives go through
    shared memory instead (engine.shm_comm); SHARDLINE_TP_SHM=0 turns that off.
    """
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(
        backend,
        init_method=spec.init_method,
        rank=rank,
        world_size=spec.world_size,
        timeout=timedelta(seconds=spec.timeout_s),
    )
    ctx = ParallelContext(rank, spec.world_size)
    if backend == "gloo" and os.environ.get("SHARDLINE_TP_SHM", "1") != "0":
        ctx.shm = _open_shared_memory(spec, rank)
    return ctx


def _host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _open_shared_memory(spec: WorkerSpec, rank: int) -> SharedMemoryComm | None:
    """A shared segment for the group if all ranks share this host (a collective: every rank calls it)."""
    hosts: list[str] = [""] * spec.world_size
    dist.all_gather_object(hosts, _host_id())
    if len(set(hosts)) != 1 or not os.path.isdir("/dev/shm"):
        return None
    slot_bytes = int(os.environ.get("SHARDLINE_TP_SHM_SLOT_MB", "8")) << 20
    comm = None
    names: list[str | None] = [None]
    if rank == 0:
        names[0] = f"/dev/shm/shardline-tp-{os.getpid()}-{spec.init_method.rsplit(':', 1)[-1]}"
        comm = SharedMemoryComm(names[0], rank, spec.world_size, slot_bytes, create=True)
    dist.broadcast_object_list(names, src=0)
    if rank != 0:
        comm = SharedMemoryComm(names[0], rank, spec.world_size, slot_bytes, create=False)
    dist.barrier()  # every rank has mapped it: the file itself can go
    if rank == 0:
        comm.unlink()
    return comm


def build_shard(spec: WorkerSpec, ctx: ParallelContext) -> Transformer:
    """This rank's slice of the model, with its KV cache allocated."""
    dtype = DTYPES[spec.dtype]
    model = build_model(
        spec.folder, dtype, spec.max_positions, transform=lambda m, has_head: apply_tensor_parallel(m, ctx, has_head)
    )
    model.setup_kv_cache(spec.num_blocks, spec.block_size, dtype)
    return model


class TPWorker:
    """A rank > 0: joins the group, builds its shard, then runs steps until told to stop."""

    def __init__(self, spec: WorkerSpec, rank: int):
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        self.ctx = init_process_group(spec, rank)
        self.model = build_shard(spec, self.ctx)
        self.broadcaster = StepBroadcaster(self.ctx)
        self.steps = 0

    def parameter_bytes(self) -> int:
        """Bytes of weights this rank holds (about 1/N of the model)."""
        seen: set[int] = set()
        total = 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total

    @torch.inference_mode()
    def run(self) -> int:
        """Serve steps until rank 0 broadcasts stop; returns the number of steps run."""
        try:
            while (inp := self.broadcaster.recv()) is not None:
                run_step(self.model, inp)
                self.steps += 1
        finally:
            dist.destroy_process_group()
        return self.steps


class WorkerLauncher(Protocol):
    """Starts ranks 1..N-1 somewhere; each calls TPWorker(spec, rank).run()."""

    def rendezvous_host(self) -> str:
        """The address other ranks reach rank 0 at."""

    def start(self, spec: WorkerSpec) -> None:
        """Start every worker rank without waiting for it (they block joining the group)."""

    def alive(self) -> bool:
        """False once any worker has died."""

    def shutdown(self) -> None:
        """Stop and reap the workers (after rank 0 broadcast stop, or to kill them)."""


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _local_worker_main(spec: WorkerSpec, rank: int) -> None:
    TPWorker(spec, rank).run()


class LocalProcessLauncher:
    """Worker ranks as local processes (spawned): one machine, no Ray."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self._procs: list[mp.process.BaseProcess] = []

    def rendezvous_host(self) -> str:
        return self.host

    def start(self, spec: WorkerSpec) -> None:
        ctx = mp.get_context("spawn")
        for rank in range(1, spec.world_size):
            proc = ctx.Process(target=_local_worker_main, args=(spec, rank), daemon=True, name=f"shardline-tp{rank}")
            proc.start()
            self._procs.append(proc)

    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def shutdown(self) -> None:
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs.clear()


class TensorParallelGroup:
    """Rank 0's side of a tensor-parallel engine: starts workers, broadcasts steps, stops them."""

    def __init__(self, spec: WorkerSpec, launcher: WorkerLauncher):
        if dist.is_initialized():
            # torch.distributed has one default group per process: a second would wait on ranks
            # that never come, until gloo's timeout.
            raise RuntimeError(
                "a tensor-parallel engine already runs in this process: shut it down first "
                "(LLM.shutdown(), or build it in a `with LLM(...)` block)"
            )
        self.spec = spec
        self.launcher = launcher
        launcher.start(spec)
        try:
            self.ctx = init_process_group(spec, 0)
        except BaseException:
            launcher.shutdown()
            raise
        self.broadcaster = StepBroadcaster(self.ctx)
        self._closed = False
        # Set once a collective failed: the group cannot be trusted again.
        self._broken: str | None = None

    def build_model(self) -> Transformer:
        return build_shard(self.spec, self.ctx)

    def healthy(self) -> bool:
        """False once a shard died or a collective failed (the replica must be replaced)."""
        return self._broken is None and not self._closed and self.launcher.alive()

    def run(self, model: Transformer, inp: StepInput) -> torch.Tensor | None:
        if self._broken is None and not self.launcher.alive():
            self._broken = "a tensor-parallel shard died"
        if self._broken is not None:
            raise RuntimeError(f"{self._broken}; this replica must be replaced")
        try:
            self.broadcaster.send(inp)
            return run_step(model, inp)
        except RuntimeError as e:
            self._broken = f"a tensor-parallel shard failed ({e})"
            raise RuntimeError(f"{self._broken}; this replica must be replaced") from e

    def close(self) -> None:
        """Tell the workers to stop, then reap them."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._broken is None and self.launcher.alive():
                self.broadcaster.send_stop()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            self.launcher.shutdown()


# Entry-point group through which a package offers a worker launcher by name. shardline's own
# Ray launcher is declared in pyproject.toml (`ray = shardline.deployments.tensor_parallel:...`),
# so the engine starts Ray actors without importing the layer that knows Ray.
LAUNCHER_ENTRY_POINTS = "shardline.worker_launchers"


def make_launcher(backend: str | WorkerLauncher, placement_strategy: str = "PACK") -> WorkerLauncher:
    """The launcher for `backend`: "mp" (local processes), a name from the
    `shardline.worker_launchers` entry points ("ray": actors in a placement group), or a
    `WorkerLauncher` passed in as it is.

    A named launcher is a factory taking the placement strategy; it is loaded only when asked
    for (importing ray costs a second).
    """
    if not isinstance(backend, str):
        return backend
    if backend == "mp":
        return LocalProcessLauncher()
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in entry_points(group=LAUNCHER_ENTRY_POINTS)}
    if backend not in found:
        names = ", ".join(repr(n) for n in sorted({"mp", *found}))
        raise ValueError(f"distributed_executor_backend must be one of {names} or a WorkerLauncher, got {backend!r}")
    return found[backend].load()(placement_strategy)


def make_init_method(host: str) -> str:
    return f"tcp://{host}:{free_port(host)}"


def default_num_threads(world_size: int) -> int:
    """Threads per rank when ranks share one machine's cores."""
    return max(1, (os.cpu_count() or 1) // world_size)


__all__ = [
    "StepInput",
    "StepBroadcaster",
    "TPWorker",
    "WorkerSpec",
    "WorkerLauncher",
    "LocalProcessLauncher",
    "TensorParallelGroup",
    "make_init_method",
    "make_launcher",
]
