"""The doctor: whether this machine trains, proved by short real trainings of each plan it supports.

It says what the machine is (GPUs, memory, compute capability, driver and CUDA, library versions, bf16 / fp16 /
TF32, SDPA and flash attention), then trains with the recipe people run (`train.train`), a few steps per plan:
the default plan, fp16 forced (a T4's path, tested on any GPU), 4-bit QLoRA, gradient checkpointing on and off,
packing on and off, and 2 processes where there are 2 GPUs, data-parallel and sharded (FSDP: the adapter saved
whole and the held-out prompts answered by the processes together). Each becomes a row: tokens/s, the peak memory
measured beside the memory estimator's figure for the same plan (`memory.estimate_memory`), the loss before and
after, and passed, failed or skipped with the reason. The quick pass trains the built-in SmolLM2-135M (or the
model named); the full pass adds model shapes with random weights (speed and memory need no real weights) up to
the largest the estimator says fits, and the benchmark against TRL's defaults on its GPU shapes.

Every training sees one conversation repeated, about one sequence long: each batch is the same, so the loss
after the last step is comparable with the loss of the first (computed before any update), and each sequence
holds the tokens the estimate counts, packed or not.

    python -m sft_space doctor [--quick] [--json] [--out DIR]
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from . import catalog, models
from .catalog import CatalogModel
from .errors import UserError
from .hardware import Hardware, TrainingPlan, detect_hardware, plan_training
from .memory import GIB, ModelShape, estimate_memory
from .settings import DoctorSettings, RunSettings, run_settings, to_command_line, train_command

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
# How the doctor's progress lines begin on stderr (the app's check shows the lines that do).
STATUS_PREFIX = "doctor: "
# The libraries whose versions the machine's facts list (bitsandbytes: the 4-bit path).
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes")
# A few steps per plan: enough for a speed past the first step and a loss that moves, few enough that the quick
# pass takes minutes. On a CPU every step is seconds, so fewer and shorter.
GPU_STEPS, CPU_STEPS = 10, 3
# Tokens per sequence: on a GPU the length the memory estimate was calibrated at (1,024: docs/BENCHMARKS.md); on a
# CPU short, as its plan packs only short examples.
GPU_SEQUENCE_TOKENS, CPU_SEQUENCE_TOKENS = 1024, 128
# Copies of the conversation: enough that a run of GPU_STEPS steps at the largest batch never runs out of them.
REPEATS = 256
# A learning rate that moves a repeated batch's loss within a few steps, constant (no warm-up to wait through).
LEARNING_RATE = 1e-3
# Model shapes with random weights for the full pass, from published configs: on a GPU up to the largest the
# estimator says fits; on a CPU a tiny one, so that the whole pass stays within two minutes.
GPU_SHAPES = {
    "Llama-3.2-1B": catalog.entry("meta-llama/Llama-3.2-1B-Instruct"),
    "Qwen2.5-3B": catalog.entry("Qwen/Qwen2.5-3B-Instruct"),
    "Llama-3.1-8B": CatalogModel("Llama-3.1-8B", "llama", 4096, 14336, 32, 32, 8, 128256, False, "llama3.1"),
}
CPU_SHAPES = {"tiny": CatalogModel("tiny", "llama", 64, 128, 2, 4, 2, 49152, True, "apache-2.0")}
# The benchmark's GPU shapes (`bench --shape`), run in the full pass with the ratio to TRL's defaults.
BENCH_SHAPES = ("smollm2-135m", "llama-3.2-1b")
GPU_MEASURE = "GPU: torch.cuda.max_memory_allocated"
CPU_MEASURE = "CPU: growth of the process's peak resident memory (VmHWM)"
REPLY_WORDS = ("the ship sails north at dawn while the crew checks ropes maps and the weather report before lunch "
               "a captain writes down every course change so that the log stays honest and clear").split()


@dataclass(frozen=True)
class Check:
    """One plan the doctor trains: the settings it changes from a run's defaults, and what it needs."""

    plan: str
    changes: tuple[tuple[str, Any], ...] = ()
    processes: int = 1
    needs_gpu: bool = False
    needs_bitsandbytes: bool = False


