"""The trainer's parts, which the recipe (train.py) puts together: the model loaded for training, the LoRA
adapter's configuration, TRL's SFTTrainer over our tokenized examples (with a loss that applies the LM head only
where a token is trained, and evaluations a stop can cut short), the trackers, and `RunMonitor`, which writes each
logged step to the run folder and hears a stop.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import os
import sys
import threading
import time
from typing import Any

from . import distributed, events, models, runs
from .errors import UserError
from .hardware import TrainingPlan
from .planning import KEEP_CHECKPOINTS, EvaluationPlan
from .runs import RunFolder
from .settings import RunSettings
from .training_data import PreparedData, tokenize_examples

# Logging and checkpoints as a share of the run's steps, so that a 20-step run logs every step and a 2,000-step
# run every 20.
LOG_EVERY_FRACTION = 0.01
SAVE_EVERY_FRACTION = 0.1


class _EvaluationStopped(Exception):
    """Raised between evaluation batches when a stop is requested; the trainer catches it (see build_trainer)."""


def torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def leave_out_bitsandbytes() -> None:
    """Keep bitsandbytes from loading in a run that does not quantize. PEFT imports it whenever it is installed,
    which takes ~1.5 s on a 2-core CPU machine (of the ~9.5 s before the first loss), and nothing else in such a
    run uses it; PEFT and transformers then see it as absent. Only while nothing has imported it yet."""
    if "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # the import system's "not installed"


def quantized_storage_precision(plan: TrainingPlan) -> str | None:
    """The float type a sharded 4-bit model packs its 4-bit weights in (None unsharded: bitsandbytes' uint8). FSDP
    shards floating-point tensors only; bf16 training stores them in bf16, and fp16 training in fp32, which PEFT's
    FSDP guide gives for stable fp16 mixed precision. The model loads in the same type, so that every weight FSDP
    shares out has one type."""
    if not (plan.sharded and plan.four_bit):
        return None
    return "bf16" if plan.precision == "bf16" else "fp32"


def load_model_kwargs(settings: RunSettings, plan: TrainingPlan) -> dict[str, Any]:
    """from_pretrained's arguments for the plan: the dtype, 4-bit quantization, and where the weights go."""
    storage = quantized_storage_precision(plan)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(storage or plan.precision), "attn_implementation": "sdpa",
                              "trust_remote_code": settings.trust_remote_code}
    if plan.four_bit:
        from transformers import BitsAndBytesConfig

        extra = {"bnb_4bit_quant_storage": torch_dtype(storage)} if storage else {}
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(plan.precision if plan.precision != "fp32" else "fp16"), **extra)
    if plan.device == "cuda" and not plan.sharded:
        import torch

        kwargs["device_map"] = {"": torch.cuda.current_device()}
    return kwargs


def load_model_for_training(settings: RunSettings, plan: TrainingPlan) -> Any:
    if not plan.four_bit:
        leave_out_bitsandbytes()
    if plan.sharded and not plan.four_bit:
        # Read by transformers as it loads: only the first process of each machine reads the weights, the others
        # build the model empty and receive their shares when FSDP shards it (accelerate broadcasts them). A 4-bit
        # model is quantized whole on every process's GPU either way (transformers loads quantized models there).
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"
    return models.load_causal_lm(settings.model, **load_model_kwargs(settings, plan))


def fsdp_arguments(plan: TrainingPlan, layer_classes: list[str]) -> dict[str, Any]:
    """TrainingArguments' FSDP settings for a sharded plan (none otherwise), for accelerate's FSDP plugin: FSDP2
    (torch's fully_shard, which shards each parameter, so that LoRA's trainable weights and the frozen base share a
    layer without FSDP1's use_orig_params), each decoder layer wrapped alone (transformers' class names; PEFT's wrap
    policy, which the Trainer puts in place for an adapter, also wraps the adapter's layers), activation
    checkpointing through FSDP's own setting (the model's would gather every layer's weights once more in the
    backward pass; transformers refuses both), and checkpoints saved with a full, gathered state dict."""
    if not plan.sharded:
        return {}
    return {"fsdp": True, "fsdp_config": {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": layer_classes,
        "reshard_after_forward": True,
        "activation_checkpointing": plan.gradient_checkpointing,
        "state_dict_type": "FULL_STATE_DICT",
        "cpu_ram_efficient_loading": not plan.four_bit,
    }}


