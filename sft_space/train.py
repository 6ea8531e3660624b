"""The training engine: LoRA/QLoRA SFT with TRL, shared by the app, the CLI and the benchmark.

The data is tokenized by the same renderer as the preview (the check keeps its tokens, `render.Tokens`), and
handed to TRL's SFTTrainer already tokenized with its `labels` (-100 where a token is not trained), so the tokens
that carry loss are exactly the ones the preview highlights — for any chat template, with or without generation
markers.

A run holds its folder's lock (`RunFolder.locked`) from the moment the folder is chosen until `train` returns,
so two processes never train the same run. A failure is recorded in run.json first (small, and what the app and
the command line read), and only then, room permitting, the traceback: on a full disk the reason still reaches
the person as a TrainingFailed, never as the disk error of the handler itself.

A stop (`TrainRequest.stop_event`, set from another thread or by the command line's Ctrl+C) is heard in every
stage, within about one training step:
  - before the run folder exists (checking the data, or a resume's checks): `train` raises `TrainingStopped`, and
    nothing was written;
  - after it, before the first optimizer step (loading the model, building the trainer): the run is `stopped`
    with the error STOPPED_BEFORE_FIRST_STEP and has no adapter (a resume stopped here keeps the checkpoint it
    resumed from);
  - while training: at the end of the current step (or at the next batch of an evaluation), a resumable
    checkpoint and the adapter are saved at that step, and the run is `stopped`;
  - while saving or answering after training: the answers left are skipped; the run is `finished` if every step
    was done.
A reply being generated ends at its next token. The slow stages that cannot look at the event themselves (the data
checks, loading the model) run in a helper thread that is left to finish alone when a stop comes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import importlib.util
import json
import math
import shutil
import sys
import threading
import time
import traceback
from array import array
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

from . import catalog, checks, data, distributed, models, render, runs
from .chat import generate_reply
from .errors import UserError
from .hardware import Hardware, TrainingPlan, detect_hardware, plan_training
from .memory import ModelShape
from .render import render_example
from .runs import RunFolder
from .settings import EVALUATION_SHARE, MAX_EVALUATIONS, GenerationSettings, RunSettings

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")
# Logging and checkpoints as a share of the run's steps, so that a 20-step run logs every step and a 2,000-step
# run every 20.
LOG_EVERY_FRACTION = 0.01
SAVE_EVERY_FRACTION = 0.1
# A trained token costs about two forward passes: its forward, and a backward through the frozen base (LoRA
# computes no gradient for the base weights, only for the activations and the small adapters). A validation
# token costs one forward.
TRAINED_TOKEN_COST = 2.0
# eval_steps that no step reaches: only the evaluation the trainer runs at the last step remains.
LAST_STEP_ONLY = 2**31 - 1
KEEP_CHECKPOINTS = 2
SAMPLE_MAX_NEW_TOKENS = 96
FAILURE_FILE = "failure.txt"


DISK_FULL_ADVICE = ("The disk is full: the last checkpoint could not be saved (the incomplete one is ignored). "
                    "Free space, e.g. delete old runs or their checkpoint folders, then resume this run.")
MB = 1024**2
# What a run writes, per trainable (LoRA) parameter: a checkpoint holds its fp32 weight and AdamW's two fp32
# moments; the final adapter only the weight. Each also holds the tokenizer, scheduler, RNG and trainer state.
CHECKPOINT_BYTES_PER_PARAMETER = 4 + 4 + 4
ADAPTER_BYTES_PER_PARAMETER = 4
SMALL_FILES_BYTES = 32 * MB
# run.json, metrics.jsonl, samples.json and the slack a filesystem needs.
DISK_MARGIN_BYTES = 64 * MB
# Savers that are not Python (safetensors, torch's zip writer) report a full disk without an errno: a failed
# write with less than this free is taken for one.
NEARLY_FULL_BYTES = 16 * MB
STOPPED_BEFORE_START = "Stopped before the run started; nothing was written."
STOPPED_BEFORE_FIRST_STEP = "The run was stopped before its first step; start it again."
# How often a stage run in a helper thread looks at the stop event.
STOP_POLL_SECONDS = 0.1
STAGE_THREAD = "sft-space-stage"
T = TypeVar("T")


class TrainingFailed(UserError):
    """A run that started and could not finish; its run.json says why."""


class InvalidRows(UserError):
    """Rows with errors, and no choice made to skip them: `problem` says which, `valid_rows` how many are left to
    train on; the message says what to do in the app's words (the command line names its flag instead)."""

    def __init__(self, problem: str, valid_rows: int):
        self.problem, self.valid_rows = problem, valid_rows
        super().__init__(f"{problem} Fix them, or choose to skip invalid rows and train on the {valid_rows} valid "
                         "ones.")


class TrainingStopped(UserError):
    """Stopped on request before the run folder existed (or before a resume changed it): nothing was written."""


class _EvaluationStopped(Exception):
    """Raised between evaluation batches when a stop is requested; the trainer catches it (see build_trainer)."""


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
                    validation_examples: int, validation_tokens: int) -> EvaluationPlan | None:
    """How often to measure validation loss: as chosen (`eval_every`), else as many times as fit in
    EVALUATION_SHARE of the run's compute (1 to MAX_EVALUATIONS), evenly spread, the last at the last step.

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
        per_step = plan.batch_size * accumulation_per_process(settings.gradient_accumulation) * distributed.world_size()
        run_tokens = train_tokens * settings.max_steps / max(1, math.ceil(sequences / per_step))
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


def example_tokens(tokenizer: Any, example: data.Example) -> render.Tokens:
    """The example's tokens and trained flags: those the check kept, else rendered now."""
    return example.tokens if example.tokens is not None else _tokens_of(render_example(tokenizer, example))


