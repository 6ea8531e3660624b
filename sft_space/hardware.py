"""What this machine can do, and the training plan that follows from it — decided here, in one place.

Every "auto" setting is resolved by `plan_training`, and each decision comes with the reason the user sees:
precision (bf16 raises on a T4 and is emulated, slowly, on CPUs without bf16 instructions: chosen, never
assumed), 4-bit loading, gradient checkpointing (~2x slower, so only when memory needs it), the batch size, and
whether the model is sharded across the GPUs (FSDP: only when it fits no single one, or when asked).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import UserError
from .memory import RUNTIME_OVERHEAD_GIB, ModelShape, estimate_memory
from .settings import AUTO, RunSettings

# Keep this share of the device free for fragmentation and the evaluation pass.
USABLE_MEMORY_FRACTION = 0.85
MAX_AUTO_BATCH_SIZE = 16
# On CPU every token costs the same, so a batch beyond one packed sequence only delays the first loss point.
CPU_BATCH_SIZE = 1
# Small datasets packed into max-length sequences would give a handful of optimizer steps per epoch, too
# few to learn from; their packs are made shorter (never shorter than the longest example) to give this many.
MIN_PACKS_PER_EPOCH = 48
# On a CPU, attention over a packed sequence is computed in full under a block-diagonal mask, so a long pack
# costs more than its examples one by one; short packs of short examples still win by saving per-step overhead.
# Measured (docs/BENCHMARKS.md): conversations of ~250 tokens in 1024-token packs trained at 0.65x TRL's
# unpacked defaults and at 1.4-1.5x one by one; the sample data (~85 tokens) trains fastest in packs of ~320.
CPU_PACK_LENGTH = 384


def cores(count: int) -> str:
    """'1 core', '2 cores': as the page says it."""
    return f"{count} core{'' if count == 1 else 's'}"


@dataclass(frozen=True)
class Hardware:
    kind: str  # "cuda" or "cpu"
    name: str
    memory_gib: float  # GPU memory on CUDA, system memory on CPU
    capability: tuple[int, int] | None = None
    cpu_count: int = 1
    device_count: int = 1  # CUDA GPUs; a run uses them all, one process each (see `distributed`)
    # A CPU with bf16 instructions (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than fp32.
    native_bf16: bool = False

    @property
    def supports_bf16(self) -> bool:
        if self.kind == "cpu":
            return self.native_bf16
        return self.capability is not None and self.capability >= (8, 0)

    def describe(self) -> str:
        if self.kind == "cuda":
            major, minor = self.capability or (0, 0)
            many = f"{self.device_count} × " if self.device_count > 1 else ""
            return f"{many}{self.name} ({self.memory_gib:.0f} GiB each, compute capability {major}.{minor})" if many \
                else f"{self.name} ({self.memory_gib:.0f} GiB, compute capability {major}.{minor})"
        return f"CPU, {cores(self.cpu_count)}, {self.memory_gib:.0f} GiB memory"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "description": self.describe()}


def detect_hardware() -> Hardware:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Hardware("cuda", props.name, props.total_memory / 1024**3, (props.major, props.minor),
                        os.cpu_count() or 1, torch.cuda.device_count())
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):
        memory = 0.0
    return Hardware("cpu", "CPU", memory, None, torch.get_num_threads(), native_bf16=cpu_has_native_bf16())


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU multiplies bf16 in hardware (the kernel lists the instruction sets in /proc/cpuinfo; other
    systems are taken not to)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in CPU_BF16_FLAGS)
    except OSError:
        pass
    return False


@dataclass
class TrainingPlan:
    """The resolved settings a run trains with, and why each was chosen."""

    device: str
    precision: str  # fp32 / fp16 / bf16: the training compute dtype, and the dtype the base weights load in
    four_bit: bool
    gradient_checkpointing: bool
    batch_size: int
    sequence_length: int  # tokens per packed sequence (or the longest sequence when not packing)
    packing: bool
    estimated_peak_gib: float
    fits: bool
    reasons: list[str] = field(default_factory=list)
    processes: int = 1  # training processes sharing each optimizer step; batch_size is each one's
    examples_per_step: int = 0  # examples of one optimizer step, all processes together (see distributed.split_step)
    # The model sharded across the processes (FSDP), one GPU each; estimated_peak_gib is then each GPU's.
    sharded: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def gradient_accumulation(self) -> int:
        """Each process's gradient accumulation: the step's examples over the processes' batches."""
        return max(1, self.examples_per_step // (self.batch_size * self.processes))


def _precision(settings: RunSettings, hardware: Hardware, reasons: list[str]) -> str:
    if settings.precision != AUTO:
        if hardware.kind == "cpu" and settings.precision == "fp16":
            raise UserError("fp16 training needs a CUDA GPU; choose fp32 (or auto) on CPU.")
        if settings.precision == "bf16" and hardware.kind == "cuda" and not hardware.supports_bf16:
            raise UserError(f"{hardware.name} cannot train in bf16 (it needs an Ampere or newer GPU); "
                            "choose fp16 or auto.")
        reasons.append(f"{settings.precision} as chosen")
        return settings.precision
    if hardware.kind == "cpu":
        if hardware.native_bf16:
            reasons.append("bf16 mixed precision on CPU (it has bf16 instructions), adapter weights in fp32")
            return "bf16"
        reasons.append("fp32 on CPU (without bf16 instructions mixed precision is slower there)")
        return "fp32"
    if hardware.supports_bf16:
        reasons.append("bf16 mixed precision (Ampere or newer GPU)")
        return "bf16"
    reasons.append("fp16 mixed precision with fp32 adapter weights (this GPU has no fast bf16)")
    return "fp16"


def sequence_length(settings: RunSettings, packing: bool, total_tokens: int | None,
                    longest_example: int | None, longest_pack: int | None = None) -> int:
    """Tokens per training sequence: the maximum length, or shorter packs for a small dataset or a CPU."""
    if not packing or not total_tokens or not longest_example:
        return settings.max_length
    target = -(-total_tokens // MIN_PACKS_PER_EPOCH)
    if longest_pack:
        target = min(target, longest_pack)
    # Rounded up to a multiple of 64, which GPU kernels prefer.
    target = -(-max(target, longest_example) // 64) * 64
    return max(longest_example, min(settings.max_length, target))


def check_sharding(settings: RunSettings, hardware: Hardware, processes: int) -> None:
    """Refuse sharding asked of a run that cannot shard: transformers' Trainer shards only on GPUs (on a CPU,
    accelerate turns its FSDP plugin on for GPU-type process groups alone, and the run would silently train
    data-parallel), and one process has no one to share the model with."""
    if settings.shard != "on":
        return
    if hardware.kind != "cuda":
        raise UserError("Sharding the model (shard = on) needs CUDA GPUs, one process each; on a CPU "
                        "transformers trains data-parallel only. Set shard to 'auto' or 'off'.")
    if processes < 2:
        raise UserError(f"Sharding the model (shard = on) shares it among several processes, one per GPU; this run "
                        f"has {processes} ({hardware.describe()}). Set shard to 'auto' or 'off', or train on a "
                        "machine with several GPUs (train --nproc-per-node N).")


def plan_training(settings: RunSettings, hardware: Hardware, shape: ModelShape, total_tokens: int | None = None,
                  longest_example: int | None = None, processes: int | None = None) -> TrainingPlan:
    """Resolve every "auto" in `settings` for `hardware`, this model shape and (when known) the data's size.
    `processes`: how many train together (default: one per GPU of this machine, one on a CPU); the model is sharded
    across them when the settings ask, or (shard = auto) when it fits no single GPU but fits shared."""
    reasons: list[str] = []
    precision = _precision(settings, hardware, reasons)
    gpu = hardware.kind == "cuda"
    processes = processes or (hardware.device_count if gpu else 1)
    check_sharding(settings, hardware, processes)
    budget = hardware.memory_gib * USABLE_MEMORY_FRACTION
    short_examples = longest_example is not None and longest_example <= CPU_PACK_LENGTH
    packing = settings.packing and (gpu or short_examples)
    length = sequence_length(settings, packing, total_tokens, longest_example, None if gpu else CPU_PACK_LENGTH)

    def estimate(batch: int, four_bit: bool, checkpointing: bool, shards: int = 1) -> float:
        peak = estimate_memory(shape, batch * length, precision, four_bit, checkpointing, settings.lora_r, gpu=gpu,
                               sequence_length=length, packed=packing, shards=shards).total_gib
        if shards > 1 and four_bit:
            # transformers quantizes a model as it loads it onto each process's GPU (its bitsandbytes quantizer sets
            # the device map), whole, before FSDP shares it out.
            whole = estimate_memory(shape, 0, precision, four_bit, lora_rank=settings.lora_r).weights_gib
            peak = max(peak, whole + RUNTIME_OVERHEAD_GIB)
        return peak

    if settings.quantization == "4bit" and not gpu:
        raise UserError("4-bit (QLoRA) loading needs a CUDA GPU; set quantization to 'none' or 'auto' on CPU.")
    four_bit_options = {"4bit": [True], "none": [False]}.get(settings.quantization, [False, True] if gpu else [False])
    checkpointing_options = {"on": [True], "off": [False]}.get(settings.gradient_checkpointing, [False, True])
    batch_options = [settings.batch_size] if settings.batch_size > 0 else (
        [CPU_BATCH_SIZE] if not gpu else [b for b in (16, 8, 4, 2, 1) if b <= MAX_AUTO_BATCH_SIZE])

    def choose(shards: int) -> tuple[bool, bool, int] | None:
        # Prefer full-precision weights, then no checkpointing, then the largest batch: in that order they cost
        # quality (barely), ~2x speed, and a few percent.
        for four_bit in four_bit_options:
            for checkpointing in checkpointing_options:
                for batch in batch_options:
                    if estimate(batch, four_bit, checkpointing, shards) <= budget or not gpu:
                        return four_bit, checkpointing, batch
        return None

    # Sharding costs every layer's weights a gather on each step: only when asked, or when nothing else fits.
    sharded = settings.shard == "on"
    chosen = choose(processes if sharded else 1)
    if chosen is None and settings.shard == AUTO and gpu and processes > 1:
        chosen = choose(processes)
        sharded = chosen is not None
    fits = chosen is not None
    if chosen is None:
        chosen = (four_bit_options[-1], checkpointing_options[-1], batch_options[-1])
    four_bit, checkpointing, batch = chosen
    peak = estimate(batch, four_bit, checkpointing, processes if sharded else 1)

    if four_bit:
        reasons.append("4-bit QLoRA weights" + (" as chosen" if settings.quantization == "4bit" else
                                                 " (16-bit weights would not fit)"))
    if checkpointing:
        reasons.append("gradient checkpointing" + (" as chosen" if settings.gradient_checkpointing == "on" else
                                                   " (needed to fit in memory)"))
    elif settings.gradient_checkpointing == AUTO:
        reasons.append("no gradient checkpointing (memory allows, ~2x faster)")
    reasons.append(f"batch size {batch}" + (" as chosen" if settings.batch_size else " (fits memory)" if gpu else ""))
    if packing:
        why = (" (short packs on a CPU)" if not gpu else
               " (shorter packs give a small dataset enough steps)" if length < settings.max_length else "")
        reasons.append(f"examples packed into sequences of {length} tokens{why}")
    elif settings.packing:
        reasons.append(f"no packing on CPU: with examples up to {longest_example} tokens a pack costs more there "
                       "than its examples one by one")
    if gpu:
        if sharded:
            whole = estimate(batch, four_bit, checkpointing)
            why = " as chosen" if settings.shard == "on" else " (the model fits no single GPU)"
            reasons.append(f"sharded across the {processes} GPUs with FSDP{why}: each holds a share of the weights, "
                           f"about {peak:.1f} GiB per GPU instead of {whole:.1f} GiB for a whole copy")
        elif processes > 1 and (fits or settings.shard == "off"):
            reasons.append("not sharded: " + ("off as chosen" if settings.shard == "off" else
                                              "each GPU holds the whole model (it fits, and needs no gathers)"))
        each = " on each GPU" if processes > 1 else ""
        reasons.append(f"estimated peak {peak:.1f} GiB of {hardware.memory_gib:.0f} GiB{each}")
        if not fits:
            reasons.append("may not fit: shorten the maximum length or choose a smaller model")
            if processes > 1 and not sharded and settings.shard != "off":
                shared = estimate(batch, four_bit, checkpointing, processes)
                loading = " (4-bit weights are quantized whole on each GPU as they load)" if four_bit else ""
                reasons.append(f"sharded across the {processes} GPUs with FSDP it would still take about "
                               f"{shared:.1f} GiB on each{loading}")
    return TrainingPlan(hardware.kind, precision, four_bit, checkpointing, batch, length, packing,
                        round(peak, 2), fits, reasons, examples_per_step=batch * settings.gradient_accumulation,
                        sharded=sharded)