CHECKS = (
    Check("default"),
    # What a T4 runs; on bf16 hardware too, so that a T4 Space's path is tested on any GPU.
    Check("fp16", (("precision", "fp16"),), needs_gpu=True),
    Check("4-bit QLoRA", (("quantization", "4bit"),), needs_gpu=True, needs_bitsandbytes=True),
    Check("checkpointing on", (("gradient_checkpointing", "on"),)),
    Check("checkpointing off", (("gradient_checkpointing", "off"),)),
    Check("packing", (("packing", True),)),
    Check("no packing", (("packing", False),)),
    Check("2 processes", processes=2, needs_gpu=True),
    # The sharded path's every part: training, the adapter gathered from both processes, answers given together.
    Check("FSDP", (("shard", "on"), ("sample_prompts", 2)), processes=2, needs_gpu=True),
)


@dataclass
class Row:
    """One training of the doctor, or why it was not run."""

    plan: str
    shape: str
    status: str
    reason: str
    steps: int | None = None
    tokens_per_second: float | None = None
    peak_memory_gib: float | None = None
    estimated_memory_gib: float | None = None
    ratio: float | None = None  # measured peak / estimate
    loss_before: float | None = None
    loss_after: float | None = None
    seconds: float | None = None
    speedup_vs_trl: float | None = None  # the benchmark's rows


# ---------------------------------------------------------------------------------------------- the machine


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version, as nvidia-smi reports it (None without it)."""
    try:
        answer = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = answer.stdout.split()
    return lines[0] if answer.returncode == 0 and lines else None


def machine_facts(hardware: Hardware) -> dict[str, Any]:
    """What this machine is, for the report's head and for a bug report."""
    import torch

    gpus = []
    if hardware.kind == "cuda":
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"name": props.name, "memory_gib": round(props.total_memory / GIB, 1),
                         "capability": f"{props.major}.{props.minor}"})
    ampere = hardware.kind == "cuda" and (hardware.capability or (0, 0)) >= (8, 0)
    return {
        "description": hardware.describe(),
        "kind": hardware.kind,
        "gpus": gpus,
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(hardware.memory_gib, 1) if hardware.kind == "cpu" else None,
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in LIBRARIES},
        "cuda": torch.version.cuda,
        "nvidia_driver": nvidia_driver() if hardware.kind == "cuda" else None,
        "bf16": hardware.supports_bf16,
        "fp16": hardware.kind == "cuda",
        # TF32 matrix units came with Ampere (compute capability 8.0).
        "tf32": ampere,
        "sdpa": hasattr(torch.nn.functional, "scaled_dot_product_attention"),
        "flash_attention": hardware.kind == "cuda" and ampere and torch.backends.cuda.is_flash_attention_available(),
        "flash_attn_package": _version("flash-attn"),
        "memory_measure": GPU_MEASURE if hardware.kind == "cuda" else CPU_MEASURE,
    }


def describe_machine(facts: dict[str, Any]) -> list[str]:
    """The machine's facts as lines of text."""
    def yes(value: Any) -> str:
        return "yes" if value else "no"

    lines = [f"Machine: {facts['description']}"]
    for index, gpu in enumerate(facts["gpus"]):
        lines.append(f"  GPU {index}: {gpu['name']}, {gpu['memory_gib']} GiB, compute capability {gpu['capability']}")
    if facts["kind"] == "cuda":
        lines.append(f"  CUDA {facts['cuda']}, NVIDIA driver {facts['nvidia_driver'] or 'unknown'}")
    versions = ", ".join(f"{name} {version or 'not installed'}" for name, version in facts["versions"].items())
    lines.append(f"  Python {facts['python']}; {versions}")
    lines.append(f"  bf16 {yes(facts['bf16'])} · fp16 {yes(facts['fp16'])} · TF32 {yes(facts['tf32'])} · SDPA "
                 f"{yes(facts['sdpa'])} · flash attention {yes(facts['flash_attention'])} (flash-attn package: "
                 f"{facts['flash_attn_package'] or 'not installed'})")
    lines.append(f"  Peak memory measured as {facts['memory_measure']}")
    return lines


# ---------------------------------------------------------------------------------------------- planning