@dataclass
class PreparedData:
    report: checks.Report
    train: list[data.Example]
    validation: list[data.Example]

    @property
    def fingerprint(self) -> str:
        """Changes whenever the examples trained on change (content, order or split)."""
        digest = hashlib.sha256()
        for split, examples in (("train", self.train), ("validation", self.validation)):
            for example in examples:
                digest.update(split.encode())
                digest.update(json.dumps(example.messages if example.messages is not None else example.text,
                                         sort_keys=True, ensure_ascii=False).encode())
        return "sha256:" + digest.hexdigest()

    def summary(self) -> dict[str, Any]:
        return {"source": self.report.source, "format": self.report.format, "rows": self.report.rows,
                "invalid_rows_skipped": self.report.invalid_rows, "train_examples": len(self.train),
                "validation_examples": len(self.validation), "fingerprint": self.fingerprint,
                "stats": self.report.stats()}

    def evaluation_plan(self, settings: RunSettings, plan: TrainingPlan, tokenizer: Any) -> EvaluationPlan | None:
        def tokens(examples: list[data.Example]) -> int:
            return sum(len(example_tokens(tokenizer, example).ids) for example in examples)

        return evaluation_plan(settings, plan, len(self.train), tokens(self.train), len(self.validation),
                               tokens(self.validation))


def prepare_data(settings: RunSettings, tokenizer: Any,
                 on_progress: Callable[[int, int | None], None] | None = None) -> PreparedData:
    """Check the data and split it; invalid rows stop the run unless the user chose to skip them."""
    report = checks.check_data(settings, tokenizer, on_progress, keep_tokens=True)
    if report.errors and not settings.skip_invalid_rows:
        counts = ", ".join(f"{code} ×{n}" for code, n in sorted(report.error_counts().items()))
        first = report.errors[0].message
        raise InvalidRows(f"{report.source}: {report.invalid_rows} of {report.rows} rows have errors ({counts}); "
                          f"the first: {first}", report.valid_rows)
    if not report.valid_examples:
        raise UserError(f"{report.source}: no valid example to train on.")
    # At most max_validation_examples are held out; the rest of the share is trained on. A held-out example is
    # worth the time its evaluations take, and past a few hundred the mean loss barely moves while each
    # evaluation keeps growing (10% of 100,000 rows would be 10,000 examples each time).
    examples = report.valid_examples
    fraction = min(settings.validation_fraction, settings.max_validation_examples / len(examples))
    train, validation = data.split_train_validation(examples, fraction, settings.seed)
    return PreparedData(report, train, validation)


def tokenize_examples(tokenizer: Any, examples: list[data.Example]) -> Any:
    """A datasets.Dataset of `input_ids` and `labels` (the id where the token is trained, -100 where not), rendered
    like the preview.

    Examples the check already tokenized (`Example.tokens`) are used as they are: a large dataset is rendered and
    tokenized once, not again here. The columns are built as Arrow arrays straight from the compact tokens, and
    the labels with one vectorised select: TRL uses labels it is given as they are (building them itself takes a
    Python loop over every token, ~10 s per 100,000 rows).
    """
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset

    tokens = [example_tokens(tokenizer, example) for example in examples]
    offsets = pa.array(np.concatenate([[0], np.cumsum([len(t.ids) for t in tokens], dtype=np.int64)]),
                       type=pa.int32())
    ids = np.frombuffer(b"".join(t.ids.tobytes() for t in tokens), dtype=np.int32)
    trained = np.frombuffer(b"".join(t.trained for t in tokens), dtype=np.int8).astype(bool)
    labels = np.where(trained, ids, np.int32(-100))
    return Dataset(pa.table({"input_ids": pa.ListArray.from_arrays(offsets, ids),
                             "labels": pa.ListArray.from_arrays(offsets, labels)}))


def token_count(dataset: Any) -> int:
    """The tokens in a tokenized dataset, counted in Arrow (reading a large `input_ids` column into Python lists
    took seconds)."""
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(dataset.data.column("input_ids"))).as_py() or 0)


