"""Tensor parallelism on CPU: ranks are processes started with torch.multiprocessing, joined over gloo."""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, backend: str, fn, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
    torch.set_num_threads(1)  # two ranks on a 2-core CI machine
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        queue.put((rank, "ok", fn(rank, *args)))
    except BaseException as e:  # noqa: BLE001 -- the parent re-raises it with the rank's traceback
        queue.put((rank, "error", (type(e).__name__, str(e), traceback.format_exc())))
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args, timeout: float = 240.0, backend: str = "gloo") -> list:
    """Run ``fn(rank, *args)`` on ``world`` ranks (gloo on CPU; nccl: rank r on GPU r); each rank's return value or
    ``("error", name, message)``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, backend, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out: list = [None] * world
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            out[rank] = value if status == "ok" else ("error", value[0], value[1] + "\n" + value[2])
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return out
