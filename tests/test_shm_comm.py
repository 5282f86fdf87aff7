"""Shared-memory collectives between processes on one host."""

from __future__ import annotations

import multiprocessing as mp
import os

import torch

from shardline.engine.shm_comm import SharedMemoryComm


def _worker(path: str, rank: int, world: int, iters: int, queue) -> None:
    comm = SharedMemoryComm(path, rank, world, slot_bytes=1 << 16, create=False)
    results = []
    for i in range(iters):
        g = torch.Generator().manual_seed(1000 * i + rank)
        n = 1 + (i * 37) % 500  # the size changes every round
        t = torch.randn(n, generator=g)
        comm.all_reduce(t)
        gathered = comm.all_gather(torch.full((3,), float(rank * 100 + i)))
        results.append((t.sum().item(), [x[0].item() for x in gathered]))
    queue.put((rank, results))


def test_all_reduce_and_all_gather_across_processes(tmp_path):
    world, iters = 3, 200
    path = str(tmp_path / "seg")
    # rank 0 creates the segment; every rank then attaches to it
    creator = SharedMemoryComm(path, 0, world, slot_bytes=1 << 16, create=True)
    del creator
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(path, r, world, iters, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    os.unlink(path)
    for i in range(iters):
        n = 1 + (i * 37) % 500
        expected = sum(torch.randn(n, generator=torch.Generator().manual_seed(1000 * i + r)) for r in range(world))
        for r in range(world):
            total, gathered = out[r][i]
            assert abs(total - expected.sum().item()) < 1e-3
            assert gathered == [float(q * 100 + i) for q in range(world)]
        # every rank summed in the same order: bit-identical results
        assert len({out[r][i][0] for r in range(world)}) == 1


def test_oversized_tensors_are_refused(tmp_path):
    comm = SharedMemoryComm(str(tmp_path / "seg"), 0, 1, slot_bytes=64, create=True)
    assert comm.fits(torch.zeros(16)) and not comm.fits(torch.zeros(17))
    assert comm.all_reduce(torch.ones(4)).tolist() == [1.0] * 4