def _tokens_of(rendered: Any) -> render.Tokens:
    return render.Tokens(array("i", rendered.input_ids), bytes(bytearray(map(int, rendered.trained))))


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def model_shape(model_name: str, trust_remote_code: bool = False) -> ModelShape:
    if models.needs_preparation(model_name):
        # The catalogue's numbers: reading its config would convert it first (or parse its GGUF file, as slow), and
        # the one-time conversion waits until the data has passed its checks and the model loads (`_load_model`).
        return catalog.shape_of(models.EMBEDDED_MODEL)
    return ModelShape.from_config(models.load_config(model_name, trust_remote_code))


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


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sample_prompts(prepared: PreparedData, count: int) -> list[dict[str, Any]]:
    """The opening of a few held-out conversations (up to the first reply), with the reply they had."""
    pool = [e for e in (prepared.validation or prepared.train) if e.messages is not None]
    samples = []
    for example in pool[:count]:
        first_reply = next(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        prompt = [{"role": m["role"], "content": m["content"]} for m in example.messages[:first_reply]]
        samples.append({"row": example.row, "prompt": prompt, "reference": example.messages[first_reply]["content"]})
    return samples


def answer_samples(model: Any, tokenizer: Any, samples: list[dict[str, Any]], key: str,
                   stop_event: threading.Event | None = None) -> bool:
    """Answer each sample's prompt into `sample[key]`; False if `stop_event` cut the answers short (a reply cut
    off mid-way is not kept)."""
    settings = GenerationSettings(max_new_tokens=SAMPLE_MAX_NEW_TOKENS)
    stop_event = stop_event or threading.Event()
    was_training = model.training
    model.eval()
    try:
        for sample in samples:
            if stop_event.is_set():
                return False
            reply = generate_reply(model, tokenizer, sample["prompt"], settings, stop_event=stop_event)
            if stop_event.is_set():
                return False
            sample[key] = reply
        return True
    finally:
        model.train(was_training)


def answer_before_and_after(model: Any, tokenizer: Any, samples: list[dict[str, Any]], folder: RunFolder,
                            stop_event: threading.Event) -> None:
    """Each sample answered by the trained adapter ("after") and by the base model ("before"), written to the run's
    samples.json. The base model's answers come from the same weights with the adapter switched off (LoRA leaves
    the base untouched), after training: nothing delays the first step. A stop skips the answers left; the ones
    given are kept."""
    if not answer_samples(model, tokenizer, samples, "after", stop_event):
        return
    runs.write_json_atomic(folder.samples_path, samples)
    with model.disable_adapter():
        if answer_samples(model, tokenizer, samples, "before", stop_event):
            runs.write_json_atomic(folder.samples_path, samples)


def torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# An out-of-memory error before this step is retried with a smaller plan; after it the run has progress to keep.
RETRY_OUT_OF_MEMORY_BEFORE_STEP = 10
# How a retry's change begins among the plan's reasons (the advice after the last retry lists them).
OUT_OF_MEMORY_REASON = "out of memory, so "


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


def leave_out_bitsandbytes() -> None:
    """Keep bitsandbytes from loading in a run that does not quantize. PEFT imports it whenever it is installed,
    which takes ~1.5 s on a 2-core CPU machine (of the ~9.5 s before the first loss), and nothing else in such a
    run uses it; PEFT and transformers then see it as absent. Only while nothing has imported it yet."""
    if "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # the import system's "not installed"


def load_model_for_training(settings: RunSettings, plan: TrainingPlan) -> Any:
    import torch

    if not plan.four_bit:
        leave_out_bitsandbytes()

    kwargs: dict[str, Any] = {"dtype": torch_dtype(plan.precision), "attn_implementation": "sdpa",
                              "trust_remote_code": settings.trust_remote_code}
    if plan.four_bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(plan.precision if plan.precision != "fp32" else "fp16"))
    if plan.device == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    return models.load_causal_lm(settings.model, **kwargs)


def lora_config(settings: RunSettings) -> Any:
    from peft import LoraConfig

    targets: Any = settings.target_modules.strip() or "all-linear"
    if targets != "all-linear":
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM", bias="none")


def trainer_arguments(settings: RunSettings, plan: TrainingPlan, folder: RunFolder,
                      evaluation: EvaluationPlan | None) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(folder.path),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps if settings.max_steps > 0 else -1,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        # A ratio, not a step count: transformers 5 has no warmup_ratio and reads a warmup_steps below 1 as a
        # share of the run's steps (the setting is bounded below 1).
        warmup_steps=settings.warmup_ratio,
        per_device_train_batch_size=plan.batch_size,
        per_device_eval_batch_size=plan.batch_size,
        gradient_accumulation_steps=accumulation_per_process(settings.gradient_accumulation),
        # LoRA trains every adapter on every step: DDP need not search for unused parameters.
        ddp_find_unused_parameters=False,
        max_length=plan.sequence_length,
        packing=plan.packing,
        packing_strategy="bfd",
        # Each example is checked, tokenized and labelled by us; TRL only packs.
        assistant_only_loss=False,
        completion_only_loss=False,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        use_cpu=plan.device == "cpu",
        activation_checkpointing=plan.gradient_checkpointing,
        logging_steps=LOG_EVERY_FRACTION,
        logging_first_step=True,
        eval_strategy="steps" if evaluation else "no",
        eval_steps=evaluation.every if evaluation else None,
        save_strategy="steps",
        save_steps=settings.save_every or SAVE_EVERY_FRACTION,
        save_total_limit=KEEP_CHECKPOINTS,
        seed=settings.seed,
        data_seed=settings.seed,
        **tracker_arguments(settings, folder),
        # Progress goes to metrics.jsonl and `on_metrics` (the CLI's lines, the app's plot), not to tqdm.
        disable_tqdm=True,
        dataloader_pin_memory=plan.device == "cuda",
    )


# The package each tracker needs (transformers' own callbacks do the logging), and how to get it.
TRACKER_PACKAGES = {"trackio": ("trackio",), "tensorboard": ("tensorboard", "tensorboardX")}
TRACKIO_PROJECT = "sft-space"


def check_tracker(settings: RunSettings) -> None:
    """Refuse a tracker whose package is missing, before anything starts (not after the data checks)."""
    packages = TRACKER_PACKAGES.get(settings.report_to, ())
    if packages and not any(importlib.util.find_spec(name) for name in packages):
        raise UserError(f"report_to={settings.report_to} needs the {packages[0]} package: pip install "
                        f"{packages[0]}, or set report_to to none (the run folder keeps every metric either way).")


def tracker_arguments(settings: RunSettings, folder: RunFolder) -> dict[str, Any]:
    """SFTConfig's arguments for the chosen tracker. Trackio logs locally under the project 'sft-space', one run
    per run folder, and reaches the Hub only when TRACKIO_SPACE_ID names a Space; TensorBoard writes its event
    files inside the run folder."""
    if settings.report_to == "none":
        return {"report_to": "none"}
    arguments: dict[str, Any] = {"report_to": [settings.report_to], "run_name": folder.run_id}
    if settings.report_to == "trackio":
        arguments.update(project=TRACKIO_PROJECT, trackio_static_space_id=False)
    return arguments


