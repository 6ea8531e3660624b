"""How long a run will take on this machine, said before Start: the plan's settings, the data's tokens, and a
tokens/s figure that names where it comes from.

Only two kinds of figure were measured: the embedded SmolLM2-135M on this project's 2-core CPU (docs/BENCHMARKS.md)
and two model sizes on one H100 (docs/BENCHMARKS.md, GPU). Every other machine and model size is derived from the nearest of
them, and the figure says so: by CPU cores, by the GPU's dense 16-bit tensor peak (bench.PEAK_TFLOPS), and by
the parameter count for a model larger than the one measured (its compute per token grows with its size; a
smaller one is not assumed faster, since small models were not compute-bound on the H100).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

from . import card, catalog, isolation, models
from .bench import PEAK_TFLOPS, peak_tflops
from .errors import UserError
from .events import duration
from .hardware import Hardware, TrainingPlan, cores, plan_training
from .memory import ModelShape
from .settings import RunSettings, is_number


@dataclass(frozen=True)
class Measured:
    parameters: float
    tokens_per_second: float
    where: str


# Where a figure was measured, as the page says it (the page names no files: docs/BENCHMARKS.md holds the
# measurements and their commands).
BENCHMARKS = "the project's benchmarks"
# `python tests/style_check.py` on the 2-core CPU over a whole run of the sample data (docs/BENCHMARKS.md, "Whole
# runs"), per precision of the plan: bf16 where the CPU has bf16 instructions (203.6 tokens/s), and fp32 (125.5,
# measured without the CPU path's later speed-ups, so the figure is on the slow side).
CPU_MEASURED = {
    "bf16": Measured(134.5e6, 200.0, f"measured: SmolLM2-135M on a 2-core CPU, bf16 ({BENCHMARKS})"),
    "fp32": Measured(134.5e6, 125.0, f"measured: SmolLM2-135M on a 2-core CPU, fp32 ({BENCHMARKS})"),
}
CPU_MEASURED_CORES = 2
# One H100, bf16, SDPA, LoRA r=16 all-linear, batch 8, max length 1024, padded batches, gradient checkpointing off
# (the plan's choice when memory allows); docs/BENCHMARKS.md, GPU.
H100_MEASURED = (
    Measured(134.5e6, 13_146.0, f"measured: SmolLM2-135M on one H100, bf16, batch 8 ({BENCHMARKS})"),
    Measured(1.236e9, 19_443.0, f"measured: Llama-3.2-1B on one H100, bf16, batch 8 ({BENCHMARKS})"),
)
H100_PEAK = PEAK_TFLOPS["H100"]
# The same H100 runs with checkpointing on: 5,867 vs 13,146 tokens/s (135M) and 9,000 vs 19,443 (1B).
CHECKPOINTING_SPEED = 0.45


@dataclass(frozen=True)
class Throughput:
    tokens_per_second: float
    source: str  # "measured: …" for a figure measured on this kind of machine and model, else "derived …"


def throughput(hardware: Hardware, shape: ModelShape, plan: TrainingPlan) -> Throughput | None:
    """Tokens per second a run of this model trains at here, with its source; None for a GPU of unknown peak."""
    if hardware.kind == "cpu":
        reference = CPU_MEASURED.get(plan.precision, CPU_MEASURED["fp32"])
        scale, how = hardware.cpu_count / CPU_MEASURED_CORES, []
        if hardware.cpu_count != CPU_MEASURED_CORES:
            how.append(f"scaled to {cores(hardware.cpu_count)}")
        if plan.precision not in CPU_MEASURED:
            how.append(f"this plan trains in {plan.precision}, not counted")
    else:
        peak = peak_tflops(hardware)
        if peak is None:
            return None
        # The measured size nearest to this model's, on a log scale.
        reference = min(H100_MEASURED, key=lambda m: abs(math.log(shape.parameters / m.parameters)))
        scale, how = peak / H100_PEAK * hardware.device_count, []
        if peak != H100_PEAK:
            how.append(f"scaled by 16-bit tensor peak ({peak:g} vs {H100_PEAK:g} TFLOP/s)")
        if hardware.device_count > 1:
            how.append(f"× {hardware.device_count} GPUs")
        if plan.gradient_checkpointing:
            scale *= CHECKPOINTING_SPEED
            how.append(f"× {CHECKPOINTING_SPEED} for gradient checkpointing (measured)")
        if plan.four_bit:
            how.append("4-bit dequantisation not counted")
    size = f"{shape.parameters / 1e6:,.0f}M parameters"
    if shape.parameters > reference.parameters * 1.1:
        scale *= reference.parameters / shape.parameters
        how.append(f"scaled by model size ({size})")
    elif shape.parameters < reference.parameters / 1.1:
        how.append(f"taken as is for this smaller model ({size})")
    if not how:
        return Throughput(reference.tokens_per_second, reference.where)
    return Throughput(reference.tokens_per_second * scale,
                      f"derived from {reference.where.removeprefix('measured: ')}, {', '.join(how)}")


@dataclass(frozen=True)
class RunEstimate:
    tokens: int  # tokens the run trains on, every pass counted
    throughput: Throughput

    @property
    def seconds(self) -> float:
        return self.tokens / self.throughput.tokens_per_second


def run_tokens(settings: RunSettings, plan: TrainingPlan, total_tokens: int, examples: int) -> int:
    """Tokens a run processes: every pass over the data, or max_steps optimizer steps when set (a step's batch
    is the same on several GPUs: they share its gradient accumulation)."""
    if settings.max_steps > 0:
        per_sequence = plan.sequence_length if plan.packing else total_tokens / max(examples, 1)
        return int(settings.max_steps * plan.batch_size * settings.gradient_accumulation * per_sequence)
    return int(total_tokens * settings.epochs)


def model_shape(name: str, limits: isolation.Limits | None = None) -> ModelShape:
    """A model's shape from the catalogue's numbers when it is listed, else from its config (no weights). With
    `limits` (the app, for a model a visitor named), the config is read and the model laid out on the meta device in
    a worker process under them: a config that claims millions of layers is refused there, not built in the app."""
    listed = {entry.model_id for entry in catalog.CATALOG}
    if name == models.HUB_DEFAULT_MODEL or not name:
        name = models.EMBEDDED_MODEL  # the same model
    if name in listed:
        return catalog.shape_of(name)
    if limits is not None:
        return _shape_in_worker(name, limits)
    return ModelShape.from_config(models.load_config(name))


# What the visitor reads when a model's config needs more than a worker may take to lay out.
SHAPE_TASK = isolation.Task("Reading this model's size from its config",
                            "choose a model the app offers, or one whose config describes a model of usual size.")


@lru_cache(maxsize=32)
def _shape_in_worker(name: str, limits: isolation.Limits) -> ModelShape:
    return isolation.run_in_worker(lambda: ModelShape.from_config(models.load_config(name)), SHAPE_TASK, limits)


def estimate_run(settings: RunSettings, hardware: Hardware, total_tokens: int, longest_example: int,
                 examples: int, limits: isolation.Limits | None = None) -> tuple[TrainingPlan, RunEstimate | None]:
    """The plan a run of `settings` would get here, and its estimated length (None for a GPU of unknown speed);
    `limits` as in `model_shape`."""
    shape = model_shape(settings.model, limits)
    plan = plan_training(settings, hardware, shape, total_tokens, longest_example)
    speed = throughput(hardware, shape, plan)
    if speed is None:
        return plan, None
    return plan, RunEstimate(run_tokens(settings, plan, total_tokens, examples), speed)


# A run is measured once this many steps are done (the first step alone carries the start-up's costs).
MEASURED_AFTER_STEPS = 3
# A machine this many times slower than its usual figure is said to be busy (a short run's first steps, which carry
# its warm-up, measured 2× slower than the figure on a machine that was only moderately busy).
SLOWER_THAN_USUAL = 3.0


@dataclass(frozen=True)
class LiveEstimate:
    """A run's length at the speed it trains at now, from its curve, beside the usual figure for it here."""

    tokens_per_second: float  # measured since the run (or its resume) began training
    elapsed_seconds: float
    left_seconds: float
    steps: int  # steps done when measured
    usual: Throughput | None

    @property
    def total_seconds(self) -> float:
        return self.elapsed_seconds + self.left_seconds

    @property
    def times_slower(self) -> float | None:
        """How many times slower than the usual figure the run trains, when it is much slower (else None)."""
        if self.usual is None or self.tokens_per_second <= 0:
            return None
        ratio = self.usual.tokens_per_second / self.tokens_per_second
        return ratio if ratio >= SLOWER_THAN_USUAL else None


