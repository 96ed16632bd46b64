"""Process groups for the (cfg, ring, ulysses) mesh, shared seeds and teardown.

torchrun's RANK / WORLD_SIZE / LOCAL_RANK are read here and nowhere else.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING

from ..config import ParallelConfig

if TYPE_CHECKING:  # torch loads only where a mesh is built: layout checks and env_rank run without it
    import torch
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class Mesh:
    """This process's place in the (cfg, ring, ulysses) mesh.

    Groups are None where their degree is 1: callers skip the communication then.
    """

    world_size: int
    rank: int
    local_rank: int
    device: torch.device
    cfg_degree: int
    ring_degree: int
    ulysses_degree: int
    cfg_rank: int
    ring_rank: int
    ulysses_rank: int
    cfg_group: ProcessGroup | None
    ring_group: ProcessGroup | None
    ulysses_group: ProcessGroup | None
    seq_group: ProcessGroup | None  # ring x ulysses: every rank that holds a piece of one sequence
    a2a_mode: str
    device_mesh: DeviceMesh | None = None  # dims ("cfg", "ring", "ulysses"); None for one process
    control_group: ProcessGroup | None = None  # all ranks, gloo, no --dist-timeout deadline (see CONTROL_TIMEOUT)

    @property
    def seq_degree(self) -> int:
        return self.ring_degree * self.ulysses_degree

    @property
    def seq_rank(self) -> int:
        # Ulysses ranks hold neighbouring chunks, so one all-to-all yields a contiguous run of tokens.
        return self.ring_rank * self.ulysses_degree + self.ulysses_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(world_size: int, num_heads: int | None, num_branches: int | None) -> list[tuple[int, int, int]]:
    """Every (cfg, ring, ulysses) whose product is world_size and that the model can run.

    Ulysses splits heads, so it must divide num_heads; cfg ranks share the guidance branches, so there are
    at most num_branches of them (a share may be uneven: Plan.run_branches gives rank j % cfg branch j).
    None leaves that degree unconstrained.
    """
    return [
        (cfg, ring, world_size // (cfg * ring))
        for cfg in _divisors(world_size)
        if num_branches is None or cfg <= num_branches
        for ring in _divisors(world_size // cfg)
        if num_heads is None or num_heads % (world_size // (cfg * ring)) == 0
    ]


def _flags(layout: tuple[int, int, int]) -> str:
    names = ("--cfg-degree", "--ring-degree", "--ulysses-degree")
    parts = [f"{name} {degree}" for name, degree in zip(names, layout) if degree != 1]
    return " ".join(parts) or "no degree flags (all 1)"


def validate_layout(parallel: ParallelConfig, world_size: int, num_heads: int | None) -> None:
    """Raise a one-line ValueError naming the bad value and layouts that would work."""
    if num_heads is not None and num_heads % parallel.ulysses != 0:
        ok = ", ".join(str(d) for d in _divisors(num_heads))
        raise ValueError(
            f"--ulysses-degree {parallel.ulysses} does not divide {num_heads} attention heads; use one of {ok}"
        )
    if parallel.world_size != world_size:
        fits = layouts(world_size, num_heads, None)
        same_cfg = [layout for layout in fits if layout[0] == parallel.cfg]
        hints = ", or ".join(_flags(layout) for layout in (same_cfg or fits))
        raise ValueError(
            f"cfg {parallel.cfg} x ring {parallel.ring} x ulysses {parallel.ulysses} = {parallel.world_size} "
            f"but the world size is {world_size}; for {world_size} process{'es' * (world_size > 1)} try {hints}"
        )


def resolve_parallel(parallel: ParallelConfig, world_size: int, num_heads: int | None = None) -> ParallelConfig:
    """Let Ulysses take the processes that cfg and ring leave, when the user left it at 1.

    `torchrun --nproc_per_node 4` with no degree flags thus runs Ulysses 4. When that default does not
    divide the heads, the error says so (no --ulysses-degree was given) and lists what fits. A layout that
    still does not fit is returned as it is, for validate_layout to report.
    """
    rest, leftover = divmod(world_size, parallel.cfg * parallel.ring)
    if parallel.ulysses == 1 and leftover == 0 and rest > 1:
        if num_heads is not None and num_heads % rest:
            given = f" / (cfg {parallel.cfg} x ring {parallel.ring})" if parallel.cfg * parallel.ring > 1 else ""
            hints = ", or ".join(_flags(layout) for layout in layouts(world_size, num_heads, None))
            raise ValueError(
                f"{world_size} processes{given} leave Ulysses {rest} by default, which does not divide {num_heads} "
                f"attention heads; for {world_size} processes pass {hints}"
            )
        return replace(parallel, ulysses=rest)
    return parallel


def choose_parallel(parallel: ParallelConfig, world_size: int, workload) -> ParallelConfig:
    """--layout auto: the (cfg, ring, ulysses) the cost model predicts fastest for this world and workload
    (costmodel.Workload), with the prediction and the runner-up in `choice`. Any world gets one (ring takes
    any degree); explicit degrees (auto False) and one process are returned as they are."""
    if not parallel.auto or world_size == 1:
        return parallel
    from .costmodel import choose

    found = choose(world_size, workload)
    best, second = found.best, found.runner_up
    record = {"mode": "auto", "chosen": list(best.layout), "predicted_ms_per_step": round(best.ms, 1),
              "runner_up": list(second.layout) if second else None,
              "runner_up_ms_per_step": round(second.ms, 1) if second else None,
              "model_max_error": found.error, "constants": "costs.json 'current', H200"}
    cfg, ring, uly = best.layout
    return replace(parallel, cfg=cfg, ring=ring, ulysses=uly, choice=record)


def describe_choice(choice: dict) -> str:
    """The line rank 0 prints for --layout auto."""
    def name(layout: list[int]) -> str:
        return "cfg {} x ring {} x ulysses {}".format(*layout)

    line = f"layout auto: {name(choice['chosen'])}, predicted {choice['predicted_ms_per_step']:,.0f} ms/step on H200s"
    if choice["runner_up"]:
        line += f" (runner-up {name(choice['runner_up'])}, {choice['runner_up_ms_per_step']:,.0f} ms)"
    return line + f"; a prediction: the model is within {100 * choice['model_max_error']:.0f}% on the recorded runs"


def check_device(device: str) -> None:
    """--device cuda on a machine without CUDA: one line, before anything loads."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"--device cuda: {why} (torch {torch.__version__}); use --device cpu or auto")