def decoder_layer_classes(model: Any) -> list[str]:
    """The class names of the model's decoder layers: what transformers keeps whole when it splits a model across
    devices (`_no_split_modules`), under PEFT's wrapper when there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = list(getattr(base, "_no_split_modules", None) or [])
    if not names:
        raise UserError(f"{type(base).__name__} does not name its decoder layers (transformers' _no_split_modules), "
                        "so it cannot be sharded layer by layer. Set shard to 'off'.")
    return names


def lora_config(settings: RunSettings) -> Any:
    from peft import LoraConfig

    targets: Any = settings.target_modules.strip() or "all-linear"
    if targets != "all-linear":
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM", bias="none")


def trainer_arguments(settings: RunSettings, plan: TrainingPlan, folder: RunFolder,
                      evaluation: EvaluationPlan | None, gradient_accumulation: int,
                      layer_classes: list[str] | None = None) -> Any:
    """TRL's SFTConfig for the run; `gradient_accumulation` is each process's (see `build_trainer`);
    `layer_classes`: the model's decoder layers, which a sharded plan wraps one by one."""
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
        gradient_accumulation_steps=gradient_accumulation,
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
        activation_checkpointing=plan.gradient_checkpointing and not plan.sharded,
        **fsdp_arguments(plan, layer_classes or []),
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
        # Progress goes to the run's events (the CLI's lines, the app's plot), not to tqdm.
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
                  prepared: PreparedData, *, gradient_accumulation: int, evaluation: EvaluationPlan | None = None,
                  stop_event: threading.Event | None = None) -> Any:
    """TRL's SFTTrainer over our tokenized examples and mask, with a LoRA adapter on `model`; validation loss as
    `evaluation` plans it (none without a plan). `gradient_accumulation` is each process's: with several, each
    contributes its own batches to every optimizer step (the recipe divides the settings' among them).

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
    eval_dataset = tokenize_examples(tokenizer, prepared.validation[:evaluation.examples]) if evaluation else None
    args = trainer_arguments(settings, plan, folder, evaluation, gradient_accumulation,
                             decoder_layer_classes(model) if plan.sharded else None)
    trainer = StoppableSFTTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                  processing_class=tokenizer, peft_config=lora_config(settings))
    if plan.sharded and not trainer.is_fsdp_enabled:
        # accelerate turns FSDP on for GPU process groups only; anywhere else the Trainer would quietly train a
        # whole copy of the model in every process.
        raise UserError("The plan shards the model (FSDP), but the trainer set up no sharding: that needs CUDA GPUs "
                        "and several processes (train --nproc-per-node N). Set shard to 'off' to train unsharded.")
    # Without tqdm the trainer prints every log as a raw dict on stdout; RunMonitor reports progress instead.
    trainer.remove_callback(PrinterCallback)
    if plan.precision == "fp16":
        # fp16 mixed precision scales the loss; the trainable (adapter) weights must stay in fp32 for that.
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    return trainer


class RunMonitor:
    """Says each logged step and evaluation as an event (with the smoothed training loss), each checkpoint, and the
    stop it hears, which it makes the trainer's: a checkpoint at the end of the step, then the end of training."""

    def __init__(self, folder: RunFolder, tokens_per_epoch: int, stop_event: threading.Event,
                 log: events.EventLog):
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
                    if distributed.is_main():
                        monitor.log.emit(events.Stopping(step=state.global_step))
                if control.should_training_stop or state.global_step >= state.max_steps:
                    # The last step is logged whatever the logging interval (1% of the run): the curve, the page
                    # and the record end at the step the run ended at and its checkpoint holds, not up to 1% before.
                    control.should_log = True
                return control

            def on_log(self, args, state, control, logs=None, **kwargs):
                if distributed.is_main():
                    monitor.record(state, logs or {})

            def on_save(self, args, state, control, **kwargs):
                if distributed.is_main():
                    monitor.log.emit(events.Checkpoint(step=state.global_step,
                                                       name=f"checkpoint-{state.global_step}"))

        self.callback = Callback()
        self.folder = folder
        self.tokens_per_epoch = tokens_per_epoch
        self.stop_event = stop_event
        self.log = log
        self.started = time.monotonic()
        self.first_step = 0
        self.first_epoch = 0.0
        self.smoother = runs.LossSmoother()
        self.elapsed_before = 0.0  # a resumed run's time up to its checkpoint
        self.step_started: float | None = None
        self.slowest_step = 0.0  # seconds, the longest optimizer step so far (evaluations and saves apart)

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
        kind = events.Evaluation if "eval_loss" in entry else events.Step
        self.log.emit(kind(**{spec.name: entry[spec.name] for spec in dataclasses.fields(kind)
                              if entry.get(spec.name) is not None}))