def live_estimate(entries: list[dict[str, Any]], usual: Throughput | None) -> LiveEstimate | None:
    """The run's length at its measured speed, once its first steps are done (None before, or when its metrics do
    not tell): the tokens/s and time left of its latest step."""
    trained = [entry for entry in entries if "loss" in entry]
    if not trained:
        return None
    last = trained[-1]
    step, speed, left = last.get("step"), last.get("tokens_per_second"), last.get("eta_seconds")
    done = isinstance(step, int) and (step >= MEASURED_AFTER_STEPS or step == last.get("max_steps"))
    if not done or not _positive(speed) or not isinstance(left, (int, float)):
        return None
    return LiveEstimate(float(speed), float(last.get("elapsed_seconds") or 0.0), float(left), step, usual)


def _positive(value: Any) -> bool:
    return is_number(value) and value > 0


def usual_throughput(hardware: Hardware, record: dict[str, Any],
                     limits: isolation.Limits | None = None) -> Throughput | None:
    """The usual tokens/s figure here for a run, from its record (its model and plan); None when it cannot be told
    (a GPU of unknown speed, a record without a plan, a model whose shape cannot be read); `limits` as in
    `model_shape`."""
    plan_values = record.get("plan") or {}
    model = card.base_model_of(record)
    try:
        plan = TrainingPlan(**{spec.name: plan_values[spec.name] for spec in fields(TrainingPlan)
                               if spec.name in plan_values})
        return throughput(hardware, model_shape(str(model), limits), plan)
    except (UserError, TypeError, ValueError, OSError):  # a run that ended before its plan, a model gone: none
        return None


def describe_live(live: LiveEstimate) -> str:
    """The run's length at its measured speed, in one sentence."""
    return (f"At this speed: about {duration(live.total_seconds)} in all, {duration(live.left_seconds)} left "
            f"({live.tokens_per_second:,.0f} tokens/s measured over {live.steps} steps).")


def describe_ended(live: LiveEstimate) -> str:
    """The speed a run that has ended trained at, in one sentence."""
    return (f"The last run trained at {live.tokens_per_second:,.0f} tokens/s ({duration(live.elapsed_seconds)} of "
            "training).")


def slower_warning(live: LiveEstimate, ended: bool = False) -> str:
    """What it means when the machine trains much slower than its usual figure (for a run under way, or for the
    next runs once it has `ended`); "" when it does not."""
    times = live.times_slower
    if times is None or live.usual is None:
        return ""
    what = ("runs take that much longer than estimated." if ended else
            "the run takes that much longer than estimated. It goes on; Stop keeps what it has learned so far.")
    return (f"This machine trains about {times:.0f}× slower than its usual figure for this model "
            f"({live.tokens_per_second:,.0f} vs ~{live.usual.tokens_per_second:,.0f} tokens/s): it is busy with other "
            f"work, so {what}")