def trained_positions_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
    """The next-token cross-entropy of the trained tokens, with the LM head applied only where a trained token is
    predicted: on the sample about half the positions, and the head (vocabulary × width) is the model's largest
    matrix. Equal to the loss over full logits (tests/test_train.py checks it), summed over the trained tokens and
    divided by `num_items_in_batch` (the trainer's count across gradient accumulation) or by their number."""
    import torch
    import torch.nn.functional as F

    targets = inputs["labels"][:, 1:]
    trained = targets != -100
    # The positions whose next token some sequence of the batch trains on (on a CPU the batch is one sequence).
    positions = trained.any(dim=0).nonzero().squeeze(-1)
    forward = {key: value for key, value in inputs.items() if key != "labels"}
    logits = model(**forward, use_cache=False, logits_to_keep=positions).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets[:, positions].reshape(-1),
                           ignore_index=-100, reduction="sum")
    count = trained.sum() if num_items_in_batch is None else num_items_in_batch
    return loss / torch.as_tensor(count, device=loss.device).clamp(min=1)


def build_trainer(settings: RunSettings, plan: TrainingPlan, folder: RunFolder, model: Any, tokenizer: Any,
                  prepared: PreparedData, stop_event: threading.Event | None = None,
                  evaluation: EvaluationPlan | None = None) -> Any:
    """TRL's SFTTrainer over our tokenized examples and mask, with a LoRA adapter on `model`; validation loss as
    `evaluation` plans it (by default, `PreparedData.evaluation_plan`).

    Setting `stop_event` ends an evaluation at its next batch: the step it follows is saved as a checkpoint
    (without its validation loss) and training stops. On a CPU an evaluation can take longer than many steps.
    """
    from transformers import PrinterCallback
    from trl import SFTTrainer

    # TRL's fused LM head scores only the trained positions on GPUs (its Triton path) but every position elsewhere.
    head_at_trained_positions = plan.device != "cuda"

    class StoppableSFTTrainer(SFTTrainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            if not head_at_trained_positions or return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = trained_positions_loss(model, inputs, num_items_in_batch)
            # As TRL does: the count spans every process, and DDP averages the gradients across them.
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return loss

        def prediction_step(self, *args: Any, **kwargs: Any) -> Any:
            if stop_event is not None and stop_event.is_set():
                raise _EvaluationStopped
            return super().prediction_step(*args, **kwargs)

        def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
            try:
                return super().evaluate(*args, **kwargs)
            except _EvaluationStopped:
                # The trainer saves (and then stops) right after the evaluation it ran at the end of a step.
                self.control.should_save = True
                self.control.should_training_stop = True
                return {}

    train_dataset = tokenize_examples(tokenizer, prepared.train)
    evaluation = evaluation or prepared.evaluation_plan(settings, plan, tokenizer)
    eval_dataset = tokenize_examples(tokenizer, prepared.validation[:evaluation.examples]) if evaluation else None
    args = trainer_arguments(settings, plan, folder, evaluation)
    trainer = StoppableSFTTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                  processing_class=tokenizer, peft_config=lora_config(settings))
    # Without tqdm the trainer prints every log as a raw dict on stdout; RunMonitor reports progress instead.
    trainer.remove_callback(PrinterCallback)
    if plan.precision == "fp16":
        # fp16 mixed precision scales the loss; the trainable (adapter) weights must stay in fp32 for that.
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    return trainer


