"""Training on several processes: one per GPU, on one machine or several, or (to test the same path anywhere) CPU
processes with gloo.

Launching: `launch` runs our command line as N processes per machine through torch's own launcher, the elastic
agent that `torchrun` is (called as a library, not as a command), with a c10d rendezvous: on one machine the agent
hosts it on a port the system gives it; on several, every machine's agent joins the endpoint named by
`--rdzv-endpoint`. Processes that torchrun, `accelerate launch` or Slurm's `srun` started are recognised
(`processes()`, the one place their environment is read) and launch nothing themselves.

Supervision on top of the agent: it starts each process in a session of its own and passes a stop (SIGINT or
SIGTERM) to each exactly once; a second one, while they save, aborts them. A process whose launcher dies is
killed with it (`setup`). A stopped process exits 0 under an agent (the agent treats anything else as a failure
and would kill the others while they save) and says "stopped" to our launcher, which exits 130: finished (0),
stopped (130) or failed (1).

Agreeing: every process trains; only the main one (rank 0) checks and tokenizes the data, writes the run record,
the metrics, the held-out answers and the adapter (the Trainer's checkpoints are written by all: each keeps its own
random state). The processes agree through the rendezvous's key-value store, never in a collective a missing
process would leave waiting: a stop any process hears is set there and heard by all within `POLL_SECONDS`; what the
main process prepares reaches the others there (`from_main`); and before step 1 every process meets the others
with a fingerprint of what it trains on (`check_same_everywhere`), where a stop or a difference ends every process
with the same message. From step 1 on, a stop is agreed after each step (`any_process`), so all stop after the same
one.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .settings import from_environment

EXIT_FINISHED, EXIT_FAILED, EXIT_STOPPED = 0, 1, 130

# Set by our launcher in each process it starts: where a process says how it ended, and the launcher's process id.
OUTCOMES_VARIABLE = "SFT_SPACE_OUTCOMES"
LAUNCHER_VARIABLE = "SFT_SPACE_LAUNCHER_PID"
# The default rendezvous id, the same on every machine of one run (a shared endpoint is one run at a time).
RENDEZVOUS_ID = "sft-space"
# How often a waiting process looks at the store, and how long, once it heard a stop, it waits for the main process
# to say so too before leaving alone (the main one hears it within POLL_SECONDS unless it is gone).
POLL_SECONDS = 0.2
STOP_WAIT_SECONDS = 60.0
# How long the main process, at its end, waits for the others to have read what it left in the store it may host.
LEAVE_WAIT_SECONDS = 30.0
# The store's largest value is 8 MiB: what the main process shares goes in pieces.
STORE_PIECE_BYTES = 4 * 1024**2
# Long enough for every process to save its checkpoint after a stop; the supervisor above (the app's child.py) has
# its own, shorter, deadline and kills the launcher, whose processes die with it.
SHUTDOWN_SECONDS = 3600


# ---- which process this is ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Processes:
    """This process's place among those training one run, from the environment its launcher gave it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launcher: str = ""  # "torchrun" (torchrun, accelerate launch, our launcher: torch's variables), "srun", or ""


def processes(environ: Any = None) -> Processes:
    """Where this process stands, read from torch's launcher variables (torchrun, `accelerate launch`, our own
    launcher), else from Slurm's for a process `srun` started (one task per GPU), else one process alone."""
    env = os.environ if environ is None else environ
    if "LOCAL_RANK" in env and "WORLD_SIZE" in env:
        return Processes(int(env.get("RANK", "0")), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]),
                         int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), "torchrun")
    # A job step's tasks (srun); a shell inside an allocation has SLURM_PROCID too, but is no step of several.
    if int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0].split(",")[0]
        return Processes(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")),
                         int(env["SLURM_STEP_NUM_TASKS"]), int(per_node or 1), "srun")
    return Processes()


def world_size() -> int:
    return processes().world_size


def rank() -> int:
    return processes().rank


def is_main() -> bool:
    return rank() == 0


def started_by_a_launcher() -> bool:
    """Whether a launcher (ours, torchrun, accelerate, srun) started this process as one of several: it then
    trains, and launches nothing itself."""
    return processes().launcher != ""


