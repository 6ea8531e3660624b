"""Training on several processes: the path a multi-GPU machine (or several machines) takes, run here as CPU
processes with gloo, launched through torch's elastic agent."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from builders import persona_chats

from sft_space import distributed, runs
from sft_space.errors import UserError
from sft_space.settings import environment_variable

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--learning-rate", "5e-3", "--warmup-ratio", "0", "--lr-scheduler", "constant_with_warmup", "--seed", "0"]
# A stop must end every process within this (the app's Stop gives a run 30 s plus two of its slowest steps).
STOP_TARGET_SECONDS = 30


def train_command(data, model, runs_dir, *flags):
    return [sys.executable, "-m", "sft_space", "train", str(data), "--model", str(model), "--output-dir",
            str(runs_dir), *FAST, *flags]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- the batch of an optimizer step ---------------------------------------------------------------------------


def test_the_examples_of_a_step_are_shared_exactly_among_the_processes():
    # A chosen batch is kept, and the accumulation divided.
    assert distributed.split_step(2, 6, 3, batch_chosen=True) == distributed.StepSplit(3, 2, 2, 12)
    # A batch chosen to fit memory is lowered so that the default accumulation of 1 stays 1 optimizer step's worth:
    # 8 examples on 4 processes are 4 × 2, not 4 × 8.
    assert distributed.split_step(8, 1, 4, batch_chosen=False) == distributed.StepSplit(4, 2, 1, 8)
    assert distributed.split_step(8, 3, 2, batch_chosen=False) == distributed.StepSplit(2, 6, 2, 24)
    assert distributed.split_step(1, 3, 1, batch_chosen=False) == distributed.StepSplit(1, 1, 3, 3)
    for batch in range(1, 9):
        for accumulation in range(1, 9):
            for processes in (2, 3, 4):
                for chosen in (True, False):
                    try:
                        split = distributed.split_step(batch, accumulation, processes, chosen)
                    except UserError:
                        continue
                    assert split.processes * split.batch_size * split.accumulation == batch * accumulation
                    assert split.batch_size <= batch and (split.batch_size == batch or not chosen)
    assert distributed.split_step(2, 6, 3, True).reason() == (
        "3 processes, one per device: 3 × batch 2 × accumulation 2 = 12 examples per optimizer step, as the settings "
        "make it on one device")


def test_a_step_that_cannot_be_shared_exactly_is_refused_with_the_nearest_settings():
    with pytest.raises(UserError) as refusal:
        distributed.split_step(2, 3, 2, batch_chosen=True)
    assert str(refusal.value) == (
        "batch size 2 × gradient accumulation 3 = 6 examples per optimizer step cannot be shared exactly among 2 "
        "processes, each keeping batch size 2. Set the gradient accumulation to 2 (4 examples per step) or 4 (8 "
        "examples per step), or train with a number of processes that divides it.")
    with pytest.raises(UserError, match=r"what fits this machine's memory\) × gradient accumulation 1 = 1 example per .* "
                                        r"among 3 processes. Set the gradient accumulation to 3 \(3 examples"):
        distributed.split_step(1, 1, 3, batch_chosen=False)


STAND_IN = '''
import gc, json, sys

# The collector's passes over transformers' import graph, while importing and again at the interpreter's exit, are
# seconds of CPU per process; that graph is never garbage here, so it is kept out of them.
gc.disable()
import torch, torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments
from sft_space import distributed

gc.enable()
gc.freeze()

class Counting(torch.nn.Module):
    """A stand-in model that counts the examples it is given."""
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = 0
    def forward(self, x):
        self.seen += x.shape[0]
        return {"loss": (self.weight * x.float()).mean()}

class Examples(torch.utils.data.Dataset):
    def __len__(self): return 600
    def __getitem__(self, i): return {"x": torch.tensor([i])}

class PerStep(TrainerCallback):
    def __init__(self, model):
        self.model, self.counts = model, []
    def on_step_end(self, args, state, control, **kwargs):
        seen = torch.tensor([self.model.seen]); dist.all_reduce(seen)
        self.counts.append(int(seen)); self.model.seen = 0

results = []
# Trainer after Trainer in the same processes and process group, each with the split of its settings.
for batch, accumulation, chosen in json.loads(sys.argv[1]):
    split = distributed.split_step(batch, accumulation, distributed.world_size(), chosen)
    model = Counting()
    counting = PerStep(model)
    args = TrainingArguments(output_dir=sys.argv[2] + ".trainer", per_device_train_batch_size=split.batch_size,
                             gradient_accumulation_steps=split.accumulation, max_steps=3, use_cpu=True, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, remove_unused_columns=False,
                             ddp_find_unused_parameters=False, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=Examples(), callbacks=[counting]).train()
    results.append({"split": [split.batch_size, split.accumulation], "counts": counting.counts})
if distributed.is_main():
    open(sys.argv[2], "w").write(json.dumps(results))
dist.destroy_process_group()  # as distributed.leave does at the end of a run
'''


@pytest.mark.slow
def test_each_optimizer_step_sees_the_settings_examples_on_2_processes(tmp_path, monkeypatch):
    """Counted by a stand-in model inside transformers' Trainer (what our runs train with), under torch's launcher:
    the examples of every optimizer step, all processes together, are batch × accumulation. Each of the settings
    below is one Trainer, one after the other in the same 2 processes (one launch: starting processes that import
    the Trainer is most of the cost). Other numbers of processes (3, 4) are the same Trainer with another world
    size: their splits are the arithmetic that
    test_the_examples_of_a_step_are_shared_exactly_among_the_processes checks."""
    settings = [  # batch, accumulation, batch chosen; each process's batch and accumulation
        # The default accumulation of 1: each process takes its share of the batch (rounding the accumulation, as
        # before, gave every process the whole batch: 8 examples a step).
        ((4, 1, False), [2, 1]),
        # A batch chosen to fit memory (4) lowered to 3, which does not divide it, and accumulated twice.
        ((4, 3, False), [3, 2]),
        # A chosen batch is kept, and the accumulation is what is divided.
        ((2, 4, True), [2, 2]),
    ]
    script, out = tmp_path / "stand_in.py", tmp_path / "counts.json"
    script.write_text(STAND_IN)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    code = distributed.launch([str(script), json.dumps([given for given, _ in settings]), str(out)],
                              distributed.Launch(nproc_per_node=2))
    assert code == 0
    assert json.loads(out.read_text()) == [
        {"split": per_process, "counts": [batch * accumulation] * 3}
        for (batch, accumulation, _), per_process in settings]


# ---- which process this is, and launching ---------------------------------------------------------------------


def test_every_launchers_environment_is_read_in_one_place():
    torchrun = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
    assert distributed.processes(torchrun) == distributed.Processes(5, 1, 8, 4, "torchrun")
    srun = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
    assert distributed.processes(srun) == distributed.Processes(3, 1, 4, 2, "srun")
    # A shell inside a Slurm allocation is one process, not one of several.
    assert distributed.processes({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == distributed.Processes()
    assert distributed.processes({}) == distributed.Processes()


def test_processes_default_to_one_per_gpu_and_can_be_asked_for(monkeypatch):
    monkeypatch.delenv(environment_variable("processes"), raising=False)
    assert distributed.processes_wanted() == 1  # no GPU here
    assert distributed.processes_wanted(3) == 3
    monkeypatch.setenv(environment_variable("processes"), "2")
    assert distributed.processes_wanted() == 2
    assert not distributed.started_by_a_launcher() and distributed.is_main()


def test_torchruns_flags_become_torchs_launch_configuration():
    alone = distributed.Launch(nproc_per_node=4).config()
    # One machine: c10d on a port the system gives, so two runs never race for one.
    assert (alone.rdzv_backend, alone.rdzv_endpoint, alone.nproc_per_node, alone.max_restarts) == (
        "c10d", "127.0.0.1:0", 4, 0)
    joined = distributed.Launch(2, 2, None, "10.0.0.1:29500").config()
    assert (joined.rdzv_backend, joined.rdzv_endpoint, joined.min_nodes, joined.max_nodes, joined.run_id) == (
        "c10d", "10.0.0.1:29500", 2, 2, distributed.RENDEZVOUS_ID)
    numbered = distributed.Launch(8, 2, 1, "10.0.0.1:29500").config()
    assert (numbered.rdzv_backend, numbered.rdzv_configs["rank"]) == ("static", 1)
    for launch, words in [(distributed.Launch(2, 2), "needs --rdzv-endpoint"),
                          (distributed.Launch(2, 2, 2, "h:1"), "not one of the 2 machines"),
                          (distributed.Launch(2, 2, None, "10.0.0.1"), "is not HOST:PORT")]:
        with pytest.raises(UserError, match=words):
            launch.config()
    assert not distributed.Launch(1, 1).needed and distributed.Launch(1, 2).needed


def test_the_launcher_starts_the_processes_without_loading_the_training_libraries(monkeypatch):
    """The process that launches the others only waits for them: transformers (a second of CPU, quieted where it
    is loaded) is for the processes that train."""
    from sft_space import cli

    quieted, launched = [], []
    monkeypatch.setattr(cli, "_quiet_libraries", lambda: quieted.append(True))
    monkeypatch.setattr(distributed, "launch", lambda arguments, how: launched.append((arguments, how)) or 0)
    assert cli.main(["train", "data.jsonl", "--nproc-per-node", "2"]) == 0
    assert launched == [(["-m", "sft_space", "train", "data.jsonl", "--nproc-per-node", "2"], distributed.Launch(2))]
    assert not quieted


def test_a_stopped_process_exits_0_under_an_agent_and_tells_our_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv(distributed.OUTCOMES_VARIABLE, str(tmp_path))
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert distributed.exit_status(130) == 0 and (tmp_path / "1").read_text() == "130"
    assert distributed.exit_status(1) == 1
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert distributed.exit_status(130) == 130


# ---- agreeing through the store -------------------------------------------------------------------------------


def group_of(size):
    """`size` stand-in processes (threads) of one run, each with its own client of one store, as processes have."""
    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    members = []
    for number in range(size):
        client = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=10))
        members.append(distributed.Group(client, number, size, threading.Event(), lambda: InterruptedError("stop")))
    return server, members


def in_every_member(members, work, timeout=10):
    """Run `work(member)` in a thread per member; each one's result or error. A member still running after
    `timeout` fails the test: a hang."""
    outcomes = [None] * len(members)

    def run(number):
        try:
            outcomes[number] = ("ok", work(members[number]))
        except BaseException as err:  # noqa: BLE001 - the test compares what each member raised
            outcomes[number] = ("error", err)

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(len(members))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a process was left waiting"
    for member in reversed(members):  # as processes end: the main one, which may host the store, last
        member.close()
    return outcomes


def test_what_the_main_process_prepares_reaches_every_process_and_so_does_its_refusal():
    _server, members = group_of(3)
    big = bytes(range(256)) * 40_000  # 10 MB: over the store's largest value, so it travels in pieces
    outcomes = in_every_member(members, lambda member: member.from_main(lambda: ("data", big)))
    assert all(outcome == ("ok", ("data", big)) for outcome in outcomes)

    def refuse():
        raise UserError("A run named x already exists")

    outcomes = in_every_member(members, lambda member: member.from_main(refuse))
    assert [(kind, str(err)) for kind, err in outcomes] == [("error", "A run named x already exists")] * 3


def test_a_fingerprint_that_differs_is_an_error_in_every_process_never_a_hang():
    _server, members = group_of(3)
    summaries = [{"training data": "a1", "batch size": 2}, {"training data": "a1", "batch size": 2},
                 {"training data": "ff", "batch size": 2}]
    outcomes = in_every_member(members, lambda member: member.check_same(summaries[member.rank]))
    assert {kind for kind, _ in outcomes} == {"error"}
    messages = {str(err) for _, err in outcomes}
    assert messages == {"The processes of this run would not train the same thing, so none starts: process 2 differs "
                        "from process 0 in training data a1 vs ff. Give every machine the same data, model, settings "
                        "and library versions, and start them all with the same command."}
    outcomes = in_every_member(members, lambda member: member.check_same(summaries[0]))
    assert outcomes == [("ok", None)] * 3


def test_a_stop_heard_by_one_process_reaches_all_and_ends_a_meeting_in_every_one():
    _server, members = group_of(3)
    started = time.monotonic()

    def meet(member):
        if member.rank == 2:  # it never comes: it heard a stop (a signal to this process alone) and left
            member.stop_event.set()
            raise member.stopped()
        return member.check_same({"training data": "a1"})

    outcomes = in_every_member(members, meet)
    assert [type(err) for _, err in outcomes] == [InterruptedError] * 3
    assert all(member.stop_event.is_set() for member in members)
    assert time.monotonic() - started < 5
    # The main process, asked to stop while it prepares, says so to the others, who were waiting for it.
    _server, members = group_of(2)
    members[1].stop_event.set()

    def prepare_until_stopped():
        assert members[0].stop_event.wait(5)  # heard through the store
        raise InterruptedError("stopped while checking the data")

    outcomes = in_every_member(members, lambda member: member.from_main(prepare_until_stopped))
    assert [str(err) for _, err in outcomes] == ["stopped while checking the data"] * 2


# ---- end to end -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_train_one_run_stop_together_and_resume_on_two_machines(tmp_path, tiny_model_dir, write_jsonl):
    """One run folder, one adapter, every step once, 4 examples per optimizer step as the settings say; a stop
    (one signal to the launcher's group, as the app's Stop or Ctrl+C) reaches both processes, which save the same
    step, and the launcher exits 130; two "machines" on this host then meet in a c10d rendezvous and finish it."""
    data = write_jsonl(persona_chats(48))
    runs_dir = tmp_path / "runs"
    # Each step is a tenth of a second here: the stop, pressed after step 3, comes long before step 12.
    process = subprocess.Popen(train_command(data, tiny_model_dir, runs_dir, "--nproc-per-node", "2", "--max-steps",
                                             "12", "--save-every", "4", "--sample-prompts", "0", "--run-name", "two",
                                             "--batch-size", "2", "--gradient-accumulation", "2"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in process.stdout:
        if "step 3 of" in line:
            break
    pressed = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == distributed.EXIT_STOPPED, output[-3000:]
    assert time.monotonic() - pressed < STOP_TARGET_SECONDS
    assert [p.name for p in runs_dir.iterdir() if not p.name.startswith(".")] == ["two"]
    folder = runs.RunFolder(runs_dir / "two")
    record = folder.read()
    assert record["status"] == runs.STOPPED and folder.has_adapter
    assert (record["plan"]["processes"], record["plan"]["batch_size"], record["plan"]["examples_per_step"]) == (2, 2, 4)
    assert ("2 processes, one per device: 2 × batch 2 × accumulation 1 = 4 examples per optimizer step, as the "
            "settings make it on one device") in record["plan"]["reasons"]
    step = int(folder.last_checkpoint().name.removeprefix("checkpoint-"))
    assert json.loads((folder.last_checkpoint() / "trainer_state.json").read_text())["global_step"] == step

    endpoint = f"127.0.0.1:{free_port()}"
    # Each "machine" takes one of this host's 2 cores, as it would have its own (with 2 threads each, 4 threads
    # share 2 cores and spin waiting for one another: seconds of CPU).
    one_core = {**os.environ, "OMP_NUM_THREADS": "1"}
    machines = [subprocess.Popen([sys.executable, "-m", "sft_space", "train", "--resume", str(folder.path), "--nnodes",
                                  "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint],
                                 env=one_core, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
    outputs = [machine.communicate(timeout=300)[0] for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    record = folder.read()
    assert record["status"] == runs.FINISHED and folder.has_adapter
    # Each process keeps its own random state in a checkpoint: proof that two trained.
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in folder.last_checkpoint().iterdir()}
    losses = [m for m in folder.read_metrics() if "loss" in m]
    steps = [m["step"] for m in losses]
    assert steps == sorted(set(steps)) and steps[-1] == 12, steps
    assert sum(m["loss"] for m in losses[-3:]) / 3 < losses[0]["loss"]
    # The main process speaks for all.
    assert sum(line == "Training…" for output in outputs for line in output.splitlines()) == 1


@pytest.mark.slow
def test_a_stop_heard_by_one_process_before_step_1_ends_every_process(tmp_path, tiny_model_dir, write_jsonl):
    """Two processes as torchrun (or two machines) would start them; a stop reaches only the one that is not the
    main one, while the main one checks the data: both end, stopped, well within the stop target, and no step
    was trained."""
    data = write_jsonl(persona_chats(48))
    runs_dir = tmp_path / "runs"
    port = str(free_port())
    processes = []
    for number in range(2):
        env = {**os.environ, "RANK": str(number), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        processes.append(subprocess.Popen(train_command(data, tiny_model_dir, runs_dir, "--max-steps", "24",
                                                        "--sample-prompts", "0", "--gradient-accumulation", "2"),
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for line in processes[0].stdout:
        if "Checking the data" in line:
            break
    processes[1].send_signal(signal.SIGINT)
    pressed = time.monotonic()
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert time.monotonic() - pressed < STOP_TARGET_SECONDS
    assert [process.returncode for process in processes] == [distributed.EXIT_STOPPED] * 2, outputs
    for folder in (runs_dir.iterdir() if runs_dir.exists() else []):
        assert runs.RunFolder(folder).read()["status"] == runs.STOPPED
        assert not runs.RunFolder(folder).read_metrics()


# ---- sharding (FSDP): the memory estimate ---------------------------------------------------------------------


def test_the_memory_estimate_of_a_model_sharded_over_several_gpus():
    """Each GPU holds its share of the decoder layers, two whole layers while it computes, and the root; the
    adapter and its optimizer state are shared too; what a step's tokens take is each GPU's own."""
    from sft_space.memory import GIB, ModelShape, estimate_memory

    # Qwen2.5-7B's shape, written out (building it on the meta device takes seconds).
    hidden, intermediate, kv, layers = 3584, 18944, 512, 28
    linears = ((hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, intermediate),
               (hidden, intermediate), (intermediate, hidden)) * layers
    shape = ModelShape(7_615_616_512, 152064 * hidden, hidden, intermediate, layers, 152064, linears, kv)
    step = {"tokens_per_step": 2048, "precision": "bf16", "gradient_checkpointing": True, "sequence_length": 2048,
            "packed": True}
    alone = estimate_memory(shape, **step)
    assert estimate_memory(shape, **step, shards=1) == alone
    four = estimate_memory(shape, **step, shards=4)
    embeddings = shape.embedding_parameters * 2 / GIB
    layers = alone.weights_gib - embeddings
    assert four.weights_gib == pytest.approx(embeddings + layers / 4 + 2 * layers / shape.num_layers)
    assert four.adapter_and_optimizer_gib == pytest.approx(alone.adapter_and_optimizer_gib / 4)
    assert (four.activations_gib, four.logits_gib, four.masks_gib) == (
        alone.activations_gib, alone.logits_gib, alone.masks_gib)
    # A 7B model in 16 bit does not fit one 16 GB GPU, and does when 4 of them share it.
    assert alone.total_gib > 16 > four.total_gib
    eight = estimate_memory(shape, **step, shards=8)
    assert eight.total_gib < four.total_gib


def test_the_plan_says_what_sharding_would_take_when_the_model_fits_no_single_gpu():
    from sft_space.hardware import Hardware, plan_training
    from sft_space.memory import ModelShape
    from sft_space.settings import RunSettings

    # A 70B model (Llama 3.1 70B's shape) on four 24 GB GPUs: no plan fits one of them, even in 4 bit.
    hidden, intermediate, kv, layers = 8192, 28672, 1024, 80
    linears = ((hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, intermediate),
               (hidden, intermediate), (intermediate, hidden)) * layers
    shape = ModelShape(70_553_706_496, 128256 * hidden, hidden, intermediate, layers, 128256, linears, kv)
    plan = plan_training(RunSettings(max_length=1024), Hardware("cuda", "NVIDIA A10G", 22.0, (8, 6), device_count=4),
                         shape, 100_000, 1024)
    assert not plan.fits
    sharded = [reason for reason in plan.reasons if reason.startswith("sharded across the 4 GPUs with FSDP it would "
                                                                      "still take about ")]
    # In 4 bit each GPU quantizes the whole model as it loads, before FSDP shares it out: 37 GiB.
    assert len(sharded) == 1 and not plan.sharded
    assert float(sharded[0].split("about ")[1].split(" GiB")[0]) > 22
    one_gpu = plan_training(RunSettings(max_length=1024), Hardware("cuda", "NVIDIA A10G", 22.0, (8, 6)), shape,
                            100_000, 1024)
    assert not any(reason.startswith("sharded") for reason in one_gpu.reasons)
