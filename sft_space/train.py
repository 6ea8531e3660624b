"""The training recipe: one LoRA/QLoRA SFT run with TRL, shared by the app, the CLI and the benchmark, as named
stages read top to bottom from `train`. Its components: the examples it trains on (training_data.py), the plans
around the machine's (planning.py: when to evaluate, what to try after running out of memory, the disk's room),
and the trainer's parts (trainer.py: the model, the trainer, its loss and the monitor of its steps).

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
import shutil
import threading
import traceback
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

from . import catalog, data, distributed, events, models, runs, threads
from .chat import generate_reply
from .errors import UserError
from .hardware import Hardware, TrainingPlan, detect_hardware, plan_training
from .memory import ModelShape
from .planning import (DISK_FULL_ADVICE, KEEP_CHECKPOINTS, RETRY_OUT_OF_MEMORY_BEFORE_STEP, EvaluationPlan,
                       check_free_disk, disk_needed, is_disk_full, is_out_of_memory, out_of_memory_advice,
                       plan_after_out_of_memory)
from .runs import RunFolder
from .settings import GenerationSettings, RunSettings
from .trainer import RunMonitor, build_trainer, check_tracker, load_model_for_training, release_memory
from .training_data import PreparedData, prepare_data, token_count

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")
SAMPLE_MAX_NEW_TOKENS = 96
FAILURE_FILE = "failure.txt"
STOPPED_BEFORE_START = "Stopped before the run started; nothing was written."
STOPPED_BEFORE_FIRST_STEP = "The run was stopped before its first step; start it again."
# How often a stage run in a helper thread looks at the stop event.
STOP_POLL_SECONDS = 0.1
STAGE_THREAD = "sft-space-stage"
T = TypeVar("T")


class TrainingFailed(UserError):
    """A run that started and could not finish; its run.json says why."""


class TrainingStopped(UserError):
    """Stopped on request before the run folder existed (or before a resume changed it): nothing was written."""


@dataclass
class TrainRequest:
    """The inputs of one call to `train` (the app's `jobs.Job` queues runs; this is what one run is asked to do);
    `stop_event` may be set from another thread to stop and keep the adapter."""

    settings: RunSettings
    resume: str | Path | None = None
    run_id: str | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    # Where the run's events go (events.jsonl once the folder exists; the command line's also print them).
    events: events.EventLog = field(default_factory=events.EventLog)
    # Called once the run folder exists (the inputs have passed their checks): where to watch the run.
    on_folder: Callable[[RunFolder], None] | None = None
    extra_callbacks: list[Any] = field(default_factory=list)
    hardware: Hardware | None = None
    # Recorded in a new run's run.json (whose run it is in the app); a resume keeps the run's owner.
    owner: str | None = None


# ---- the recipe ------------------------------------------------------------------------------------------------


def train(request: TrainRequest) -> RunFolder:
    """Run (or resume) one training run to the end, a stop, or a failure recorded in its run folder.

    The stages, in order: start (settings, machine, the run's name) → prepare data → plan → the run folder →
    load the model → train → save the adapter → answer held-out prompts → record the end. Everything that can be
    wrong with the inputs is found before the run folder exists; from then on every ending is recorded in it.
    """
    with contextlib.ExitStack() as held:
        start = _start(request, held)
        request.events.emit(events.Started(run_id=start.resumed.run_id if start.resumed else request.run_id,
                                           processes=distributed.world_size(),
                                           resumed_from=start.checkpoint.name if start.checkpoint else None))
        tokenizer, prepared, shape = _prepare(request, start.settings)
        plan, evaluation = _plan(start, prepared, shape, tokenizer)
        request.events.emit(events.Plan(plan=plan.to_dict(), from_step=_step_of(start.checkpoint)))
        _stop_here_if_asked(request)
        if start.resumed is not None:
            folder = _reopen_run_folder(start, prepared, shape)
        else:
            folder = _create_run_folder(request, start, prepared, plan, shape, held)
        if distributed.is_main():
            request.events.attach(folder.path)
        if request.on_folder is not None:
            request.on_folder(folder)
        return _run_in_folder(_Run(request, folder, start.settings, plan, tokenizer, prepared, start.checkpoint,
                                   evaluation))


def _step_of(checkpoint: Path | None) -> int:
    """The step a checkpoint was saved at; 0 for none (a new run)."""
    return int(checkpoint.name.removeprefix("checkpoint-")) if checkpoint else 0


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
    distributed.setup(cpu=hardware.kind == "cpu", stop_event=request.stop_event,
                      stopped=lambda: TrainingStopped(STOPPED_BEFORE_START))
    held.callback(distributed.leave)
    if request.resume is not None:
        folder = RunFolder.open(request.resume)
        # Taken before the (slow) data checks: a second resume of the same run is refused at once.
        if distributed.is_main():
            held.enter_context(folder.locked())
        settings, checkpoint = _resumable(folder)
        return _Start(settings, hardware, folder, checkpoint)
    settings = RunSettings(**{**asdict(request.settings), "model": request.settings.model or models.default_model()})
    # Every process must name the same new folder: the main one's choice is everyone's.
    request.run_id = distributed.from_main(lambda: _check_new_run_name(settings, request.run_id)
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
    Runs in a helper thread, so that a stop returns at once (see `_unless_stopped`). With several processes the
    main one checks and tokenizes, once, and the others receive its data and load only the tokenizer."""
    _status(request, "Checking the data…")
    checked: list[Any] = []

    def check() -> tuple[PreparedData, ModelShape]:
        checked.extend(_unless_stopped(request, lambda: _check_inputs(request, settings)))
        return checked[1], checked[2]

    prepared, shape = distributed.from_main(check)
    tokenizer = checked[0] if checked else _unless_stopped(
        request, lambda: models.load_tokenizer(settings.model, settings.trust_remote_code))
    return tokenizer, prepared, shape


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
    plan = plan_training(settings, start.hardware, shape, stats["total_tokens"], stats["tokens_per_example"]["max"],
                         processes=distributed.world_size())
    if distributed.world_size() > 1:
        split = distributed.split_step(plan.batch_size, settings.gradient_accumulation, distributed.world_size(),
                                       batch_chosen=settings.batch_size > 0)
        plan = replace(plan, batch_size=split.batch_size, processes=split.processes,
                       reasons=[*plan.reasons, split.reason()])
    evaluation = prepared.evaluation_plan(settings, plan, tokenizer, plan.examples_per_step)
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

    distributed.main_only(restart)
    return folder


def _create_run_folder(request: TrainRequest, start: _Start, prepared: PreparedData, plan: TrainingPlan,
                       shape: ModelShape, held: contextlib.ExitStack) -> RunFolder:
    """The new run's folder, locked until `train` returns, with its run.json: settings, plan, data, machine and
    library versions. Refused first if the disk has no room for the run's checkpoints and adapter."""
    settings = start.settings

    created: list[RunFolder] = []

    def create() -> None:
        check_free_disk(settings.output_dir, disk_needed(shape.lora_parameters(settings.lora_r)))
        folder = RunFolder.create(settings.output_dir, request.run_id)
        held.enter_context(folder.locked())
        record = {
            "run_id": folder.run_id, "status": runs.RUNNING, "created_at": runs.timestamp(),
            "settings": asdict(settings), "plan": plan.to_dict(), "data": prepared.summary(),
            "hardware": start.hardware.to_dict(), "versions": library_versions(), "base_model": settings.model,
            "final_metrics": {}, "error": None,
        }
        if request.owner is not None:
            record["owner"] = request.owner
        folder.write(record)
        created.append(folder)

    distributed.main_only(create)
    return created[0] if created else RunFolder(Path(settings.output_dir) / request.run_id)


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
    failure included). With several processes every one trains; only the main one saves and records. A sharded
    model's weights are spread over every process, so each takes part in saving the adapter and in every token of
    the held-out answers; the main one writes them."""
    main = distributed.is_main()
    failure = details = None
    stopped_before_training = False
    try:
        _load_and_train(run)
        if main or run.plan.sharded:
            _save_adapter(run)
            _answer_held_out_prompts(run)
        if main:
            _record_finished(run)
    except TrainingStopped:
        stopped_before_training = True
    except KeyboardInterrupt:
        if main:
            interrupted = "Interrupted; resume continues from the last checkpoint."
            _record_end(run.folder, status=runs.STOPPED, error=interrupted)
            _say_end(run.request, events.Stopped(reason=interrupted, run_dir=str(run.folder.path)))
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
        run.settings, run.plan, run.folder, run.model, run.tokenizer, run.prepared,
        gradient_accumulation=run.plan.gradient_accumulation,
        evaluation=run.evaluation, stop_event=request.stop_event))
    run.monitor = RunMonitor(run.folder, token_count(run.trainer.train_dataset), request.stop_event,
                             request.events)
    run.trainer.add_callback(run.monitor.callback)
    for callback in request.extra_callbacks:
        run.trainer.add_callback(callback)
    _stop_here_if_asked(request)
    distributed.check_same_everywhere(training_summary(run))


def training_summary(run: _Run) -> dict[str, Any]:
    """What this process is about to train on, which every process must agree on before step 1: another machine's
    data, tokenization (another library version) or plan would train something else, or wait in a collective."""
    import pyarrow.compute as pc

    table, parts = run.trainer.train_dataset.data, []
    for name in ("input_ids", "labels", "completion_mask", "position_ids"):
        if name in table.column_names:
            column = table.column(name)
            parts += [name, pc.list_value_length(column).to_numpy().tobytes(),
                      pc.list_flatten(column).to_numpy().tobytes()]
    settings, plan = run.settings, run.plan
    return {"training data": distributed.fingerprint(*parts), "model": settings.model,
            "examples per step": plan.examples_per_step, "batch size": plan.batch_size,
            "gradient accumulation": plan.gradient_accumulation, "sequence length": plan.sequence_length,
            "packing": plan.packing, "precision": plan.precision, "4-bit": plan.four_bit, "sharded": plan.sharded,
            "schedule": (settings.epochs, settings.max_steps, settings.learning_rate, settings.lr_scheduler),
            "seed": settings.seed, "LoRA": (settings.lora_r, settings.lora_alpha, settings.target_modules)}


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
    run.folder.update(settings=asdict(run.settings), plan=run.plan.to_dict())
    _status(run.request, f"Out of memory: {change}; starting again.")
    run.request.events.emit(events.Plan(plan=run.plan.to_dict(), from_step=0))
    return True


def _save_adapter(run: _Run) -> None:
    """Save: the trained adapter and the tokenizer, into the run folder's adapter/. A sharded adapter is gathered
    whole first, every process sending its shares; the main process writes it, once."""
    _status(run.request, "Saving the adapter…")
    model = run.trainer.model
    state = gathered_adapter(model) if run.plan.sharded else None
    if distributed.is_main():
        model.save_pretrained(run.folder.adapter_path, state_dict=state, safe_serialization=True)
        run.tokenizer.save_pretrained(run.folder.adapter_path)


def gathered_adapter(model: Any) -> dict[str, Any]:
    """The trained (adapter) weights whole, on the CPU, by name: a sharded weight (FSDP2's DTensor) is gathered
    from every process, which must all call this, in the same order (the model's). Only the adapter: gathering
    the base model's weights as well would put the whole model in one process's memory."""
    from torch.distributed.tensor import DTensor

    return {name: (weight.full_tensor() if isinstance(weight, DTensor) else weight).detach().cpu()
            for name, weight in model.named_parameters() if weight.requires_grad}


def _answer_held_out_prompts(run: _Run) -> None:
    """Answer samples: a few held-out prompts answered after and before training, into samples.json (skipped
    after a stop)."""
    samples = sample_prompts(run.prepared, run.settings.sample_prompts)
    together = run.plan.sharded
    if together:
        # Every process computes every token of each answer (each holds a share of every layer), so each must
        # make as many forward passes as the others: generation runs on, finished or not, until all are done
        # (transformers' synced generation, which it turns on for the FSDP-managed models it marks this way;
        # accelerate's sharding does not mark them).
        run.trainer.model.get_base_model()._is_fsdp_managed_module = True
    if samples and not _stop_asked(run.request.stop_event, together):
        _status(run.request, "Answering held-out prompts…")
        answer_before_and_after(run.trainer.model, run.tokenizer, samples, run.folder, run.request.stop_event,
                                together)
        run.request.events.emit(events.Samples(answers=sum("after" in sample for sample in samples)))


def _record_finished(run: _Run) -> None:
    """Record the end of a run that trained: `finished` if every step was done (a stop while saving or answering
    included), else `stopped` at its step, with a checkpoint and the adapter saved; its final metrics."""
    state = run.trainer.state
    # The headline is the smoothed loss (and the validation loss); the last step's raw loss is kept beside it.
    final = events.final_metrics(run.folder.read_metrics())
    final.update(train_runtime_seconds=round(run.output.metrics.get("train_runtime", 0.0), 1),
                 train_loss=run.output.metrics.get("train_loss"))
    status = runs.FINISHED if state.global_step >= state.max_steps else runs.STOPPED
    run.folder.update(status=status, final_metrics=final, error=None)
    run_dir = str(run.folder.path)
    _say_end(run.request, events.Finished(run_dir=run_dir, final_metrics=final) if status == runs.FINISHED
             else events.Stopped(reason=f"Stopped at step {state.global_step} of {state.max_steps}: a checkpoint "
                                        "and the adapter are saved.", run_dir=run_dir, final_metrics=final))


def _record_stopped_before_training(run: _Run) -> RunFolder:
    """Record a stop before the first step: a resumed run still has the checkpoint it resumed from; a new one has
    nothing to resume."""
    _record_end(run.folder, status=runs.STOPPED, error=None if run.checkpoint else STOPPED_BEFORE_FIRST_STEP)
    reason = (f"Stopped before training resumed; {run.checkpoint.name} is kept." if run.checkpoint
              else STOPPED_BEFORE_FIRST_STEP)
    _say_end(run.request, events.Stopped(reason=reason, run_dir=str(run.folder.path)))
    return run.folder


def _record_failure(run: _Run, failure: str, details: str) -> NoReturn:
    """Record a failure, then raise it as TrainingFailed: the run record first (it is small, and it is what the app
    and the command line read), then the traceback in failure.txt if there is room for it."""
    folder = run.folder
    unrecorded = _record_end(folder, status=runs.FAILED, error=failure,
                             final_metrics=events.final_metrics(folder.read_metrics()))
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
    _say_end(run.request, events.Failed(reason=failure, run_dir=str(folder.path)))
    raise TrainingFailed(f"Run {folder.run_id} failed: {failure}")


def _say_end(request: TrainRequest, ending: Any) -> None:
    """The run's terminal event. On a full disk its line in events.jsonl may not fit: run.json has the outcome
    already, and stdout still says it."""
    try:
        request.events.emit(ending)
    except OSError:
        pass


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


# ---- what the stages share -------------------------------------------------------------------------------------


def _status(request: TrainRequest, message: str) -> None:
    request.events.emit(events.Status(message=message))


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
    return threads.wait_for(work, STAGE_THREAD, give_up=lambda: _stop_here_if_asked(request),
                            poll_seconds=STOP_POLL_SECONDS)


def stages_left_running() -> bool:
    """Whether a stage that a stop left to finish alone (see `_unless_stopped`) is still running."""
    return threads.still_running(STAGE_THREAD)


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


def sample_prompts(prepared: PreparedData, count: int) -> list[dict[str, Any]]:
    """The opening of a few held-out conversations (up to the first reply), with the reply they had."""
    pool = [e for e in (prepared.validation or prepared.train) if e.messages is not None]
    samples = []
    for example in pool[:count]:
        first_reply = next(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        prompt = [{"role": m["role"], "content": m["content"]} for m in example.messages[:first_reply]]
        samples.append({"row": example.row, "prompt": prompt, "reference": example.messages[first_reply]["content"]})
    return samples


def _stop_asked(stop_event: threading.Event, together: bool) -> bool:
    """Whether to stop answering; `together`: every process answers in step, so all must stop at the same answer
    (a collective, which each reaches at the same point)."""
    return distributed.any_process(stop_event.is_set()) if together else stop_event.is_set()


def answer_samples(model: Any, tokenizer: Any, samples: list[dict[str, Any]], key: str,
                   stop_event: threading.Event | None = None, together: bool = False) -> bool:
    """Answer each sample's prompt into `sample[key]`; False if `stop_event` cut the answers short (a reply cut
    off mid-way is not kept). `together`: every process answers each sample with a share of the model."""
    settings = GenerationSettings(max_new_tokens=SAMPLE_MAX_NEW_TOKENS)
    stop_event = stop_event or threading.Event()
    was_training = model.training
    model.eval()
    try:
        for sample in samples:
            if _stop_asked(stop_event, together):
                return False
            reply = generate_reply(model, tokenizer, sample["prompt"], settings, stop_event=stop_event)
            if _stop_asked(stop_event, together):
                return False
            sample[key] = reply
        return True
    finally:
        model.train(was_training)


def answer_before_and_after(model: Any, tokenizer: Any, samples: list[dict[str, Any]], folder: RunFolder,
                            stop_event: threading.Event, together: bool = False) -> None:
    """Each sample answered by the trained adapter ("after") and by the base model ("before"), written to the run's
    samples.json. The base model's answers come from the same weights with the adapter switched off (LoRA leaves
    the base untouched), after training: nothing delays the first step. A stop skips the answers left; the ones
    given are kept. `together`: every process answers (see `answer_samples`); the main one writes."""
    write = not together or distributed.is_main()
    if not answer_samples(model, tokenizer, samples, "after", stop_event, together):
        return
    if write:
        runs.write_json_atomic(folder.samples_path, samples)
    with model.disable_adapter():
        if answer_samples(model, tokenizer, samples, "before", stop_event, together) and write:
            runs.write_json_atomic(folder.samples_path, samples)