def processes_wanted(requested: int = 0) -> int:
    """How many processes to train with on this machine: the request (--nproc-per-node), else the operator's
    setting (SFT_SPACE_PROCESSES), else one per CUDA GPU (1 without GPUs: CPU processes share the same cores, so
    they only test the path)."""
    if requested > 0:
        return requested
    configured = from_environment().processes
    if configured:
        return configured
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


# ---- the batch of an optimizer step ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSplit:
    """How the examples of one optimizer step are shared among the processes: each takes `batch_size` examples
    per forward pass and accumulates `accumulation` of them, so processes × batch × accumulation is exactly
    `examples_per_step`."""

    processes: int
    batch_size: int
    accumulation: int
    examples_per_step: int

    def reason(self) -> str:
        return (f"{self.processes} processes, one per device: {self.processes} × batch {self.batch_size} × "
                f"accumulation {self.accumulation} = {self.examples_per_step} examples per optimizer step, as the "
                "settings make it on one device")


def split_step(batch_size: int, accumulation: int, processes: int, batch_chosen: bool) -> StepSplit:
    """Share the examples of an optimizer step (batch size × gradient accumulation, as on one device) among
    `processes`, exactly. A chosen batch size is kept and only the accumulation is divided; a batch size chosen
    to fit memory may be lowered (never raised). UserError, with the nearest settings that divide, when the
    examples cannot be shared exactly."""
    examples = batch_size * accumulation
    if processes == 1:
        return StepSplit(1, batch_size, accumulation, examples)
    # A kept batch size needs the accumulation to be a multiple of the processes; a lowered one, only the examples.
    multiple = processes if batch_chosen else processes // math.gcd(batch_size, processes)
    if accumulation % multiple:
        lower, upper = accumulation - accumulation % multiple, accumulation - accumulation % multiple + multiple
        nearest = " or ".join(f"{value} ({batch_size * value} examples per step)" for value in (lower, upper) if value)
        batch = f"batch size {batch_size}" + ("" if batch_chosen else " (what fits this machine's memory)")
        raise UserError(f"{batch} × gradient accumulation {accumulation} = {examples} "
                        f"example{'s' if examples > 1 else ''} per optimizer step cannot be shared exactly among {processes} processes"
                        + (f", each keeping batch size {batch_size}" if batch_chosen else "")
                        + f". Set the gradient accumulation to {nearest}, or train with a number of processes "
                        f"that divides it.")
    per_process = examples // processes
    batch = batch_size if batch_chosen else max(b for b in range(1, batch_size + 1) if per_process % b == 0)
    return StepSplit(processes, batch, per_process // batch, examples)


# ---- launching ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """How many processes, on how many machines, meeting where: torchrun's flags."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int | None = None  # given: a static rendezvous where this machine is that node; else c10d's
    rdzv_endpoint: str = ""  # HOST:PORT of the rendezvous (with --node-rank: of node 0's store)
    rdzv_id: str = RENDEZVOUS_ID

    @property
    def needed(self) -> bool:
        return self.nproc_per_node > 1 or self.nnodes > 1

    def config(self) -> Any:
        """torch's LaunchConfig for this launch; UserError for flags that cannot work together."""
        from torch.distributed.launcher.api import LaunchConfig

        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise UserError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT, the address every machine "
                            "reaches (the first machine's, with a free port): the machines meet there.")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"--node-rank {self.node_rank} is not one of the {self.nnodes} machines (0 to "
                            f"{self.nnodes - 1}).")
        if self.rdzv_endpoint:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise UserError(f"--rdzv-endpoint {self.rdzv_endpoint!r} is not HOST:PORT (e.g. 10.0.0.1:29500).")
        static = self.node_rank is not None and self.nnodes > 1
        return LaunchConfig(
            min_nodes=self.nnodes, max_nodes=self.nnodes, nproc_per_node=self.nproc_per_node,
            rdzv_backend="static" if static else "c10d",
            # One machine alone: port 0, so the system gives the rendezvous a free port (no probing, no race).
            rdzv_endpoint=self.rdzv_endpoint or "127.0.0.1:0",
            rdzv_configs={"rank": self.node_rank} if static else {},
            run_id=self.rdzv_id if self.nnodes > 1 else uuid.uuid4().hex,
            # A failed process fails the run: a restart would start a new run over the old one's folder.
            max_restarts=0, monitor_interval=0.2, shutdown_timeout=SHUTDOWN_SECONDS)