def env_world_size() -> int:
    """The world size torchrun announced (1 for a plain process): the CLI resolves degrees with it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """The rank torchrun announced (0 for a plain process): the CLI prints errors from it before any mesh exists."""
    return int(os.environ.get("RANK", "0"))


def report_to_launcher(message: str) -> None:
    """Under torchrun, put `message` in the error file torchrun gives each worker, so its closing report shows
    it as the root cause (`traceback : error: ...`) instead of a pointer to its docs. torchrun still prints
    that report and exits 1 when a worker fails; nothing a worker does silences it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        import json
        import time

        try:
            with open(path, "w") as f:
                json.dump({"message": message, "timestamp": int(time.time())}, f)
        except OSError:
            pass  # the line is on stderr already; the report is a courtesy


def wait_for_main(seconds: float = 5.0) -> None:
    """A non-zero rank that met rank 0's usage error: give rank 0 the time to say it (torchrun ends every worker
    as soon as one exits), returning early when torchrun's SIGTERM comes, so this rank too exits with the
    usage error's code."""
    import signal
    import threading
    import time

    if env_world_size() == 1 or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        time.sleep(seconds)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _timeout_options(backend: str, timeout: timedelta):
    """Backend options carrying our collective timeout: a mesh's groups do not inherit the default group's."""
    import torch.distributed as dist

    options = dist.ProcessGroupNCCL.Options() if backend == "nccl" else dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    return options


# The control group's ops wait for one rank's own work (rank 0 planning, encoding, decoding, writing): that
# is bounded by the disk and the encoder, not by --dist-timeout. A rank that dies still ends these waits at
# once (its sockets close, and torchrun stops the others); only a rank that hangs here is waited for this long.
CONTROL_TIMEOUT = timedelta(hours=24)


class AgreedError(RuntimeError):
    """An error every rank raises together (one rank's failure, broadcast): rank 0 alone reports it, and every
    rank may move on to the next item (--keep-going) without the ranks falling out of step."""


