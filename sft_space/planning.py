"""Plans a run makes around the machine's plan (`hardware.plan_training`): how often validation loss is measured,
what to try after running out of memory, and whether the disk has room for the run's checkpoints.

Pure decisions from the settings, the plan and the data's size; the recipe (train.py) acts on them.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .hardware import TrainingPlan
from .settings import EVALUATION_SHARE, MAX_EVALUATIONS, RunSettings

# A trained token costs about two forward passes: its forward, and a backward through the frozen base (LoRA
# computes no gradient for the base weights, only for the activations and the small adapters). A validation
# token costs one forward.
TRAINED_TOKEN_COST = 2.0
# eval_steps that no step reaches: only the evaluation the trainer runs at the last step remains.
LAST_STEP_ONLY = 2**31 - 1
# Checkpoints the trainer keeps; a new one is saved before the oldest is deleted.
KEEP_CHECKPOINTS = 2
DISK_FULL_ADVICE = ("The disk is full: the last checkpoint could not be saved (the incomplete one is ignored). "
                    "Free space, e.g. delete old runs or their checkpoint folders, then resume this run.")
MB = 1024**2
# What a run writes, per trainable (LoRA) parameter: a checkpoint holds its fp32 weight and AdamW's two fp32
# moments; the final adapter only the weight. Each also holds the tokenizer, scheduler, RNG and trainer state.
CHECKPOINT_BYTES_PER_PARAMETER = 4 + 4 + 4
ADAPTER_BYTES_PER_PARAMETER = 4
SMALL_FILES_BYTES = 32 * MB
# run.json, events.jsonl, samples.json and the slack a filesystem needs.
DISK_MARGIN_BYTES = 64 * MB
# Savers that are not Python (safetensors, torch's zip writer) report a full disk without an errno: a failed
# write with less than this free is taken for one.
NEARLY_FULL_BYTES = 16 * MB
# An out-of-memory error before this step is retried with a smaller plan; after it the run has progress to keep.
RETRY_OUT_OF_MEMORY_BEFORE_STEP = 10
# How a retry's change begins among the plan's reasons (the advice after the last retry lists them).
OUT_OF_MEMORY_REASON = "out of memory, so "


@dataclass
class EvaluationPlan:
    """How validation loss is measured in a run: on how many of the held-out examples, and how often."""

    # The first `examples` of the `held_out` validation examples are evaluated (all of them, unless one
    # evaluation of all would cost more than the run's budget for evaluation).
    examples: int
    held_out: int
    # How often, as the trainer's `eval_steps` takes it: a whole number of steps, or a share of the run's steps.
    # The trainer also evaluates at the last step, so the final validation loss is that of the adapter saved.
    every: float
    evaluations: int
    chosen: bool = False

    def reason(self) -> str:
        held_out = (f"{self.examples} held-out examples" if self.examples == self.held_out
                    else f"{self.examples} of the {self.held_out} held-out examples")
        if self.chosen:
            return f"validation loss on {held_out} every {int(self.every)} steps, as chosen"
        times = "once, at the last step" if self.evaluations == 1 else f"{self.evaluations} times, the last at the end"
        return f"validation loss on {held_out} {times} (within {EVALUATION_SHARE:.0%} of the run's compute)"


def evaluation_plan(settings: RunSettings, plan: TrainingPlan, train_examples: int, train_tokens: int,
                    validation_examples: int, validation_tokens: int, examples_per_step: int) -> EvaluationPlan | None:
    """How often to measure validation loss: as chosen (`eval_every`), else as many times as fit in
    EVALUATION_SHARE of the run's compute (1 to MAX_EVALUATIONS), evenly spread, the last at the last step.
    `examples_per_step`: the examples of one optimizer step, across every process.

    A fixed number of evaluations per run, not one every few steps: a short run would otherwise spend half its
    time evaluating (every 2 steps of a 20-step run), and a long one evaluate hundreds of times.
    """
    if not validation_examples:
        return None
    if settings.eval_every > 0:
        return EvaluationPlan(validation_examples, validation_examples, settings.eval_every, 0, chosen=True)
    if settings.max_steps > 0:
        # The tokens a run of max_steps trains on: the share of an epoch its steps make (packed sequences hold
        # about sequence_length tokens each; unpacked, a sequence is an example).
        sequences = math.ceil(train_tokens / plan.sequence_length) if plan.packing else train_examples
        run_tokens = train_tokens * settings.max_steps / max(1, math.ceil(sequences / examples_per_step))
    else:
        run_tokens = train_tokens * settings.epochs
    fits = EVALUATION_SHARE * TRAINED_TOKEN_COST * run_tokens / max(validation_tokens, 1)
    evaluations = max(1, min(MAX_EVALUATIONS, int(fits)))
    # A run too short for even one evaluation of every held-out example (20 steps on 144 examples) evaluates as
    # many as fit, at its last step.
    examples = validation_examples if fits >= 1 else max(1, int(validation_examples * fits))
    # A share below 1 is turned into steps by the trainer (the steps round up, so never more than `evaluations`);
    # a share of 1 would mean every step.
    every = 1 / evaluations if evaluations > 1 else LAST_STEP_ONLY
    return EvaluationPlan(examples, validation_examples, every, evaluations)


def plan_after_out_of_memory(settings: RunSettings, plan: TrainingPlan
                             ) -> tuple[RunSettings, TrainingPlan, str] | None:
    """What to try after running out of memory, in order of cost: half the batch (down to 1) with gradient
    accumulation raised to match, so each optimizer step still sees the same examples; then gradient
    checkpointing; then 4-bit weights on a GPU. Returns (settings, plan, what changed), or None when nothing is
    left to try."""
    if plan.batch_size > 1:
        batch = max(d for d in range(1, plan.batch_size // 2 + 1) if plan.batch_size % d == 0)
        accumulation = settings.gradient_accumulation * (plan.batch_size // batch)
        change = (f"batch size {batch} with gradient accumulation {accumulation} (was {plan.batch_size} and "
                  f"{settings.gradient_accumulation}: the same examples per optimizer step)")
        settings = dataclasses.replace(settings, gradient_accumulation=accumulation)
        plan = dataclasses.replace(plan, batch_size=batch)
    elif not plan.gradient_checkpointing:
        change = "gradient checkpointing on (slower, far less memory)"
        plan = dataclasses.replace(plan, gradient_checkpointing=True)
    elif plan.device == "cuda" and not plan.four_bit:
        change = "4-bit (QLoRA) weights"
        plan = dataclasses.replace(plan, four_bit=True)
    else:
        return None
    plan = dataclasses.replace(plan, reasons=[*plan.reasons, OUT_OF_MEMORY_REASON + change])
    return settings, plan, change


def out_of_memory_advice(plan: TrainingPlan) -> str:
    """What to do after running out of memory: what was already tried, and what is left."""
    tried = [reason.removeprefix(OUT_OF_MEMORY_REASON) for reason in plan.reasons
             if reason.startswith(OUT_OF_MEMORY_REASON)]
    left = ["lower the maximum length"]
    if plan.batch_size > 1:
        left.append("set the batch size to 1")
    if not plan.gradient_checkpointing:
        left.append("turn gradient checkpointing on")
    if not plan.four_bit:
        left.append("load the model in 4-bit (QLoRA, on a GPU)")
    left.append("choose a smaller model")
    also = f", also with {'; then with '.join(tried)}" if tried else ""
    return f"Out of memory{also}. To fit: {', '.join(left[:-1])}, or {left[-1]}."


def is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def is_disk_full(err: BaseException, where: Path | None = None) -> bool:
    """Whether `err` (or an error it was raised from) is a full disk; `where`: a folder on the disk written to."""
    import errno

    write_error = False
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        message = str(err).lower()
        if "no space left" in message or "quota exceeded" in message:
            return True
        write_error = write_error or isinstance(err, OSError) or "write" in message or "ioerror" in message
        err = err.__cause__ or err.__context__
    if not write_error or where is None:
        return False
    try:
        return shutil.disk_usage(where).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def disk_needed(lora_parameters: int, checkpoints: int = KEEP_CHECKPOINTS + 1) -> int:
    """Bytes a run writes at its peak: `checkpoints` trainer checkpoints (those kept, plus the one being saved
    before the oldest is deleted), the final adapter, and a margin."""
    checkpoint = lora_parameters * CHECKPOINT_BYTES_PER_PARAMETER + SMALL_FILES_BYTES
    adapter = lora_parameters * ADAPTER_BYTES_PER_PARAMETER + SMALL_FILES_BYTES
    return checkpoints * checkpoint + adapter + DISK_MARGIN_BYTES


def check_free_disk(runs_dir: str | Path, needed: int) -> None:
    """Refuse a run the disk under `runs_dir` has no room for, before it writes anything."""
    runs_dir = Path(runs_dir)
    existing = next(p for p in (runs_dir, *runs_dir.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise UserError(f"Not enough free disk space for this run: {existing} has {free / MB:.0f} MB free, and the "
                        f"run needs about {needed / MB:.0f} MB for its checkpoints and adapter. Free space (delete "
                        "old runs or their checkpoint folders), or choose an output folder on a larger disk.")