def launch(python_arguments: list[str], how: Launch) -> int:
    """Run `python PYTHON_ARGUMENTS` (`-m sft_space train …`) as `how.nproc_per_node` processes on this machine
    through torch's elastic agent, joined with the other machines' when `how.nnodes` > 1, and wait for them all:
    0 when every one finished, 130 when the run stopped, 1 when one failed (the agent then ends the others)."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import launch_agent

    config = how.config()
    # The agent's notes (its configuration, each signal it passes on) are for debugging it, not for people; its
    # modules' loggers have levels of their own.
    for name in [name for name in logging.root.manager.loggerDict if name.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="sft-space-outcomes-") as outcomes:
        os.environ[OUTCOMES_VARIABLE] = outcomes
        os.environ[LAUNCHER_VARIABLE] = str(os.getpid())
        # As torchrun does: processes sharing a machine's cores each take their share of them.
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // how.nproc_per_node)))
        signalled = False
        # Until the agent has started the processes (and put its own handlers in), a stop ends the launch.
        previous = {number: signal.signal(number, signal.default_int_handler)
                    for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            launch_agent(config, sys.executable, python_arguments)
        except ChildFailedError:
            return EXIT_FAILED
        except (SignalException, KeyboardInterrupt):
            signalled = True  # the agent passed the stop on and waited for every process to end
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            for name in (OUTCOMES_VARIABLE, LAUNCHER_VARIABLE):
                os.environ.pop(name, None)
        codes = [int(path.read_text() or EXIT_FAILED) for path in Path(outcomes).iterdir()]
    if any(code not in (EXIT_FINISHED, EXIT_STOPPED) for code in codes):
        return EXIT_FAILED
    return EXIT_STOPPED if signalled or EXIT_STOPPED in codes else EXIT_FINISHED


def exit_status(code: int) -> int:
    """The status this process exits with after `train` ended with `code`: said to our launcher, and 0 instead
    of "stopped" under an elastic agent (ours or torchrun's), which treats any other status as a failure."""
    if outcomes := os.environ.get(OUTCOMES_VARIABLE):
        with contextlib.suppress(OSError):
            (Path(outcomes) / str(rank())).write_text(str(code))
    if code == EXIT_STOPPED and "TORCHELASTIC_RUN_ID" in os.environ:
        return EXIT_FINISHED
    return code


def _die_with_the_launcher() -> None:
    """Killed when our launcher dies (a supervisor that gave up on it kills it, and each of its processes is in a
    session of its own, out of the reach of a signal to the launcher's group). Linux only."""
    launcher = os.environ.get(LAUNCHER_VARIABLE)
    if not launcher or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(launcher):  # it died before this process asked
        os._exit(EXIT_FAILED)


# ---- agreeing -------------------------------------------------------------------------------------------------


class Group:
    """The processes of one run, agreeing through the rendezvous's store: a stop any of them hears is heard by
    all (a thread sets and watches it), and `meet` is a meeting that a stop ends for every one of them at once,
    never one that waits for a process that left."""

    STOP_KEY = "stop"

    def __init__(self, store: Any, rank: int, size: int, stop_event: threading.Event,
                 stopped: Callable[[], BaseException]):
        self.store, self.rank, self.size = store, rank, size
        self.stop_event, self.stopped = stop_event, stopped
        self.lock = threading.Lock()  # one store client, shared with the watcher
        self.meetings = 0
        self.closed = threading.Event()
        self.watcher = threading.Thread(target=self._watch, name="sft-space-stop-watcher", daemon=True)
        self.watcher.start()

    def _watch(self) -> None:
        while not self.closed.wait(POLL_SECONDS):
            try:
                if self.stop_event.is_set():
                    self._store(lambda store: store.set(self.STOP_KEY, "1"))
                    return
                if self._store(lambda store: store.check([self.STOP_KEY])):
                    self.stop_event.set()
                    return
            except Exception:  # the store is gone with the process that held it: nothing left to hear or tell
                return

    def close(self) -> None:
        """Stop watching (a call to a store that is gone aborts the process at its exit), and say so. The main
        process, which hosts the store when no agent does (srun, processes started by hand), waits up to
        LEAVE_WAIT_SECONDS for the others to have read what it left there."""
        self.closed.set()
        self.watcher.join()
        with contextlib.suppress(Exception):
            self._store(lambda store: store.add("left", 1))
            deadline = time.monotonic() + LEAVE_WAIT_SECONDS
            while self.rank == 0 and time.monotonic() < deadline:
                if self._store(lambda store: store.add("left", 0)) >= self.size:
                    break
                time.sleep(POLL_SECONDS)

    def _store(self, operation: Callable[[Any], Any]) -> Any:
        """`operation(store)`; a store that cannot be reached is the stop error after a stop (its host ended with
        the run), and a UserError otherwise."""
        try:
            with self.lock:
                return operation(self.store)
        except RuntimeError as err:  # torch's DistNetworkError and DistStoreError
            if self.stop_event.is_set():
                raise self.stopped() from None
            raise UserError(f"Process {self.rank} lost touch with the others of the run ({err}); the first process's "
                            "own output says why.") from None

    def _next(self, name: str) -> str:
        # Every process meets in the same order, so the n-th meeting has the same key in each.
        self.meetings += 1
        return f"{self.meetings}/{name}"

    def meet(self, name: str, value: bytes = b"") -> list[bytes] | None:
        """Wait for every process to come, each bringing `value`: every one's values, in rank order; or None in
        every process when a stop came first (then no process goes on into what follows the meeting)."""
        key = self._next(name)
        self._store(lambda store: store.set(f"{key}/value/{self.rank}", value))
        decision = f"{key}/decision"
        if self._store(lambda store: store.add(f"{key}/arrived", 1)) == self.size:
            self._store(lambda store: store.compare_set(decision, "", "go"))
        while True:
            if self._store(lambda store: store.check([decision])):
                outcome = self._store(lambda store: store.get(decision))
            elif self.stop_event.is_set():
                # Whichever is first, the last arrival's "go" or a stop's "abort", is every process's answer.
                outcome = self._store(lambda store: store.compare_set(decision, "", "abort"))
            else:
                time.sleep(POLL_SECONDS)
                continue
            if outcome != b"go":
                return None
            return [self._store(lambda store, r=r: store.get(f"{key}/value/{r}")) for r in range(self.size)]

    def check_same(self, summary: dict[str, Any]) -> None:
        """Meet every process, each with a summary of what it trains on (a fingerprint of its training data, its
        batch, its sequence length…): UserError in every process, naming what differs, if they are not all the
        same; the stop error in every process if a stop came first. After it, every process goes into step 1: none
        is left waiting in the trainer's first collective for one that left."""
        values = self.meet("same", pickle.dumps(summary))
        if values is None:
            raise self.stopped()
        summaries = [pickle.loads(value) for value in values]
        differences = []
        for number, other in enumerate(summaries[1:], start=1):
            differing = [f"{name} {summaries[0].get(name)} vs {other.get(name)}"
                         for name in sorted(summaries[0].keys() | other.keys())
                         if summaries[0].get(name) != other.get(name)]
            if differing:
                differences.append(f"process {number} differs from process 0 in {'; '.join(differing)}")
        if differences:
            raise UserError("The processes of this run would not train the same thing, so none starts: "
                            + ". ".join(differences) + ". Give every machine the same data, model, settings and "
                            "library versions, and start them all with the same command.")

    def from_main(self, action: Callable[[], Any]) -> Any:
        """`action()` run by the main process; its result, or its error, in every process. A process that hears a
        stop waits for the main one to stop too (it hears it within POLL_SECONDS), and leaves alone only after
        STOP_WAIT_SECONDS (the main process is gone)."""
        key = self._next("from-main")
        if self.rank == 0:
            try:
                outcome: tuple[bool, Any] = (True, action())
            except Exception as err:
                outcome = (False, err)
            self._put(key, outcome)
            if not outcome[0]:
                raise outcome[1]
            return outcome[1]
        stop_heard = None
        while not self._store(lambda store: store.check([f"{key}/pieces"])):
            if self.stop_event.is_set():
                stop_heard = stop_heard or time.monotonic()
                if time.monotonic() - stop_heard > STOP_WAIT_SECONDS:
                    raise self.stopped()
            time.sleep(POLL_SECONDS)
        succeeded, value = self._get(key)
        if not succeeded:
            raise value
        return value

    def _put(self, key: str, outcome: tuple[bool, Any]) -> None:
        try:
            data = pickle.dumps(outcome)
        except Exception as err:  # an error that cannot travel travels as its words
            data = pickle.dumps((False, UserError(f"{outcome[1] if not outcome[0] else err}")))
        pieces = [data[start:start + STORE_PIECE_BYTES] for start in range(0, len(data), STORE_PIECE_BYTES)] or [b""]
        for number, piece in enumerate(pieces):
            self._store(lambda store: store.set(f"{key}/{number}", piece))
        self._store(lambda store: store.set(f"{key}/pieces", str(len(pieces))))

    def _get(self, key: str) -> tuple[bool, Any]:
        count = int(self._store(lambda store: store.get(f"{key}/pieces")))
        data = b"".join(self._store(lambda store, n=n: store.get(f"{key}/{n}")) for n in range(count))
        try:
            return pickle.loads(data)
        except Exception as err:  # an error whose class cannot be rebuilt here (its arguments differ)
            return False, UserError(f"The main process could not go on ({err}); its own output says why.")


_group: Group | None = None


def setup(cpu: bool, stop_event: threading.Event, stopped: Callable[[], BaseException]) -> None:
    """Join the other processes of the run (before the Trainer would), so that they can agree on the run's folder
    and hear each other's stop; `stopped()` is the error a process raises when a stop ends a meeting."""
    global _group
    where = processes()
    if where.world_size == 1:
        return
    _die_with_the_launcher()
    if where.launcher == "srun":
        _adopt_slurm_environment(where)
    from accelerate import PartialState
    from datetime import timedelta

    import torch.distributed as dist

    PartialState(cpu=cpu)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=300))
    # Keys of this run apart from the launcher's own (an agent's store is shared with it).
    prefix = f"sft_space/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '')}"
    _group = Group(dist.PrefixStore(prefix, store), where.rank, where.world_size, stop_event, stopped)


