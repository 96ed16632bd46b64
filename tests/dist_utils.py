"""Run a function on N gloo processes, as torchrun would, and collect what each returns."""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from usp_infer.parallel.dist import teardown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # spawn does not set OMP_NUM_THREADS=1 as torchrun does: N ranks on 2 cores crawl
    try:
        result = ("ok", fn(*args))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent, which re-raises it
        result = ("error", traceback.format_exc())
    with open(Path(out_dir) / f"{rank}.pkl", "wb") as f:
        pickle.dump(result, f)
    if result[0] == "error":
        sys.exit(1)  # mp.spawn then stops the other ranks instead of leaving them in a collective
    teardown()


def run_spawn(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """fn(*args) on `world_size` processes; returns each rank's result in rank order.

    fn must be a module-level function (spawn pickles it) and sets up its own process group,
    e.g. through usp_infer.parallel.dist.init_mesh (the env carries RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT). A worker's exception is re-raised here with its traceback.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(_worker, args=(fn, world_size, _free_port(), out_dir, args), nprocs=world_size, join=True)
        except mp.ProcessExitedException as crash:
            for rank in range(world_size):
                path = Path(out_dir) / f"{rank}.pkl"
                if path.exists() and (outcome := pickle.loads(path.read_bytes()))[0] == "error":
                    raise RuntimeError(f"rank {rank} of {world_size} failed:\n{outcome[1]}") from crash
            raise  # died without a Python exception (signal, segfault): mp's message is all there is
        return [pickle.loads((Path(out_dir) / f"{rank}.pkl").read_bytes())[1] for rank in range(world_size)]