def skip_reason(check: Check, hardware: Hardware, bitsandbytes_installed: bool) -> str:
    """Why this machine cannot train `check` ("" when it can)."""
    gpus = hardware.device_count if hardware.kind == "cuda" else 0
    if check.processes > 1 and check.processes > gpus:
        return f"needs {check.processes} GPUs, one per process; this machine has {gpus or 'none'}"
    if check.needs_gpu and not gpus:
        what = {"fp16": "fp16 mixed precision", "4-bit QLoRA": "4-bit (QLoRA) loading"}.get(check.plan, check.plan)
        return f"{what} needs a CUDA GPU; this machine has none"
    if check.needs_bitsandbytes and not bitsandbytes_installed:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    return ""


def check_settings(check: Check, base: RunSettings) -> RunSettings:
    return dataclasses.replace(base, **dict(check.changes))


def _same_plan_key(plan: TrainingPlan, processes: int) -> tuple:
    return (plan.device, plan.precision, plan.four_bit, plan.gradient_checkpointing, plan.batch_size,
            plan.sequence_length, plan.packing, plan.sharded, processes)


def plan_summary(plan: TrainingPlan) -> str:
    """A plan in a few words: precision, weights, checkpointing, batch and sequences."""
    parts = [plan.precision, "4-bit weights" if plan.four_bit else "16-bit weights" if plan.precision != "fp32"
             else "fp32 weights", f"checkpointing {'on' if plan.gradient_checkpointing else 'off'}",
             f"batch {plan.batch_size}", f"{'packed' if plan.packing else 'unpacked'} sequences of "
             f"{plan.sequence_length}"] + (["sharded (FSDP)"] if plan.sharded else [])
    return ", ".join(parts)


@dataclass
class Planned:
    """A check as this machine would train it: its settings and plan, or why it is skipped."""

    check: Check
    settings: RunSettings | None = None
    plan: TrainingPlan | None = None
    skipped: str = ""


def plan_checks(checks: tuple[Check, ...], base: RunSettings, hardware: Hardware, shape: ModelShape,
                total_tokens: int, longest_example: int, bitsandbytes_installed: bool) -> list[Planned]:
    """Each check resolved for this machine, as `hardware.plan_training` resolves a run: skipped when the machine
    cannot train it, when it is the same plan as an earlier check (which covers it), or when the estimate says it
    does not fit."""
    planned: list[Planned] = []
    seen: dict[tuple, str] = {}
    for check in checks:
        reason = skip_reason(check, hardware, bitsandbytes_installed)
        if reason:
            planned.append(Planned(check, skipped=reason))
            continue
        settings = check_settings(check, base)
        try:
            plan = plan_training(settings, hardware, shape, total_tokens, longest_example, check.processes)
        except UserError as err:
            planned.append(Planned(check, settings, skipped=str(err)))
            continue
        key = _same_plan_key(plan, check.processes)
        if key in seen:
            planned.append(Planned(check, settings, plan, f"the same plan as the '{seen[key]}' row "
                                                          f"({plan_summary(plan)}), which covers it"))
            continue
        seen[key] = check.plan
        if not plan.fits:
            planned.append(Planned(check, settings, plan, f"the memory estimate ({plan.estimated_peak_gib:.1f} GiB) "
                                                          f"is over what this GPU holds ({hardware.memory_gib:.0f} "
                                                          "GiB)"))
            continue
        planned.append(Planned(check, settings, plan))
    return planned


def estimated_allocated_gib(plan: TrainingPlan, shape: ModelShape, lora_rank: int, processes: int = 1) -> float:
    """The estimator's figure for what the peak-memory measure reports: on a GPU what max_memory_allocated counts
    (the runtime's own overhead left out), on a CPU the same sum. The same terms the planner weighed; a sharded
    plan's, each GPU's."""
    estimate = estimate_memory(shape, plan.batch_size * plan.sequence_length, plan.precision, plan.four_bit,
                               plan.gradient_checkpointing, lora_rank, gpu=plan.device == "cuda",
                               sequence_length=plan.sequence_length, packed=plan.packing,
                               shards=processes if plan.sharded else 1)
    return estimate.allocated_gib


# ---------------------------------------------------------------------------------------------- the data