def _adopt_slurm_environment(where: Processes) -> None:
    """torch's variables for a process that srun started, so that torch and accelerate join the group as under
    torchrun. The first machine's address is where srun was run from (an sbatch script runs on the allocation's
    first machine) unless MASTER_ADDR says otherwise; the port is derived from the job id unless MASTER_PORT is
    set."""
    env = os.environ
    env.setdefault("MASTER_ADDR", env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    env.update(RANK=str(where.rank), LOCAL_RANK=str(where.local_rank), WORLD_SIZE=str(where.world_size),
               LOCAL_WORLD_SIZE=str(where.local_world_size))


def leave() -> None:
    """The end of the run for this process: it no longer watches for a stop, and leaves torch's process group (one
    left standing at the interpreter's exit can abort it, "terminate called without an active exception", which the
    launcher reads as a failed run)."""
    global _group
    if _group is not None:
        _group.close()
        _group = None
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def from_main(action: Callable[[], Any]) -> Any:
    """`action()` in the main process only, its result (or its error: a refusal is everyone's) in every process;
    the others wait for it without a collective, so a stop heard anywhere ends the wait of all."""
    return action() if _group is None else _group.from_main(action)


def main_only(action: Callable[[], Any]) -> None:
    """`action()` in the main process only; the others wait for it, and raise its error too."""
    from_main(lambda: (action(), None)[1])


def check_same_everywhere(summary: dict[str, Any]) -> None:
    """Meet every process before step 1, each with a summary of what it trains on (see `Group.check_same`)."""
    if _group is not None:
        _group.check_same(summary)


def fingerprint(*parts: Any) -> str:
    """A short digest of `parts` (numbers, text, token arrays' bytes), the same in every process that has them."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
    return digest.hexdigest()[:16]


def any_process(flag: bool) -> bool:
    """True in every process when it is true in any (a stop asked of one is a stop for all). A collective: only
    where every process is sure to come (after each training step)."""
    if world_size() == 1:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