class RunMonitor:
    """Writes each logged step to metrics.jsonl (and to `on_metrics`), with the smoothed training loss, and stops
    the run on request."""

    def __init__(self, folder: RunFolder, tokens_per_epoch: int, stop_event: threading.Event,
                 on_metrics: Callable[[dict[str, Any]], None] | None):
        from transformers import TrainerCallback

        monitor = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                monitor.started = time.monotonic()
                monitor.first_step = state.global_step
                monitor.first_epoch = state.epoch or 0.0
                # A resumed run's smoothed loss and elapsed time go on from what it logged up to its checkpoint.
                for entry in monitor.folder.read_metrics():
                    if entry.get("step", 0) <= state.global_step:
                        if "loss" in entry:
                            monitor.smoother.add(float(entry["loss"]))
                        monitor.elapsed_before = max(monitor.elapsed_before, float(entry.get("elapsed_seconds") or 0))

            def on_step_begin(self, args, state, control, **kwargs):
                monitor.step_started = time.monotonic()

            def on_step_end(self, args, state, control, **kwargs):
                if monitor.step_started is not None:
                    # What a stop has to wait for at most (child.py's grace after Stop covers it).
                    monitor.slowest_step = max(monitor.slowest_step, time.monotonic() - monitor.step_started)
                # With several processes, all stop after the same step (or the others would wait for it).
                if distributed.any_process(monitor.stop_event.is_set()):
                    # Save a resumable checkpoint at this step, then leave the training loop; the validation
                    # loss due at this step is skipped (it can take longer than the step). A stop asked of another
                    # process is this one's too from here on.
                    monitor.stop_event.set()
                    control.should_save = True
                    control.should_training_stop = True
                    control.should_evaluate = False
                if control.should_training_stop or state.global_step >= state.max_steps:
                    # The last step is logged whatever the logging interval (1% of the run): the curve, the page
                    # and the record end at the step the run ended at and its checkpoint holds, not up to 1% before.
                    control.should_log = True
                return control

            def on_log(self, args, state, control, logs=None, **kwargs):
                if distributed.is_main():
                    monitor.record(state, logs or {})

        self.callback = Callback()
        self.folder = folder
        self.tokens_per_epoch = tokens_per_epoch
        self.stop_event = stop_event
        self.on_metrics = on_metrics
        self.started = time.monotonic()
        self.first_step = 0
        self.first_epoch = 0.0
        self.smoother = runs.LossSmoother()
        self.elapsed_before = 0.0  # a resumed run's time up to its checkpoint
        self.evaluation_seconds = 0.0
        self.step_started: float | None = None
        self.slowest_step = 0.0  # seconds, the longest optimizer step so far (evaluations and saves apart)
        self.last: dict[str, Any] = {}

    def record(self, state: Any, logs: dict[str, Any]) -> None:
        import torch

        if "loss" not in logs and "eval_loss" not in logs:
            return  # the trainer's end-of-run summary; the run record keeps it
        elapsed = time.monotonic() - self.started
        steps_done = state.global_step - self.first_step
        entry: dict[str, Any] = {"step": state.global_step, "max_steps": state.max_steps,
                                 "epoch": round(state.epoch or 0.0, 4)}
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
            if key in logs:
                entry[key] = float(logs[key])
        if "loss" in entry:
            entry["loss_smoothed"] = self.smoother.add(entry["loss"])
        if "eval_runtime" in logs:
            entry["eval_seconds"] = round(float(logs["eval_runtime"]), 2)
            self.evaluation_seconds += float(logs["eval_runtime"])
        entry["elapsed_seconds"] = round(self.elapsed_before + elapsed, 2)
        steps_left = state.max_steps - state.global_step
        entry["eta_seconds"] = round(elapsed / steps_done * steps_left, 1) if steps_done else None
        if self.slowest_step:
            entry["slowest_step_seconds"] = round(self.slowest_step, 2)
        if elapsed > 0:
            # Every token is real: examples are tokenized without padding, and packing adds none.
            tokens = ((state.epoch or 0.0) - self.first_epoch) * self.tokens_per_epoch
            entry["tokens_per_second"] = round(tokens / elapsed, 1)
        if torch.cuda.is_available():
            entry["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3, 3)
        self.last.update(entry)
        self.folder.append_metrics(entry)
        if self.on_metrics is not None:
            self.on_metrics(entry)

    def final_metrics(self, *keys: str) -> dict[str, Any]:
        """The last value of each key logged (the raw `loss` kept beside the headline `loss_smoothed`)."""
        return {key: self.last.get(key) for key in keys}


@dataclass
class TrainRequest:
    """The inputs of one call to `train` (the app's `jobs.Job` queues runs; this is what one run is asked to do);
    `stop_event` may be set from another thread to stop and keep the adapter."""

    settings: RunSettings
    resume: str | Path | None = None
    run_id: str | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    on_metrics: Callable[[dict[str, Any]], None] | None = None
    on_status: Callable[[str], None] | None = None
    # Called once the run folder exists (the inputs have passed their checks): where to watch the run.
    on_folder: Callable[[RunFolder], None] | None = None
    extra_callbacks: list[Any] = field(default_factory=list)
    hardware: Hardware | None = None
    # Recorded in a new run's run.json (whose run it is in the app); a resume keeps the run's owner.
    owner: str | None = None


def _status(request: TrainRequest, message: str) -> None:
    if request.on_status is not None:
        request.on_status(message)


def _stop_here_if_asked(request: TrainRequest) -> None:
    """TrainingStopped if a stop was requested (`_run_in_folder` records what it means once the folder exists)."""
    if request.stop_event.is_set():
        raise TrainingStopped(STOPPED_BEFORE_START)


def _unless_stopped(request: TrainRequest, work: Callable[[], T]) -> T:
    """`work()`, or TrainingStopped as soon as the request's stop event is set, even while `work` runs.

    For the stages that cannot look at the event themselves (the data checks, loading a model): `work` runs in a
    helper thread, and on a stop it is left to finish alone; what it returns is dropped.
    """
    _stop_here_if_asked(request)
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as err:  # handed to the caller below
            outcome["error"] = err
        finally:
            done.set()

    threading.Thread(target=run, name=STAGE_THREAD, daemon=True).start()
    while not done.wait(STOP_POLL_SECONDS):
        _stop_here_if_asked(request)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def accumulation_per_process(accumulation: int) -> int:
    """Gradient accumulation for each of several processes, so that the batch of an optimizer step stays what
    the settings make it on one device (each process contributes its own batch to every step)."""
    return max(1, round(accumulation / distributed.world_size()))


def processes_reason(accumulation: int, batch_size: int) -> str:
    processes = distributed.world_size()
    per_process = accumulation_per_process(accumulation)
    return (f"{processes} processes, one per device: {processes} × batch {batch_size} × accumulation "
            f"{per_process} = {processes * batch_size * per_process} examples per step (on one device: "
            f"{batch_size} × {accumulation})")


def stages_left_running() -> bool:
    """Whether a stage that a stop left to finish alone (see `_unless_stopped`) is still running."""
    return any(thread.name == STAGE_THREAD and thread.is_alive() for thread in threading.enumerate())


# ---- the recipe ------------------------------------------------------------------------------------------------


def train(request: TrainRequest) -> RunFolder:
    """Run (or resume) one training run to the end, a stop, or a failure recorded in its run folder.

    The stages, in order: start (settings, machine, the run's name) → prepare data → plan → the run folder →
    load the model → train → save the adapter → answer held-out prompts → record the end. Everything that can be
    wrong with the inputs is found before the run folder exists; from then on every ending is recorded in it.
    """
    with contextlib.ExitStack() as held:
        start = _start(request, held)
        tokenizer, prepared, shape = _prepare(request, start.settings)
        plan, evaluation = _plan(start, prepared, shape, tokenizer)
        _stop_here_if_asked(request)
        if start.resumed is not None:
            folder = _reopen_run_folder(start, prepared, shape)
        else:
            folder = _create_run_folder(request, start, prepared, plan, shape, held)
        if request.on_folder is not None:
            request.on_folder(folder)
        return _run_in_folder(_Run(request, folder, start.settings, plan, tokenizer, prepared, start.checkpoint,
                                   evaluation))


@dataclass
class _Start:
    """What a run is before its data is checked: its settings, the machine, and for a resume its (locked) folder
    and the checkpoint it goes on from."""

    settings: RunSettings
    hardware: Hardware
    resumed: RunFolder | None = None
    checkpoint: Path | None = None


def _start(request: TrainRequest, held: contextlib.ExitStack) -> _Start:
    """Takes the request; gives the run's settings and machine. A resume's settings come from its run.json, a new
    run's name is chosen (`request.run_id`). Several processes (one per GPU) are joined first, so that they can
    agree on the run's folder."""
    hardware = request.hardware or detect_hardware()
    distributed.setup(cpu=hardware.kind == "cpu")
    if request.resume is not None:
        folder = RunFolder.open(request.resume)
        # Taken before the (slow) data checks: a second resume of the same run is refused at once.
        if distributed.is_main():
            held.enter_context(folder.locked())
        settings, checkpoint = _resumable(folder)
        return _Start(settings, hardware, folder, checkpoint)
    settings = RunSettings(**{**asdict(request.settings), "model": request.settings.model or models.default_model()})
    # Every process must name the same new folder: the main one's choice is everyone's.
    request.run_id = distributed.main_first(lambda: _check_new_run_name(settings, request.run_id)
                                            or request.run_id or runs.new_run_id(settings.source))
    return _Start(settings, hardware)


def _check_new_run_name(settings: RunSettings, run_id: str | None) -> None:
    """Refuse a run name that is invalid or taken before the (slow) data checks, not after them."""
    if run_id is not None and (Path(settings.output_dir) / runs.validate_run_id(run_id)).exists():
        raise UserError(f"A run named {run_id} already exists in {settings.output_dir}; choose another name.")


def _resumable(folder: RunFolder) -> tuple[RunSettings, Path]:
    """The settings and last checkpoint of a run that may be resumed (UserError saying why otherwise)."""
    return folder.settings(), runs.check_resumable(folder, folder.read())


def _prepare(request: TrainRequest, settings: RunSettings) -> tuple[Any, PreparedData, ModelShape]:
    """Prepare data. Takes the settings; gives the tokenizer, the checked and split data, and the model's shape.
    Runs in a helper thread, so that a stop returns at once (see `_unless_stopped`)."""
    _status(request, "Checking the data…")
    return _unless_stopped(request, lambda: _check_inputs(request, settings))


def _check_inputs(request: TrainRequest, settings: RunSettings) -> tuple[Any, PreparedData, ModelShape]:
    """The tokenizer, the checked and split data, and the model's shape: all a run needs to know before it starts.

    The checks themselves end at their next batch of rows after a stop, so that a stopped run leaves no work behind.
    """
    check_tracker(settings)
    data.check_source_exists(settings.source)
    tokenizer = models.load_tokenizer(settings.model, settings.trust_remote_code)
    shape = model_shape(settings.model, settings.trust_remote_code)
    check_vocabulary_fits(settings.model, tokenizer, shape)
    prepared = prepare_data(settings, tokenizer, on_progress=lambda done, rows: _stop_here_if_asked(request))
    return tokenizer, prepared, shape


def check_vocabulary_fits(model_name: str, tokenizer: Any, shape: ModelShape) -> None:
    """Refuse a model whose tokenizer needed ChatML tokens its embedding table has no rows for (a model without a
    chat template, whose vocabulary lacks them): it would train on token ids past the table's end. Embeddings
    padded beyond the tokenizer (most models') have room, and pass."""
    if len(tokenizer) <= shape.vocab_size:
        return
    added = [token for token, index in tokenizer.get_added_vocab().items() if index >= shape.vocab_size]
    raise UserError(f"{model_name} has no chat template, and the ChatML tokens it would need "
                    f"({', '.join(sorted(added)) or 'several'}) are not among the {shape.vocab_size:,} tokens its "
                    "embeddings hold. Choose an instruct model (it has a chat template), or a base model whose "
                    "vocabulary has ChatML's tokens (SmolLM2 and Qwen2.5 do).")


def _plan(start: _Start, prepared: PreparedData, shape: ModelShape,
          tokenizer: Any) -> tuple[TrainingPlan, EvaluationPlan | None]:
    """Plan. Takes the settings, machine, data and model shape; gives the training plan (every "auto" resolved,
    each with its reason) and when validation loss is measured (None without validation examples)."""
    settings = start.settings
    stats = prepared.report.stats()
    plan = plan_training(settings, start.hardware, shape, stats["total_tokens"], stats["tokens_per_example"]["max"])
    if distributed.world_size() > 1:
        plan.reasons.append(processes_reason(settings.gradient_accumulation, plan.batch_size))
    evaluation = prepared.evaluation_plan(settings, plan, tokenizer)
    if evaluation is not None:
        plan.reasons.append(evaluation.reason())
    return plan, evaluation


def _reopen_run_folder(start: _Start, prepared: PreparedData, shape: ModelShape) -> RunFolder:
    """The run folder of a resume, marked running again; refused if its data changed or the disk has no room for
    the checkpoints still to come (those it has already take their room)."""
    folder, checkpoint = start.resumed, start.checkpoint
    if (folder.read().get("data") or {}).get("fingerprint") != prepared.fingerprint:
        raise UserError(f"The data of run {folder.run_id} changed since it started ({prepared.report.source}); "
                        "resuming would train on different examples. Start a new run instead.")

    def restart() -> None:
        checkpoints_to_come = max(1, KEEP_CHECKPOINTS + 1 - len(folder.checkpoints()))
        check_free_disk(folder.path, disk_needed(shape.lora_parameters(start.settings.lora_r), checkpoints_to_come))
        folder.update(status=runs.RUNNING, error=None, resumed_from=checkpoint.name)

    distributed.main_first(restart)
    return folder


def _create_run_folder(request: TrainRequest, start: _Start, prepared: PreparedData, plan: TrainingPlan,
                       shape: ModelShape, held: contextlib.ExitStack) -> RunFolder:
    """The new run's folder, locked until `train` returns, with its run.json: settings, plan, data, machine and
    library versions. Refused first if the disk has no room for the run's checkpoints and adapter."""
    settings = start.settings

    def create() -> RunFolder:
        check_free_disk(settings.output_dir, disk_needed(shape.lora_parameters(settings.lora_r)))
        created = RunFolder.create(settings.output_dir, request.run_id)
        held.enter_context(created.locked())
        record = {
            "run_id": created.run_id, "status": runs.RUNNING, "created_at": runs.timestamp(),
            "settings": asdict(settings), "plan": plan.to_dict(), "data": prepared.summary(),
            "hardware": start.hardware.to_dict(), "versions": library_versions(), "base_model": settings.model,
            "final_metrics": {}, "error": None,
        }
        if request.owner is not None:
            record["owner"] = request.owner
        created.write(record)
        return created

    created = distributed.main_first(create)
    return created if distributed.is_main() else RunFolder(Path(settings.output_dir) / request.run_id)


@dataclass
class _Run:
    """A run from the moment its folder exists: what the stages from loading on read, and what each leaves for
    the next. An out-of-memory retry replaces `settings` and `plan`; `model` and `trainer` are dropped when the
    run ends, which is what frees the GPU for the next run."""

    request: TrainRequest
    folder: RunFolder
    settings: RunSettings
    plan: TrainingPlan
    tokenizer: Any
    prepared: PreparedData
    checkpoint: Path | None
    evaluation: EvaluationPlan | None
    model: Any = None
    trainer: Any = None
    monitor: RunMonitor | None = None
    output: Any = None


def _run_in_folder(run: _Run) -> RunFolder:
    """Load, train, save and answer the held-out prompts; record how the run ended (a stop, an interruption or a
    failure included). With several processes every one trains; only the main one saves and records."""
    main = distributed.is_main()
    failure = details = None
    stopped_before_training = False
    try:
        _load_and_train(run)
        if main:
            _save_adapter(run)
            _answer_held_out_prompts(run)
            _record_finished(run)
    except TrainingStopped:
        stopped_before_training = True
    except KeyboardInterrupt:
        if main:
            _record_end(run.folder, status=runs.STOPPED,
                        error="Interrupted; resume continues from the last checkpoint.")
        raise
    except Exception as err:
        failure = (out_of_memory_advice(run.plan) if is_out_of_memory(err)
                   else DISK_FULL_ADVICE if is_disk_full(err, run.folder.path)
                   else f"{type(err).__name__}: {err}")
        details = traceback.format_exc()
    finally:
        # Dropping every reference before collecting is what actually frees the GPU for the next run.
        run.model = run.trainer = None
        release_memory()
    if not main:
        if failure is not None:
            raise TrainingFailed(f"Run {run.folder.run_id} failed in process {distributed.rank()}: {failure}")
        return run.folder
    if stopped_before_training:
        return _record_stopped_before_training(run)
    if failure is not None:
        _record_failure(run, failure, details)
    return run.folder


def _load_and_train(run: _Run) -> None:
    """Load the model, then train it. Out of memory in the first steps, both start again with a smaller plan
    (`plan_after_out_of_memory`) and a fresh curve. Leaves the trained `run.trainer`, its `run.monitor` and
    `run.output`; `run.settings` and `run.plan` are the last attempt's."""
    while True:
        _load_model(run)
        try:
            _train_steps(run)
            return
        except Exception as err:
            if not _shrink_after_out_of_memory(run, err):
                raise


def _load_model(run: _Run) -> None:
    """Load the model. Takes the settings and plan; gives `run.model` and `run.trainer` (its LoRA adapter
    injected, the data tokenized) and `run.monitor`, which streams the metrics and hears a stop."""
    request = run.request
    if models.needs_preparation(run.settings.model):
        # Once per machine (the app does it at start-up); said with its stages, so a first run is not a silent wait.
        _unless_stopped(request, lambda: models.convert_embedded_model(lambda message: _status(request, message)))
    _status(request, f"Loading {run.settings.model}…")
    run.model = _unless_stopped(request, lambda: load_model_for_training(run.settings, run.plan))
    run.trainer = _unless_stopped(request, lambda: build_trainer(
        run.settings, run.plan, run.folder, run.model, run.tokenizer, run.prepared, request.stop_event,
        run.evaluation))
    run.monitor = RunMonitor(run.folder, token_count(run.trainer.train_dataset), request.stop_event,
                             request.on_metrics)
    run.trainer.add_callback(run.monitor.callback)
    for callback in request.extra_callbacks:
        run.trainer.add_callback(callback)
    _stop_here_if_asked(request)


def _train_steps(run: _Run) -> None:
    """Train: every step of the run, from its checkpoint on a resume; a stop ends it at the end of a step, saved.
    Gives `run.output`, the trainer's summary."""
    _status(run.request, "Training…")
    run.output = run.trainer.train(resume_from_checkpoint=str(run.checkpoint) if run.checkpoint else None)


def _shrink_after_out_of_memory(run: _Run, err: Exception) -> bool:
    """Whether to start the run again after `err`: only when out of memory in its first steps, in one process,
    with a smaller plan left to try; then that plan is the run's (and its run.json's), and its curve is emptied."""
    trainer = run.trainer
    if not (is_out_of_memory(err) and run.checkpoint is None and distributed.world_size() == 1
            and trainer.state.global_step < RETRY_OUT_OF_MEMORY_BEFORE_STEP):
        return False
    smaller = plan_after_out_of_memory(run.settings, run.plan)
    if smaller is None:
        return False
    run.settings, run.plan, change = smaller
    # A fresh model (the adapter was injected into this one) and a fresh curve: the run starts over.
    del trainer
    run.model = run.trainer = None
    release_memory()
    run.folder.metrics_path.unlink(missing_ok=True)
    run.folder.update(settings=asdict(run.settings), plan=run.plan.to_dict())
    _status(run.request, f"Out of memory: {change}; starting again.")
    return True


def _save_adapter(run: _Run) -> None:
    """Save: the trained adapter and the tokenizer, into the run folder's adapter/."""
    _status(run.request, "Saving the adapter…")
    run.trainer.model.save_pretrained(run.folder.adapter_path, safe_serialization=True)
    run.tokenizer.save_pretrained(run.folder.adapter_path)


def _answer_held_out_prompts(run: _Run) -> None:
    """Answer samples: a few held-out prompts answered after and before training, into samples.json (skipped
    after a stop)."""
    samples = sample_prompts(run.prepared, run.settings.sample_prompts)
    if samples and not run.request.stop_event.is_set():
        _status(run.request, "Answering held-out prompts…")
        answer_before_and_after(run.trainer.model, run.tokenizer, samples, run.folder, run.request.stop_event)


def _record_finished(run: _Run) -> None:
    """Record the end of a run that trained: `finished` if every step was done (a stop while saving or answering
    included), else `stopped` at its step, with a checkpoint and the adapter saved; its final metrics."""
    monitor, state = run.monitor, run.trainer.state
    # The headline is the smoothed loss (and the validation loss); the last step's raw loss is kept beside it.
    final = monitor.final_metrics("loss_smoothed", "eval_loss", "loss", "step", "epoch", "tokens_per_second")
    final.update(train_runtime_seconds=round(run.output.metrics.get("train_runtime", 0.0), 1),
                 evaluation_seconds=round(monitor.evaluation_seconds, 1),
                 train_loss=run.output.metrics.get("train_loss"))
    status = runs.FINISHED if state.global_step >= state.max_steps else runs.STOPPED
    run.folder.update(status=status, final_metrics=final, error=None)
    if status == runs.STOPPED:
        _status(run.request, f"Stopped at step {state.global_step} of {state.max_steps}: a checkpoint and the "
                             "adapter are saved.")


def _record_stopped_before_training(run: _Run) -> RunFolder:
    """Record a stop before the first step: a resumed run still has the checkpoint it resumed from; a new one has
    nothing to resume."""
    _record_end(run.folder, status=runs.STOPPED, error=None if run.checkpoint else STOPPED_BEFORE_FIRST_STEP)
    _status(run.request, f"Stopped before training resumed; {run.checkpoint.name} is kept." if run.checkpoint
            else STOPPED_BEFORE_FIRST_STEP)
    return run.folder


def _record_failure(run: _Run, failure: str, details: str) -> NoReturn:
    """Record a failure, then raise it as TrainingFailed: the run record first (it is small, and it is what the app
    and the command line read), then the traceback in failure.txt if there is room for it."""
    folder = run.folder
    unrecorded = _record_end(folder, status=runs.FAILED, error=failure,
                             final_metrics=run.monitor.final_metrics("loss_smoothed", "eval_loss", "loss", "step")
                             if run.monitor else {})
    if unrecorded is None:
        # The full traceback is for whoever debugs the tool.
        failure_file = folder.path / FAILURE_FILE
        try:
            failure_file.write_text(details, encoding="utf-8")
        except OSError:
            failure_file.unlink(missing_ok=True)
    elif failure != DISK_FULL_ADVICE:
        failure += " Its run.json could not be updated either: " + (
            DISK_FULL_ADVICE if is_disk_full(unrecorded) else f"{unrecorded.strerror or unrecorded}.")
    raise TrainingFailed(f"Run {folder.run_id} failed: {failure}")


def _record_end(folder: RunFolder, **changes: Any) -> OSError | None:
    """Write how the run ended into run.json; the error when even that cannot be written.

    On a disk that filled up while a checkpoint was saved, the partial checkpoint took the last free bytes; it
    is never resumed from, so it makes way for the record.
    """
    try:
        folder.update(**changes)
        return None
    except OSError as err:
        partial = folder.incomplete_checkpoints()
        if not partial or not is_disk_full(err, folder.path):
            return err
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    try:
        folder.update(**changes)
    except OSError as err:
        return err
    return None