def write_training_data(tokenizer: Any, target_tokens: int, folder: Path) -> tuple[Path, int]:
    """A JSONL file of one conversation, repeated, whose tokens (as the chat template renders it) are at most
    `target_tokens`; returns the file and the conversation's length in tokens."""
    from .render import render_conversation

    def conversation(words: int) -> list[dict[str, str]]:
        reply = " ".join(REPLY_WORDS[i % len(REPLY_WORDS)] for i in range(words))
        return [{"role": "user", "content": "Tell me about the ship's log."},
                {"role": "assistant", "content": reply.capitalize() + "."}]

    low, high = 1, target_tokens
    while low < high:  # the most words whose rendering fits in target_tokens
        middle = (low + high + 1) // 2
        if render_conversation(tokenizer, conversation(middle)).n_tokens <= target_tokens:
            low = middle
        else:
            high = middle - 1
    messages = conversation(low)
    tokens = render_conversation(tokenizer, messages).n_tokens
    path = folder / "doctor.jsonl"
    line = json.dumps({"messages": messages})
    path.write_text("\n".join([line] * REPEATS) + "\n", encoding="utf-8")
    return path, tokens


def base_settings(source: Path, model: str, sequence_tokens: int, steps: int, output_dir: Path) -> RunSettings:
    """The settings every check starts from: a run's defaults, short, on the repeated conversation."""
    return run_settings(source=str(source), model=model, max_length=sequence_tokens, max_steps=steps,
                        keep_duplicates=True, validation_fraction=0.0, sample_prompts=0, save_every=10**9,
                        learning_rate=LEARNING_RATE, lr_scheduler="constant_with_warmup", warmup_ratio=0.0,
                        output_dir=str(output_dir))


# ---------------------------------------------------------------------------------------------- measuring


class PeakMemory:
    """The peak memory of what runs between `start` and `stop`: on a GPU torch's allocator high-water mark; on a
    CPU the growth of the process's peak resident memory (Linux: VmHWM, reset through /proc/self/clear_refs)."""

    def __init__(self, gpu: bool):
        self.gpu = gpu
        self.before_kib = 0

    def start(self) -> None:
        if self.gpu:
            import torch

            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.before_kib = _proc_status_kib("VmRSS") or 0

    def stop(self) -> float | None:
        if self.gpu:
            import torch

            return torch.cuda.max_memory_allocated() / GIB
        peak = _proc_status_kib("VmHWM")
        return None if peak is None else max(0, peak - self.before_kib) / 1024**2


