"""Training on several processes: one per GPU, or (to test the same path anywhere) 2 CPU processes with gloo.

`run_processes` starts one process of our command line per device, each told its RANK, WORLD_SIZE and
LOCAL_RANK in its environment as torch's launcher (`torchrun`) would, and the Trainer (through accelerate) wraps
the model in DistributedDataParallel. Several machines use `torchrun` itself, which sets the same variables (see
the README). Our own launcher, not torchrun's elastic agent, so that a stop is one signal to every process (the
agent would send its own on top) and the exit code says finished (0), stopped (130) or failed (1). Every process trains; only the main one (rank 0) writes
the run record, the metrics, the held-out answers and the adapter; the Trainer's checkpoints are written by all
of them (each keeps its own random state). A stop must be agreed on: every process stops after the same step,
or the others would wait forever for its gradients.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable

from .errors import UserError
from .settings import environment_variable, from_environment

EXIT_STOPPED = 130

# The environment the elastic launcher gives each process; a process with it is not launched again.
LAUNCHED = "LOCAL_RANK"
PROCESSES_VARIABLE = environment_variable("processes")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether this process is one of several the launcher started."""
    return LAUNCHED in os.environ


def processes_wanted(requested: int = 0) -> int:
    """How many processes to train with: the request (the --processes flag), else SFT_SPACE_PROCESSES, else one
    per CUDA GPU (1 without GPUs: two CPU processes share the same cores, so they only test the path)."""
    if requested > 0:
        return requested
    configured = from_environment().processes
    if configured:
        return configured
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_processes(processes: int, arguments: list[str], grace_seconds: float = 30.0) -> int:
    """Run `python -m sft_space ARGUMENTS` as `processes` processes on this machine and wait for them all:
    0 when every one finished, 130 when the run stopped, 1 when one failed (the others are then ended: they
    would wait for it forever)."""
    port = str(_free_port())
    children = []
    for number in range(processes):
        env = {**os.environ, "RANK": str(number), "LOCAL_RANK": str(number), "WORLD_SIZE": str(processes),
               "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        children.append(subprocess.Popen([sys.executable, "-m", "sft_space", *arguments], env=env))

    def forward(signum: int, frame: Any) -> None:
        # Ctrl+C reaches every process of the terminal's group by itself; a signal sent to this one alone
        # (SIGTERM from a supervisor) is passed on.
        if signum != signal.SIGINT:
            for process in children:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)

    previous = {number: signal.signal(number, forward) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed_at = None
        while any(process.poll() is None for process in children):
            codes = [process.poll() for process in children]
            if failed_at is None and any(code not in (None, 0, EXIT_STOPPED) for code in codes):
                failed_at = time.monotonic()
                for process in children:
                    if process.poll() is None:
                        process.send_signal(signal.SIGTERM)
            if failed_at is not None and time.monotonic() - failed_at > grace_seconds:
                for process in children:
                    if process.poll() is None:
                        process.kill()
            time.sleep(0.2)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    codes = [process.returncode for process in children]
    if any(code not in (0, EXIT_STOPPED) for code in codes):
        return 1
    return EXIT_STOPPED if EXIT_STOPPED in codes else 0


def main_first(action: Callable[[], Any]) -> Any:
    """Run `action` in the main process only and give its result to every process; a refusal there (UserError)
    is raised in every process, so none is left waiting for the others."""
    result, refusal = None, None
    if is_main():
        try:
            result = action()
        except UserError as err:
            refusal = str(err)
    result, refusal = broadcast((result, refusal))
    if refusal is not None:
        raise UserError(refusal)
    return result


def setup(cpu: bool) -> None:
    """Join the process group early (before the Trainer would), so processes can agree on the run's folder."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState(cpu=cpu)


def broadcast(value: Any) -> Any:
    """The main process's `value`, in every process."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def any_process(flag: bool) -> bool:
    """True in every process when it is true in any (a stop asked of one is a stop for all)."""
    if world_size() == 1:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()