def join_world(device: str, timeout_s: float) -> ProcessGroup | None:
    """Join torchrun's default process group (collective timeout `timeout_s`) and open the control group
    (gloo, CPU objects, CONTROL_TIMEOUT); None for one process. init_mesh reuses both."""
    import torch
    import torch.distributed as dist

    world_size = env_world_size()
    if world_size == 1:
        return None
    if not dist.is_initialized():
        on_cuda = torch.device(device).type == "cuda"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if on_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if on_cuda else "gloo", rank=env_rank(), world_size=world_size,
                                timeout=timedelta(seconds=timeout_s),
                                device_id=torch.device("cuda", local_rank) if on_cuda else None)
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def from_main(make, group: ProcessGroup | None):
    """make() on rank 0 and its result on every rank; the others wait in the control group (no --dist-timeout
    deadline). A ValueError/RuntimeError/OSError (or UsageError) of make() is raised on every rank as an
    AgreedError with the same message (a UsageError stays one, for exit code 2)."""
    import torch.distributed as dist

    from ..errors import UsageError

    if group is None:
        return make()
    box: list = [None]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", make())
        except UsageError as e:
            box[0], error = ("usage", str(e)), e
        except (ValueError, RuntimeError, OSError) as e:
            box[0], error = ("error", str(e)), e
    dist.broadcast_object_list(box, src=0, group=group)
    kind, value = box[0]
    if kind == "usage":
        raise UsageError(value) from error
    if kind == "error":
        raise AgreedError(value) from error
    return value


def gather_objects(obj, group: ProcessGroup | None) -> list:
    """Every rank's `obj`, in rank order, on every rank (control group: no --dist-timeout deadline)."""
    import torch.distributed as dist

    if group is None:
        return [obj]
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, obj, group=group)
    return every


def agree(error: BaseException | None, group: ProcessGroup | None) -> None:
    """Raise, on every rank, the first rank's error of a step each rank did on its own (loading)."""
    errors = gather_objects(None if error is None else str(error), group)
    if error is not None and group is None:
        raise error
    for rank, message in enumerate(errors):
        if message is not None:
            raise AgreedError(message if rank == 0 else f"rank {rank}: {message}") from error


def init_mesh(parallel: ParallelConfig, device: str, control: ProcessGroup | None = None) -> Mesh:
    """Join the process group (if there is more than one process) and build the (cfg, ring, ulysses) mesh.

    The mesh is a named `DeviceMesh` (so weight sharding can later attach to its dimensions). Its rank
    order is rank = (cfg_rank * ring + ring_rank) * ulysses + ulysses_rank: Ulysses runs over
    neighbouring ranks (within a node, where all-to-all is cheap), ring across them.
    """
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    world_size = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    validate_layout(parallel, world_size, None)
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.set_device(local_rank)
        place = torch.device("cuda", local_rank)
    else:
        place = torch.device(device)
    timeout = timedelta(seconds=parallel.timeout_s)
    cfg, ring, uly = parallel.cfg, parallel.ring, parallel.ulysses
    groups: dict[str, ProcessGroup | None] = dict(cfg=None, ring=None, ulysses=None, seq=None)
    device_mesh = None
    if world_size > 1:
        backend = "nccl" if on_cuda else "gloo"
        # An already joined default group is reused, so one job can build several meshes over it.
        if control is None:
            control = join_world(device, parallel.timeout_s)
        device_mesh = init_device_mesh(
            place.type, (cfg, ring, uly), mesh_dim_names=("cfg", "ring", "ulysses"),
            backend_override={dim: (backend, _timeout_options(backend, timeout)) for dim in range(3)},
        )
        # A degree of 1 gets no group: callers skip the communication then.
        for name, degree in (("cfg", cfg), ("ring", ring), ("ulysses", uly)):
            if degree > 1:
                groups[name] = device_mesh.get_group(name)
        if ring > 1 and uly > 1:  # every rank holding a piece of one sequence
            seq = device_mesh["ring", "ulysses"]._flatten("seq", backend_override=(backend, _timeout_options(backend, timeout)))
            groups["seq"] = seq.get_group()
        else:  # the sequence group is the Ulysses or the ring group: reuse it rather than open a twin
            groups["seq"] = groups["ulysses"] if uly > 1 else groups["ring"]
    return Mesh(
        world_size=world_size, rank=rank, local_rank=local_rank, device=place,
        cfg_degree=cfg, ring_degree=ring, ulysses_degree=uly,
        cfg_rank=rank // (ring * uly), ring_rank=rank // uly % ring, ulysses_rank=rank % uly,
        cfg_group=groups["cfg"], ring_group=groups["ring"], ulysses_group=groups["ulysses"], seq_group=groups["seq"],
        a2a_mode=parallel.a2a_mode, device_mesh=device_mesh, control_group=control,
    )


def teardown() -> None:
    """Leave the process group; safe to call twice and without one (finally-blocks call it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def shared_seed(seed: int | None, mesh: Mesh) -> int:
    """The given seed, or one drawn on rank 0 and broadcast, so every rank draws the same noise."""
    import torch
    import torch.distributed as dist

    if seed is not None:
        return seed
    drawn = torch.tensor([secrets.randbelow(2**32)], dtype=torch.int64, device=mesh.device)
    if mesh.world_size > 1:
        dist.broadcast(drawn, src=0)
    return int(drawn.item())