def _proc_status_kib(field: str) -> int | None:
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def _losses(entries: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    losses = [float(entry["loss"]) for entry in entries if "loss" in entry]
    return (losses[0], losses[-1]) if losses else (None, None)


def judge(row: Row, planned_steps: int, record: dict[str, Any], plan: TrainingPlan) -> Row:
    """Passed when every step trained, the loss stayed finite and fell on the repeated batch, and the plan was the
    one asked for (an out-of-memory retry means the estimate let it down)."""
    trained_plan = record.get("plan") or {}
    problems = []
    if record.get("status") != "finished" or row.steps != planned_steps:
        problems.append(f"the run ended {record.get('status')} at step {row.steps} of {planned_steps}"
                        + (f": {record['error']}" if record.get("error") else ""))
    if row.loss_before is None or row.loss_after is None or not all(map(math.isfinite,
                                                                       (row.loss_before, row.loss_after))):
        problems.append(f"the loss is not a finite number ({row.loss_before} → {row.loss_after})")
    elif row.loss_after >= row.loss_before:
        problems.append(f"the loss did not fall ({row.loss_before:.3f} → {row.loss_after:.3f}) on a batch it saw "
                        f"{planned_steps} times")
    retried = [reason for reason in trained_plan.get("reasons", []) if reason.startswith("out of memory")]
    if retried:
        problems.append("out of memory in the plan as estimated; the recipe retried with " + "; ".join(retried))
    row.status = FAILED if problems else PASSED
    row.reason = "; ".join(problems) if problems else plan_summary(plan)
    return row


def sharded_problems(folder: Any, record: dict[str, Any], settings: RunSettings, shape: ModelShape) -> list[str]:
    """What a sharded run got wrong beyond training: it trained unsharded, its adapter was not saved whole (each
    process holds a share of each weight), or its held-out prompts were not all answered (the processes answer
    them together)."""
    from safetensors import safe_open

    from .runs import ADAPTER_WEIGHTS

    problems = []
    if not (record.get("plan") or {}).get("sharded"):
        problems.append("the run did not shard the model (its plan in run.json says so)")
    adapter = folder.adapter_path / ADAPTER_WEIGHTS
    if not adapter.is_file():
        problems.append("no adapter was saved")
    else:
        with safe_open(str(adapter), "pt") as weights:
            saved = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
        if saved != shape.lora_parameters(settings.lora_r):
            problems.append(f"the saved adapter is not whole: {saved:,} weights of the "
                            f"{shape.lora_parameters(settings.lora_r):,} its layers have")
    try:
        samples = json.loads(folder.samples_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        samples = []
    answered = sum(1 for sample in samples if "after" in sample and "before" in sample)
    if answered < settings.sample_prompts:
        problems.append(f"{answered} of {settings.sample_prompts} held-out prompts were answered before and after")
    return problems


def _train_here(settings: RunSettings, hardware: Hardware, run_id: str) -> Any:
    from .train import TrainRequest, train

    return train(TrainRequest(settings, run_id=run_id, hardware=hardware))


def processes_command(settings: RunSettings, processes: int, run_id: str) -> list[str]:
    """The command line that trains `settings` as `processes` processes, one per GPU, into the run `run_id`."""
    return [sys.executable, *shlex.split(train_command(settings))[1:], "--nproc-per-node", str(processes),
            "--run-name", run_id]


def _train_in_processes(settings: RunSettings, processes: int, run_id: str) -> Any:
    """The run as `train --nproc-per-node N` starts it (each process its own), its output kept for a failure."""
    from . import runs

    finished = subprocess.run(processes_command(settings, processes, run_id), capture_output=True, text=True)
    folder = Path(settings.output_dir) / run_id
    if not (folder / runs.RUN_FILE).is_file():
        tail = (finished.stderr or finished.stdout).strip().splitlines()[-3:]
        raise UserError(f"train --nproc-per-node {processes} exited {finished.returncode}: {' / '.join(tail)}")
    return runs.RunFolder(folder)


def train_row(planned: Planned, shape_name: str, shape: ModelShape, hardware: Hardware, number: int) -> Row:
    """Train one planned check with the recipe and measure it."""
    from .train import TrainingFailed

    settings, plan, check = planned.settings, planned.plan, planned.check
    row = Row(check.plan, shape_name, FAILED, "", estimated_memory_gib=round(
        estimated_allocated_gib(plan, shape, settings.lora_r, check.processes), 3))
    memory = PeakMemory(hardware.kind == "cuda")
    run_id = f"doctor-{number:02d}"
    started = time.monotonic()
    memory.start()
    try:
        folder = (_train_in_processes(settings, check.processes, run_id) if check.processes > 1
                  else _train_here(settings, hardware, run_id))
    except TrainingFailed as err:
        folder, failure = Path(settings.output_dir) / run_id, str(err)
    except UserError as err:
        row.reason, row.seconds = str(err), round(time.monotonic() - started, 1)
        return row
    else:
        failure = ""
    from . import runs

    row.seconds = round(time.monotonic() - started, 1)
    folder = folder if isinstance(folder, runs.RunFolder) else runs.RunFolder(folder)
    record, entries = folder.read(), folder.read_metrics()
    steps = [entry for entry in entries if "loss" in entry]
    row.steps = steps[-1]["step"] if steps else 0
    row.tokens_per_second = (record.get("final_metrics") or {}).get("tokens_per_second")
    # Several processes: the main one's own peak, which it logs with each step.
    gpu_peaks = [entry["peak_gpu_memory_gib"] for entry in entries if "peak_gpu_memory_gib" in entry]
    peak = max(gpu_peaks) if check.processes > 1 and gpu_peaks else memory.stop()
    row.peak_memory_gib = round(peak, 3) if peak is not None else None
    if row.peak_memory_gib is not None and row.estimated_memory_gib:
        row.ratio = round(row.peak_memory_gib / row.estimated_memory_gib, 2)
    row.loss_before, row.loss_after = _losses(entries)
    judge(row, settings.max_steps, record, plan)
    if plan.sharded and row.status == PASSED and (problems := sharded_problems(folder, record, settings, shape)):
        row.status, row.reason = FAILED, "; ".join(problems)
    if failure and row.status == PASSED:
        row.status, row.reason = FAILED, failure
    return row


# ---------------------------------------------------------------------------------------------- model shapes


def random_model_folder(spec: CatalogModel, tokenizer: Any, folder: Path, gpu: bool) -> Path:
    """A model of `spec`'s shape with random weights, saved (bf16 safetensors) with the built-in tokenizer, so
    that the recipe loads it as it loads any model, 4-bit included. Initialised on the GPU where there is one: a
    few billion parameters initialised on a CPU take minutes."""
    import torch
    from transformers import AutoModelForCausalLM

    config = spec.config(max_position_embeddings=32768, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if gpu else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def _release_memory() -> None:
    from .trainer import release_memory

    release_memory()


def _shape_label(name: str, shape: ModelShape, random_weights: bool) -> str:
    return f"{name} ({catalog.size_label(shape.parameters)}{', random weights' if random_weights else ''})"


# ---------------------------------------------------------------------------------------------- the passes


@dataclass
class Pass:
    """What one shape's trainings share: the model, its shape and data, and where its runs go."""

    model: str
    label: str
    shape: ModelShape
    base: RunSettings


def _prepare_pass(model: str, name: str, random_weights: bool, tokenizer: Any, sequence_tokens: int, steps: int,
                  work: Path) -> Pass:
    from .estimate import model_shape

    shape = model_shape(model)
    source, tokens = write_training_data(tokenizer, sequence_tokens, work)
    base = base_settings(source, model, tokens, steps, work / "runs")
    return Pass(model, _shape_label(name, shape, random_weights), shape, base)


def _run_checks(checks: tuple[Check, ...], shape_pass: Pass, hardware: Hardware, rows: list[Row],
                say: Callable[[str], None]) -> None:
    tokens = shape_pass.base.max_length
    planned = plan_checks(checks, shape_pass.base, hardware, shape_pass.shape, tokens * REPEATS, tokens,
                          _version("bitsandbytes") is not None)
    for item in planned:
        if item.skipped:
            rows.append(Row(item.check.plan, shape_pass.label, SKIPPED, item.skipped))
            continue
        say(f"{STATUS_PREFIX}training '{item.check.plan}' on {shape_pass.label} ({plan_summary(item.plan)})…")
        row = train_row(item, shape_pass.label, shape_pass.shape, hardware, len(rows) + 1)
        rows.append(row)
        outcome = f" ({row.reason})" if row.status != PASSED else ""
        say(f"{STATUS_PREFIX}{row.plan} on {shape_pass.label}: {row.status}{outcome}")


def _bench_rows(hardware: Hardware, steps: int, rows: list[Row], say: Callable[[str], None]) -> None:
    from .bench import SHAPES, run_bench
    from .settings import BenchSettings

    for shape in BENCH_SHAPES:
        parameters = ModelShape.from_config(SHAPES[shape].config()).parameters
        label = f"bench {shape} ({catalog.size_label(parameters)}, random weights)"
        if hardware.kind != "cuda":
            rows.append(Row("bench vs TRL defaults", label, SKIPPED, "the benchmark's GPU shapes need a CUDA GPU; "
                            "this machine has none (its CPU figures: bench --shape embedded, docs/BENCHMARKS.md)"))
            continue
        say(f"{STATUS_PREFIX}benchmark {shape} against TRL's defaults…")
        started = time.monotonic()
        try:
            result = run_bench(BenchSettings(shape=shape, steps=steps))
        except Exception as err:  # reported as the row's failure: the doctor goes on to the next
            rows.append(Row("bench vs TRL defaults", label, FAILED, f"{type(err).__name__}: {err}",
                            seconds=round(time.monotonic() - started, 1)))
            _release_memory()
            continue
        ours, theirs = result["paths"]
        rows.append(Row("bench vs TRL defaults", label, PASSED,
                        f"TRL's defaults: {theirs['tokens_per_second']:,.0f} tokens/s, peak "
                        f"{theirs['peak_memory_gib']} GiB; ours: {ours['notes']}", steps=steps,
                        tokens_per_second=ours["tokens_per_second"],
                        peak_memory_gib=ours["peak_memory_gib"], seconds=round(time.monotonic() - started, 1),
                        speedup_vs_trl=result["speedup"]))
        _release_memory()


def _free_disk_gib(path: Path) -> float:
    return shutil.disk_usage(path).free / GIB


def run_doctor(settings: DoctorSettings, hardware: Hardware | None = None,
               on_status: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The machine's facts and one row per check: {"machine": …, "rows": [Row as a dict, …]}."""
    say = on_status or (lambda message: None)
    hardware = hardware or detect_hardware()
    gpu = hardware.kind == "cuda"
    facts = machine_facts(hardware)
    steps = settings.steps or (GPU_STEPS if gpu else CPU_STEPS)
    sequence_tokens = settings.max_length or (GPU_SEQUENCE_TOKENS if gpu else CPU_SEQUENCE_TOKENS)
    rows: list[Row] = []
    started = time.monotonic()
    model = settings.model or models.default_model()
    if models.needs_preparation(model):
        models.convert_embedded_model(lambda message: say(STATUS_PREFIX + message))
    tokenizer = models.load_tokenizer(model)
    # Loaded before the first measurement, so that the first row's memory is its training's, not the libraries'.
    import peft  # noqa: F401
    import trl  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="sft-space-doctor-") as workdir:
        work = Path(workdir)
        name = "SmolLM2-135M, built-in" if model == models.EMBEDDED_MODEL else Path(model).name or model
        (work / "quick").mkdir()
        quick = _prepare_pass(model, name, False, tokenizer, sequence_tokens, steps, work / "quick")
        _run_checks(CHECKS, quick, hardware, rows, say)
        if not settings.quick:
            # The random-weight shapes speak with the default model's tokenizer: its 49,152 words fit every shape.
            default = models.default_model()
            shapes_tokenizer = tokenizer if model == default else models.load_tokenizer(default)
            _shape_rows(hardware, shapes_tokenizer, sequence_tokens, steps, work, rows, say)
            _bench_rows(hardware, steps, rows, say)
    return {"machine": facts, "settings": asdict(settings), "steps": steps, "sequence_tokens": sequence_tokens,
            "seconds": round(time.monotonic() - started, 1), "rows": [asdict(row) for row in rows]}


def _shape_rows(hardware: Hardware, tokenizer: Any, sequence_tokens: int, steps: int, work: Path,
                rows: list[Row], say: Callable[[str], None]) -> None:
    """The default plan (and 4-bit QLoRA on a GPU) on each random-weight shape the estimator says fits."""
    gpu = hardware.kind == "cuda"
    checks = (CHECKS[0], CHECKS[2]) if gpu else (CHECKS[0],)
    for name, spec in (GPU_SHAPES if gpu else CPU_SHAPES).items():
        shape = ModelShape.from_config(spec.config())
        label = _shape_label(name, shape, True)
        # Saved once in bf16 (loading maps the file), with a margin for the adapter and the run's records.
        needed = 1.25 * shape.parameters * 2 / GIB
        if _free_disk_gib(work) < needed:
            rows.append(Row("default", label, SKIPPED, f"its random weights need ~{needed:.0f} GiB of disk; "
                                                       f"{_free_disk_gib(work):.0f} GiB free"))
            continue
        probe = plan_training(run_settings(max_length=sequence_tokens), hardware, shape, sequence_tokens * REPEATS,
                              sequence_tokens)
        if not probe.fits:
            rows.append(Row("default", label, SKIPPED, f"the memory estimate ({probe.estimated_peak_gib:.1f} GiB) is "
                                                       f"over what this GPU holds ({hardware.memory_gib:.0f} GiB)"))
            continue
        say(f"{STATUS_PREFIX}building {label}…")
        folder = work / name
        folder.mkdir()
        random_model_folder(spec, tokenizer, folder / "model", gpu)
        _release_memory()
        shape_pass = _prepare_pass(str(folder / "model"), name, True, tokenizer, sequence_tokens, steps, folder)
        _run_checks(checks, shape_pass, hardware, rows, say)
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the report


def _number(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def markdown_table(result: dict[str, Any]) -> str:
    """The rows as a Markdown table, headed by the machine, to paste into an issue or docs/BENCHMARKS.md."""
    machine = result["machine"]
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items() if version)
    lines = [f"**{machine['description']}**, {versions}; {result['steps']} steps per row, sequences of up to "
             f"{result['sequence_tokens']} tokens; peak memory: {machine['memory_measure']}; "
             f"{result['seconds']:.0f} s in all.", "",
             "| plan | shape | steps | tokens/s | peak GiB | estimate GiB | ratio | loss before → after | status | "
             "reason |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        loss = (f"{row['loss_before']:.3f} → {row['loss_after']:.3f}" if row["loss_before"] is not None
                and row["loss_after"] is not None else "–")
        ratio = _number(row["ratio"])
        if row.get("speedup_vs_trl") is not None:
            ratio = f"{row['speedup_vs_trl']:.2f}× TRL"
        reason = row["reason"].replace("|", "\\|")
        lines.append(f"| {row['plan']} | {row['shape']} | {_number(row['steps'])} | "
                     f"{_number(row['tokens_per_second'], 0)} | {_number(row['peak_memory_gib'], 3)} | "
                     f"{_number(row['estimated_memory_gib'], 3)} | {ratio} | {loss} | {row['status']} | {reason} |")
    return "\n".join(lines)


def format_report(result: dict[str, Any]) -> str:
    """The machine's facts, then the table."""
    counts = {status: sum(row["status"] == status for row in result["rows"]) for status in (PASSED, FAILED, SKIPPED)}
    summary = f"{counts[PASSED]} passed, {counts[FAILED]} failed, {counts[SKIPPED]} skipped"
    return "\n".join([*describe_machine(result["machine"]), "", markdown_table(result), "", summary])


def write_results(result: dict[str, Any], out: str | Path) -> list[Path]:
    """doctor.json (the object --json prints) and doctor.md (the table) in `out`."""
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        written = [folder / "doctor.json", folder / "doctor.md"]
        written[0].write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        written[1].write_text(markdown_table(result) + "\n", encoding="utf-8")
    except OSError as err:
        raise UserError(f"Could not write the doctor's results to {folder}: {err.strerror or err}.") from None
    return written


def failed(result: dict[str, Any]) -> bool:
    return any(row["status"] == FAILED for row in result["rows"])


# ---------------------------------------------------------------------------------------------- for the app

# The app's check runs as a child process of our command line (a crash inside a kernel, or memory it keeps, stays
# there), one at a time, stopped if it outlasts this.
CHILD_SECONDS = 20 * 60
_ONE_CHECK = threading.Lock()


def check_in_child(settings: DoctorSettings, seconds: float = CHILD_SECONDS) -> Iterator[str | dict[str, Any]]:
    """Run `doctor` with `settings` as a child process: yields its progress lines as they come, then the result
    (the object --json prints). UserError when a check is already running, or when it fails or outlasts
    `seconds`."""
    from .child import child_environment, signal_group

    if not _ONE_CHECK.acquire(blocking=False):
        raise UserError("A check of this hardware is already running; its result shows where it was started.")
    try:
        with tempfile.TemporaryDirectory(prefix="sft-space-doctor-") as out:
            command = [sys.executable, "-m", "sft_space", "doctor", *to_command_line(settings), "--out", out]
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                       env=child_environment(), start_new_session=True)
            watchdog = threading.Timer(seconds, signal_group, (process.pid, signal.SIGKILL))
            watchdog.start()
            tail: list[str] = []
            try:
                for line in process.stderr:
                    # Progress bars of the libraries redraw themselves with carriage returns on the same line.
                    for part in line.split("\r"):
                        tail = [*tail[-4:], part.strip()] if part.strip() else tail
                        if part.startswith(STATUS_PREFIX):
                            yield part[len(STATUS_PREFIX):].strip()
                process.wait()
            finally:
                watchdog.cancel()
                if process.poll() is None:
                    signal_group(process.pid, signal.SIGKILL)
                    process.wait()
            result_file = Path(out) / "doctor.json"
            if not result_file.is_file():
                why = (f"it took longer than {seconds / 60:.0f} minutes" if process.returncode == -signal.SIGKILL
                       else f"it exited with status {process.returncode}: {' / '.join(line for line in tail if line)}")
                raise UserError(f"The check of this hardware did not finish: {why}.")
            yield json.loads(result_file.read_text(encoding="utf-8"))
    finally:
        _ONE_CHECK.release()
