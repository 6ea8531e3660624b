"""The training engine on a tiny random Llama: loss, mask, metrics, stop/resume, failures, run folder."""

import dataclasses
import gc
import json
import math
import os
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, TrainerCallback

from builders import SAMPLE_DATA, distinct_chats, persona_chats
from sft_space import events, models, render, runs
from sft_space.chat import load_chat_model
from sft_space.hardware import detect_hardware, plan_training
from sft_space.settings import GenerationSettings, run_settings
from sft_space.train import (STOPPED_BEFORE_FIRST_STEP, TrainRequest, TrainingFailed, TrainingStopped, model_shape,
                             train)
from sft_space.trainer import build_trainer, trained_positions_loss
from sft_space.training_data import prepare_data, token_count

PLANTED_TOKEN = "hf_PlantedSecretTokenForTests0123456789"


@pytest.fixture
def tiny_settings(tiny_model_dir, tmp_path, write_jsonl):
    def make(rows=None, **values):
        source = write_jsonl(rows if rows is not None else persona_chats(24))
        defaults = dict(source=str(source), model=str(tiny_model_dir), output_dir=str(tmp_path / "runs"),
                        max_steps=8, learning_rate=5e-3, warmup_ratio=0.0, lr_scheduler="constant_with_warmup",
                        sample_prompts=1, validation_fraction=0.1, seed=0)
        return run_settings("quick", **{**defaults, **values})

    return make


def listening(on_status=None, on_point=None):
    """A run's event log that hands the test each status message, and each step or evaluation, as it is said."""
    def hear(event):
        if event["event"] == "status" and on_status is not None:
            on_status(event["message"])
        elif event["event"] in ("step", "evaluation") and on_point is not None:
            on_point(event)
    return events.EventLog(listeners=[hear])


def attempts(folder):
    """The kinds of a run's events, one list per attempt (each opens with `started`)."""
    said = []
    for event in folder.read_events():
        if event["event"] == "started":
            said.append([])
        said[-1].append(event["event"])
    return said


def ends_once(kinds, ending):
    return kinds[-1] == ending and sum(kind in events.TERMINAL for kind in kinds) == 1


class RaiseAtStep(TrainerCallback):
    def __init__(self, step, error):
        self.step, self.error = step, error

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise self.error


@pytest.mark.slow
def test_training_drives_the_loss_down_and_fills_the_run_folder(tiny_settings, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", PLANTED_TOKEN)
    settings = tiny_settings(max_steps=24, packing=False, batch_size=4)
    seen_while_running = []

    def on_point(entry):
        # Told after the line is appended: the file must already hold it while training is under way.
        folder = runs.RunFolder(Path(settings.output_dir) / "overfit")
        seen_while_running.append((len(folder.read_metrics()), folder.read()["status"]))

    statuses = []
    folder = train(TrainRequest(settings, events=listening(statuses.append, on_point), run_id="overfit"))
    # The run's events, in order: what it said before its folder existed included, one ending.
    [kinds] = attempts(folder)
    assert kinds[:2] == ["started", "status"] and kinds.index("plan") < kinds.index("step")
    assert kinds.index("checkpoint") < kinds.index("samples") < len(kinds) - 1 and ends_once(kinds, "finished")
    assert folder.read_events()[-1]["final_metrics"] == folder.read()["final_metrics"]
    assert "Checking the data…" in statuses and "Training…" in statuses

    metrics = folder.read_metrics()
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert metrics[0]["step"] == 1, "the curve must start at the first step"
    assert len(losses) >= 20
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3
    assert any("eval_loss" in m for m in metrics)
    for entry in metrics:
        assert {"step", "epoch", "elapsed_seconds", "eta_seconds", "tokens_per_second"} <= set(entry)
    assert seen_while_running and all(status == "running" for _, status in seen_while_running)
    assert [n for n, _ in seen_while_running] == list(range(1, len(seen_while_running) + 1))

    record = folder.read()
    assert record["status"] == runs.FINISHED
    assert record["settings"]["model"] == settings.model and record["settings"]["max_steps"] == 24
    assert record["data"]["fingerprint"].startswith("sha256:")
    assert record["data"]["train_examples"] + record["data"]["validation_examples"] == 24
    assert {"torch", "transformers", "trl", "peft"} <= set(record["versions"])
    # bf16 where the CPU has bf16 instructions (see test_plan.py), fp32 elsewhere.
    assert record["hardware"]["kind"] == "cpu"
    assert record["plan"]["precision"] == ("bf16" if detect_hardware().native_bf16 else "fp32")
    assert record["final_metrics"]["step"] == 24 and record["final_metrics"]["loss"] is not None
    # Each logged step carries the smoothed loss beside its raw loss; the record's headline is the last smoothed
    # value (the raw last-step loss kept beside it), with the time evaluation took.
    smoother = runs.LossSmoother()
    assert [m["loss_smoothed"] for m in metrics if "loss" in m] == pytest.approx([smoother.add(x) for x in losses])
    final, trained = record["final_metrics"], [m for m in metrics if "loss" in m]
    assert final["loss_smoothed"] == trained[-1]["loss_smoothed"] and final["loss"] == trained[-1]["loss"]
    assert final["eval_loss"] == [m for m in metrics if "eval_loss" in m][-1]["eval_loss"]
    assert 0 < final["evaluation_seconds"] < final["train_runtime_seconds"]
    adapter = folder.adapter_path
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (adapter / name).is_file(), name
    assert folder.checkpoints(), "resumable checkpoints are kept"
    samples = json.loads(folder.samples_path.read_text())
    assert samples and {"prompt", "reference", "before", "after"} <= set(samples[0])
    # Nothing is generated before the first step: both answers come after training, the base model's from the
    # same weights with the adapter switched off, which answer exactly as the untrained model does.
    assert [s.split("…")[0] for s in statuses if s.startswith(("Training", "Answering"))] == [
        "Training", "Answering held-out prompts"]
    from transformers import AutoModelForCausalLM

    from sft_space.chat import generate_reply
    from sft_space.train import SAMPLE_MAX_NEW_TOKENS
    from sft_space.trainer import torch_dtype

    # The base weights as the run loaded them (bf16 on a CPU with bf16 instructions, else fp32).
    base = AutoModelForCausalLM.from_pretrained(settings.model, dtype=torch_dtype(record["plan"]["precision"]))
    untrained = generate_reply(base, models.load_tokenizer(settings.model), samples[0]["prompt"],
                               GenerationSettings(max_new_tokens=SAMPLE_MAX_NEW_TOKENS))
    assert samples[0]["before"] == untrained and samples[0]["after"] != untrained
    for path in folder.path.rglob("*"):
        if path.is_file():
            assert PLANTED_TOKEN.encode() not in path.read_bytes(), path


def test_trained_labels_are_exactly_the_preview_mask(tiny_settings, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from sft_space import training_data

    def rendered_again(*args):
        raise AssertionError("training rendered an example the check had already tokenized")

    rows = persona_chats(12)
    for packing in (False, True):
        settings = tiny_settings(rows, packing=packing, validation_fraction=0.0)
        tokenizer = models.load_tokenizer(settings.model)
        prepared = prepare_data(settings, tokenizer)
        # The packed path as a GPU runs it (a CPU trains examples one by one).
        plan = dataclasses.replace(plan_training(settings, detect_hardware(), model_shape(settings.model)),
                                   packing=packing)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        folder = runs.RunFolder.create(settings.output_dir, f"mask-{packing}")
        # Training uses the tokens the check kept: nothing is rendered a second time.
        with monkeypatch.context() as patched:
            patched.setattr(training_data, "render_example", rendered_again)
            trainer = build_trainer(settings, plan, folder, model, tokenizer, prepared,
                                    gradient_accumulation=settings.gradient_accumulation)

        expected = []
        for example in prepared.train:
            rendered = render.render_example(tokenizer, example)
            expected.append([t if m else -100 for t, m in zip(rendered.input_ids, rendered.trained)])
        got = []
        for row in trainer.train_dataset:
            lengths = row.get("seq_lengths", [len(row["input_ids"])])
            start = 0
            for length in lengths:
                got.append(list(row["labels"][start:start + length]))
                start += length
        assert sorted(got) == sorted(expected)
        # And the batches the model sees carry the same trained tokens.
        batch_labels = torch.cat([b["labels"].flatten() for b in trainer.get_train_dataloader()])
        assert sorted(batch_labels[batch_labels != -100].tolist()) == sorted(
            t for labels in expected for t in labels if t != -100)


@pytest.mark.slow
def test_stop_then_resume_continues_the_step_count(tiny_settings):
    settings = tiny_settings(max_steps=10, save_every=3)
    stop = threading.Event()

    def stop_after_four(entry):
        if entry.get("step", 0) >= 4:
            stop.set()

    folder = train(TrainRequest(settings, stop_event=stop, events=listening(on_point=stop_after_four),
                                run_id="stoppable"))
    record = folder.read()
    assert record["status"] == runs.STOPPED
    stopped_at = record["final_metrics"]["step"]
    assert 4 <= stopped_at < 10
    assert folder.last_checkpoint().name == f"checkpoint-{stopped_at}", "stopping saves a checkpoint at that step"
    assert (folder.adapter_path / "adapter_model.safetensors").is_file(), "stopping keeps the adapter"
    assert runs.check_resumable(folder) == folder.last_checkpoint() and folder.lock_holder() is None

    resumed = train(TrainRequest(settings, resume=folder.path))
    assert resumed.path == folder.path
    stopped, finished = attempts(folder)
    assert "checkpoint" in stopped[stopped.index("stopping"):], "the stop is said, then the checkpoint at its step"
    assert ends_once(stopped, "stopped") and ends_once(finished, "finished")
    plans = [event for event in folder.read_events() if event["event"] == "plan"]
    assert [plan["from_step"] for plan in plans] == [0, stopped_at], "the resume trains on from its checkpoint"
    record = resumed.read()
    assert record["status"] == runs.FINISHED and record["final_metrics"]["step"] == 10
    steps = [m["step"] for m in resumed.read_metrics() if "loss" in m]
    after = steps[steps.index(stopped_at) + 1:]
    assert after and after[0] == stopped_at + 1 and after[-1] == 10
    # Elapsed time goes on from where the stopped run left it, not from zero.
    metrics = resumed.read_metrics()
    before = [m["elapsed_seconds"] for m in metrics if m["step"] <= stopped_at]
    assert min(m["elapsed_seconds"] for m in metrics if m["step"] > stopped_at) > max(before)
    trainer_state = json.loads((resumed.last_checkpoint() / "trainer_state.json").read_text())
    assert trainer_state["global_step"] == 10

    chat_model = load_chat_model(resumed.path)
    reply = chat_model.reply([{"role": "user", "content": "Hello"}], GenerationSettings(max_new_tokens=5))
    assert isinstance(reply, str)
    base_reply = chat_model.reply([{"role": "user", "content": "Hello"}], GenerationSettings(max_new_tokens=5),
                                  use_adapter=False)
    assert isinstance(base_reply, str)


@pytest.mark.slow  # about 6 s: a hundred steps, then a resume
def test_the_last_step_is_logged_whatever_the_logging_interval(tiny_settings):
    """A run logs every 1% of its steps; a stop or the end between two logs still logs its step, so the curve, the
    page and the record end where the run and its checkpoint did (a run stopped at step 43 of 100,000 says step 43,
    not its last logged step, 1)."""
    settings = tiny_settings(max_steps=101, save_every=50, sample_prompts=0, validation_fraction=0)
    stop = threading.Event()
    # Logged at step 1, then every 2 steps (1% of 101, rounded up): stop once step 2 is logged, so the run stops at
    # step 3, between two logs.
    folder = train(TrainRequest(settings, stop_event=stop, run_id="odd",
                                events=listening(on_point=lambda entry: entry["step"] >= 2 and stop.set())))
    record = folder.read()
    assert record["status"] == runs.STOPPED and record["final_metrics"]["step"] == 3
    assert folder.last_checkpoint().name == "checkpoint-3"
    assert [m["step"] for m in folder.read_metrics() if "loss" in m][-1] == 3

    resumed = train(TrainRequest(settings, resume=folder.path)).read_metrics()
    steps = [m["step"] for m in resumed if "loss" in m]
    assert steps[-1] == 101 and steps[-2] == 100 and len(steps) == len(set(steps))


class OutOfMemoryAbove(TrainerCallback):
    """Runs out of memory at the first step while the batch is larger than `batch` (or always, with None), and
    counts the attempts."""

    def __init__(self, batch=None):
        self.batch, self.attempts = batch, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.attempts.append((args.per_device_train_batch_size, args.gradient_accumulation_steps,
                              bool(args.activation_checkpointing)))

    def on_step_end(self, args, state, control, **kwargs):
        if self.batch is None or args.per_device_train_batch_size > self.batch:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.slow
def test_out_of_memory_in_the_first_steps_halves_the_batch_and_keeps_the_examples_per_step(tiny_settings):
    settings = tiny_settings(max_steps=4, batch_size=4, packing=False, gradient_accumulation=1)
    oom = OutOfMemoryAbove(batch=1)
    statuses = []
    folder = train(TrainRequest(settings, extra_callbacks=[oom], events=listening(statuses.append), run_id="shrinks"))
    # 4 × 1, then 2 × 2, then 1 × 4 examples per optimizer step: the same 4 each time.
    assert oom.attempts == [(4, 1, False), (2, 2, False), (1, 4, False)]
    record = folder.read()
    assert record["status"] == runs.FINISHED
    assert record["plan"]["batch_size"] == 1 and record["settings"]["gradient_accumulation"] == 4
    assert any("out of memory, so batch size 1 with gradient accumulation 4" in r for r in record["plan"]["reasons"])
    assert [m["step"] for m in folder.read_metrics() if "loss" in m] == [1, 2, 3, 4], (
        "one curve, from the attempt that ran")
    assert sum(s.startswith("Out of memory: batch size") for s in statuses) == 2
    # Each attempt's plan starts the curve over: the events keep every attempt, the curve only the last.
    assert [event["from_step"] for event in folder.read_events() if event["event"] == "plan"] == [0, 0, 0]


@pytest.mark.slow
def test_out_of_memory_at_every_size_fails_with_what_was_tried_and_what_is_left(tiny_settings):
    settings = tiny_settings(max_steps=4, batch_size=2, packing=False, gradient_accumulation=1)
    oom = OutOfMemoryAbove(batch=None)
    with pytest.raises(TrainingFailed, match="Out of memory"):
        train(TrainRequest(settings, extra_callbacks=[oom], run_id="oom"))
    # Batch 2, then 1 (accumulating 2), then with checkpointing; a CPU cannot load in 4 bit.
    assert oom.attempts == [(2, 1, False), (1, 2, False), (1, 2, True)]
    failed = runs.RunFolder.open(os.path.join(settings.output_dir, "oom")).read()
    assert failed["status"] == runs.FAILED
    assert failed["error"] == ("Out of memory, also with batch size 1 with gradient accumulation 2 (was 2 and 1: the "
                               "same examples per optimizer step); then with gradient checkpointing on (slower, far "
                               "less memory). To fit: lower the maximum length, load the model in 4-bit (QLoRA, on a "
                               "GPU), or choose a smaller model.")

    folder = train(TrainRequest(settings, run_id="after-oom"))
    assert folder.read()["status"] == runs.FINISHED


@pytest.mark.slow
def test_invalid_rows_stop_training_before_a_run_folder_exists(tiny_settings, tmp_path):
    rows = persona_chats(12) + [{"messages": [{"role": "user", "content": "no reply"}]}]
    settings = tiny_settings(rows)
    from sft_space.errors import UserError

    with pytest.raises(UserError, match="row 13.*tick Skip invalid rows to train on the 12 valid ones"):
        train(TrainRequest(settings))
    assert not (tmp_path / "runs").exists()
    folder = train(TrainRequest(dataclasses.replace(settings, skip_invalid_rows=True, max_steps=2)))
    assert folder.read()["data"]["invalid_rows_skipped"] == 1


@pytest.mark.slow
def test_small_datasets_get_enough_steps_per_epoch(tiny_settings):
    settings = tiny_settings(distinct_chats(60), max_steps=0, epochs=1.0)
    folder = train(TrainRequest(settings, run_id="small"))
    # 54 training examples of ~50 tokens: packed into 2048-token sequences they would make 2 steps (on a GPU the
    # packs are made shorter, see test_plan; on a CPU they train one by one).
    assert folder.read()["final_metrics"]["step"] >= 20


def evaluated_steps(max_steps, eval_steps):
    """The steps the trainer evaluates at (transformers' rule: every `eval_steps`, a share of the run's steps
    when below 1, and the last step)."""
    every = math.ceil(max_steps * eval_steps) if eval_steps < 1 else eval_steps
    return [step for step in range(1, max_steps + 1) if step % every == 0 or step == max_steps]


@pytest.mark.parametrize("preset, max_steps", [("balanced", 0), ("quick", 0), ("quick", 20)])
def test_evaluation_takes_at_most_a_tenth_of_a_run_on_the_sample(preset, max_steps, tiny_model_dir, tmp_path):
    """A few evaluations per run, as many as fit in its compute budget, the last at the last step: evaluating every
    10% of the steps (every 2 steps of a 20-step run) takes half of a short run's time."""
    settings = run_settings(preset, source=str(SAMPLE_DATA), model=str(tiny_model_dir), max_steps=max_steps,
                            output_dir=str(tmp_path))
    tokenizer = models.load_tokenizer(settings.model)
    prepared = prepare_data(settings, tokenizer)
    stats = prepared.report.stats()
    plan = plan_training(settings, detect_hardware(), model_shape(settings.model), stats["total_tokens"],
                         stats["tokens_per_example"]["max"])
    folder = runs.RunFolder.create(tmp_path, "plan")
    # As the recipe plans it, on one process.
    evaluation = prepared.evaluation_plan(settings, plan, tokenizer, plan.batch_size * settings.gradient_accumulation)
    trainer = build_trainer(settings, plan, folder, models.load_causal_lm(settings.model), tokenizer, prepared,
                            gradient_accumulation=settings.gradient_accumulation, evaluation=evaluation)
    steps_per_epoch = math.ceil(len(trainer.get_train_dataloader()) / trainer.args.gradient_accumulation_steps)
    total = max_steps or math.ceil(settings.epochs * steps_per_epoch)
    evaluated = evaluated_steps(total, trainer.args.eval_steps)
    assert evaluated[-1] == total, "the final validation loss is the saved adapter's"
    assert 1 <= len(evaluated) <= 10 and (len(evaluated) == 1 or evaluated[0] >= total / 10)
    # A trained token costs about two forward passes (forward, and backward through the frozen base); a
    # validation token one: evaluation stays within a tenth of the run's compute.
    trained_tokens = token_count(trainer.train_dataset) * total / steps_per_epoch
    assert len(evaluated) * token_count(trainer.eval_dataset) <= 0.1 * 2 * trained_tokens
    # A run too short for one evaluation of every held-out example evaluates as many as fit.
    shown = evaluation.reason()
    assert ("of the 16 held-out examples once, at the last step" in shown if max_steps == 20
            else "on 16 held-out examples" in shown)


def test_the_validation_set_is_capped_and_the_rest_is_trained_on(tiny_settings):
    settings = tiny_settings(distinct_chats(60), validation_fraction=0.5, max_validation_examples=5)
    prepared = prepare_data(settings, models.load_tokenizer(settings.model))
    assert len(prepared.validation) == 5 and len(prepared.train) == 55
    assert prepared.fingerprint == prepare_data(settings, models.load_tokenizer(settings.model)).fingerprint
    assert run_settings("quick").max_validation_examples == 200


def test_a_missing_hub_model_is_reported_before_a_run_folder_exists(tiny_settings, tmp_path):
    from sft_space.errors import UserError

    settings = tiny_settings(model="nobody-here/no-such-model")
    with pytest.raises(UserError, match="no-such-model"):
        train(TrainRequest(settings))
    assert not (tmp_path / "runs").exists()


def test_packed_batches_give_the_same_loss_as_unpacked(tiny_settings, tiny_model_dir, monkeypatch):
    """Packing puts several examples in one sequence; each must still attend only to itself, so the loss over
    the same examples is the same packed or padded (a leak across examples would change it). On a CPU the trainer
    computes it with the LM head at the trained positions only, and gets the model's own loss."""
    from transformers import AutoModelForCausalLM

    from sft_space import trainer as trainer_parts

    calls = []
    monkeypatch.setattr(trainer_parts, "trained_positions_loss",
                        lambda *args, **kwargs: calls.append(1) or trained_positions_loss(*args, **kwargs))
    rows = persona_chats(6)
    losses = {}
    for packing in (True, False):
        settings = tiny_settings(rows, packing=packing, validation_fraction=0.0, max_steps=1)
        tokenizer = models.load_tokenizer(settings.model)
        prepared = prepare_data(settings, tokenizer)
        # The packed path as a GPU runs it (a CPU trains examples one by one).
        plan = dataclasses.replace(plan_training(settings, detect_hardware(), model_shape(settings.model)),
                                   packing=packing)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
        folder = runs.RunFolder.create(settings.output_dir, f"loss-{packing}")
        trainer = build_trainer(settings, plan, folder, model, tokenizer, prepared,
                                gradient_accumulation=settings.gradient_accumulation)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
        if packing:
            assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch, "one packed sequence"
        else:
            assert batch["input_ids"].shape[0] == len(prepared.train) and (batch["attention_mask"] == 0).any()
        trainer.model.eval()
        with torch.no_grad():
            losses[packing] = trainer.model(**batch).loss.item()
            assert trainer.compute_loss(trainer.model, dict(batch)).item() == pytest.approx(losses[packing], rel=1e-5)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert len(calls) == 2, "the CPU trainer's loss is the trained-positions one"


def test_a_full_disk_while_saving_fails_clearly_and_marks_no_checkpoint_good(tiny_settings, monkeypatch):
    import errno

    from sft_space.planning import DISK_FULL_ADVICE

    settings = tiny_settings(max_steps=8, save_every=3)
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        # The optimizer state is written after the adapter weights and before trainer_state.json.
        if "optimizer" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(TrainingFailed, match="disk is full"):
        train(TrainRequest(settings, run_id="full-disk"))
    folder = runs.RunFolder(Path(settings.output_dir) / "full-disk")
    record = folder.read()
    assert record["status"] == runs.FAILED and record["error"] == DISK_FULL_ADVICE
    assert (folder.path / "checkpoint-3").is_dir(), "the save had started"
    assert folder.checkpoints() == [], "the incomplete checkpoint is not taken for a good one"


# ---- a stop is heard in every stage ---------------------------------------------------------------------------

# Each stage's status line (as train.py reports it), and what a stop requested as it begins must leave.
STOP_IN_STAGE = {
    "checking the data": ("Checking the data", "nothing"),
    "loading the model": ("Loading ", "before the first step"),
    "training": ("Training", "stopped at a step"),
    "saving the adapter": ("Saving the adapter", "finished"),
    "answers after training": ("Answering held-out prompts", "finished"),
}


def stop_when(prefix, stop, stopped_at):
    """A status listener that, once a stage whose line starts with `prefix` is reported, has another thread stop
    the run (and notes when)."""
    def set_stop():
        stopped_at.append(time.monotonic())
        stop.set()

    def on_status(message):
        if message.startswith(prefix) and not stop.is_set():
            helper = threading.Thread(target=set_stop)
            helper.start()
            helper.join()

    return on_status


def live_models(collect=False):
    """The models alive now; with `collect`, once the garbage is collected (about half a second here)."""
    if collect:
        gc.collect()
    return weakref.WeakSet(o for o in gc.get_objects() if issubclass(type(o), PreTrainedModel))


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STOP_IN_STAGE))
def test_a_stop_in_each_stage_ends_the_run_at_once_with_what_it_has(tiny_settings, stage):
    prefix, outcome = STOP_IN_STAGE[stage]
    settings = tiny_settings(max_steps=8, save_every=100, sample_prompts=2)
    stop, stopped_at = threading.Event(), []
    request = TrainRequest(settings, stop_event=stop, events=listening(stop_when(prefix, stop, stopped_at)),
                           run_id="stopped")
    folder = runs.RunFolder(Path(settings.output_dir) / "stopped")
    earlier = live_models()
    if outcome == "nothing":
        with pytest.raises(TrainingStopped, match="nothing was written"):
            train(request)
        assert not Path(settings.output_dir).exists(), "a stop before the run folder exists writes nothing"
    else:
        assert train(request).path == folder.path
    assert stopped_at and time.monotonic() - stopped_at[0] < 5, "train() returns within seconds of the stop"
    if outcome in ("before the first step", "stopped at a step"):
        # The run keeps no model: a stop as loading begins loads none, and a run that loaded one drops it on the
        # way out, which is what frees the GPU for the next run. (Only here: each look costs about a second.)
        assert not set(live_models(collect=True)) - set(earlier)
    if outcome == "nothing":
        return
    record = folder.read()
    assert not folder.lock_path.exists()
    assert ends_once(attempts(folder)[-1], "finished" if outcome == "finished" else "stopped")
    if outcome == "before the first step":
        assert record["status"] == runs.STOPPED and record["error"] == STOPPED_BEFORE_FIRST_STEP
        assert "stopped before its first step; start it again" in record["error"]
        assert not folder.adapter_path.exists() and folder.checkpoints() == [] and folder.read_metrics() == []
        assert not folder.samples_path.exists(), "answers cut short by the stop are not kept"
        return
    assert (folder.adapter_path / runs.ADAPTER_WEIGHTS).is_file()
    assert not folder.samples_path.exists(), "no held-out answers once stopped (and none cut short)"
    if outcome == "stopped at a step":
        assert record["status"] == runs.STOPPED and record["error"] is None
        assert record["final_metrics"]["step"] == 1
        assert folder.last_checkpoint().name == "checkpoint-1", "the step it stopped at is resumable"
        assert runs.check_resumable(folder) == folder.last_checkpoint() and folder.lock_holder() is None
    else:
        assert record["status"] == runs.FINISHED and record["final_metrics"]["step"] == 8


def test_a_stop_ends_a_reply_at_its_next_token(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from sft_space.chat import generate_reply

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    stop, forwards = threading.Event(), []

    def count_and_stop_at_the_third(module, args, output):
        forwards.append(1)
        if len(forwards) == 3:
            stop.set()

    model.register_forward_hook(count_and_stop_at_the_third)
    settings = GenerationSettings(max_new_tokens=40)
    generate_reply(model, tokenizer, [{"role": "user", "content": "Hello"}], settings, stop_event=stop)
    assert len(forwards) == 3, "generation ends at the token during which the stop came"
    forwards.clear()
    generate_reply(model, tokenizer, [{"role": "user", "content": "Hello"}], settings)
    assert len(forwards) > 3, "without a stop the same reply goes on"


class StopAtFirstEvaluationBatch(TrainerCallback):
    def __init__(self, stop):
        self.stop, self.batches = stop, 0

    def on_prediction_step(self, args, state, control, **kwargs):
        self.batches += 1
        self.stop.set()


@pytest.mark.slow
def test_a_stop_during_evaluation_saves_that_step_without_its_validation_loss(tiny_settings):
    settings = tiny_settings(persona_chats(40), max_steps=8, eval_every=3, save_every=100, validation_fraction=0.5,
                             packing=False, batch_size=1, sample_prompts=0)
    stop = threading.Event()
    evaluation = StopAtFirstEvaluationBatch(stop)
    folder = train(TrainRequest(settings, stop_event=stop, extra_callbacks=[evaluation], run_id="eval-stop"))
    assert evaluation.batches == 1, "the evaluation (20 batches) ends at its next batch"
    record = folder.read()
    assert record["status"] == runs.STOPPED and record["final_metrics"]["step"] == 3
    assert folder.last_checkpoint().name == "checkpoint-3"
    assert (folder.adapter_path / runs.ADAPTER_WEIGHTS).is_file()
    assert not any("eval_loss" in entry for entry in folder.read_metrics())

    resumed = train(TrainRequest(settings, resume=folder.path)).read()
    assert resumed["status"] == runs.FINISHED and resumed["final_metrics"]["step"] == 8


def test_a_stop_while_a_large_dataset_is_checked_returns_at_once(tiny_settings):
    settings = tiny_settings(distinct_chats(30_000))
    stop, stopped_at = threading.Event(), []

    def on_status(message):
        if message.startswith("Checking the data"):
            # A moment into the checks (they take seconds for 30,000 rows): the helper thread is checking.
            timer = threading.Timer(0.3, lambda: (stopped_at.append(time.monotonic()), stop.set()))
            timer.start()

    started = time.monotonic()
    with pytest.raises(TrainingStopped):
        train(TrainRequest(settings, stop_event=stop, events=listening(on_status)))
    assert stopped_at and time.monotonic() - stopped_at[0] < 1.0
    assert time.monotonic() - started < 2.0
    assert not Path(settings.output_dir).exists()
    # And the checks themselves end at their next batch of rows: a stopped run leaves no work running.
    deadline = time.monotonic() + 2.0
    while any(t.name == "sft-space-stage" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "sft-space-stage" for t in threading.enumerate())


def test_a_stage_that_cannot_hear_a_stop_is_left_to_finish_alone():
    """Loading a model (or converting the embedded one) cannot look at the event: train() stops waiting for it."""
    from sft_space.settings import RunSettings
    from sft_space.train import _unless_stopped

    request, release = TrainRequest(RunSettings()), threading.Event()
    threading.Timer(0.2, request.stop_event.set).start()
    started = time.monotonic()
    with pytest.raises(TrainingStopped):
        _unless_stopped(request, lambda: release.wait(30))
    assert time.monotonic() - started < 1.0
    release.set()
    assert _unless_stopped(TrainRequest(RunSettings()), lambda: "done") == "done"
    with pytest.raises(ZeroDivisionError):
        _unless_stopped(TrainRequest(RunSettings()), lambda: 1 / 0)


def test_the_loss_at_trained_positions_only_equals_the_full_head_loss(tiny_model_dir):
    """The CPU path applies the LM head only where a trained token is predicted; its loss and its gradients are the
    full-logits loss's, on a batch of two sequences with different masks and padding."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False))
    input_ids = torch.randint(0, 1000, (2, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[1, :3] = -100
    labels[1, 6:] = -100  # a shorter answer, then padding
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def gradients(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    full = model(**inputs).loss
    full_gradients = gradients(full)
    selective = trained_positions_loss(model, inputs)
    assert torch.allclose(selective, full, rtol=1e-5, atol=1e-6), (selective, full)
    for ours, theirs in zip(gradients(selective), full_gradients):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-7)
    # The trainer's count across gradient accumulation divides the sum instead.
    trained = int((labels[:, 1:] != -100).sum())
    halved = trained_positions_loss(model, inputs, num_items_in_batch=torch.tensor(2 * trained))
    assert torch.allclose(halved, full / 2, rtol=1e-5)


@pytest.mark.slow
def test_a_bf16_run_on_cpu_follows_the_fp32_loss_curve(tiny_settings):
    """bf16 mixed precision (chosen on CPUs with bf16 instructions) trains the same: each logged loss within 1% of
    the fp32 run's, from the same seed and data. The adapter's weights stay fp32 either way."""
    curves = {}
    for precision in ("fp32", "bf16"):
        settings = tiny_settings(max_steps=8, precision=precision, save_every=100, sample_prompts=0,
                                 validation_fraction=0.0, output_dir=tiny_settings().output_dir + f"-{precision}")
        folder = train(TrainRequest(settings, run_id=precision))
        assert folder.read()["plan"]["precision"] == precision
        curves[precision] = [m["loss"] for m in folder.read_metrics() if "loss" in m]
        from safetensors.torch import load_file

        weights = load_file(folder.adapter_path / "adapter_model.safetensors")
        assert {t.dtype for t in weights.values()} == {torch.float32}
    assert len(curves["bf16"]) == len(curves["fp32"]) >= 8
    assert curves["bf16"][-1] < 0.85 * curves["bf16"][0], "bf16 learns"
    for bf16, fp32 in zip(curves["bf16"], curves["fp32"]):
        assert bf16 == pytest.approx(fp32, rel=0.01), curves


def test_a_model_without_chat_template_or_room_for_chatml_tokens_is_refused_before_a_run_folder(tmp_path, write_jsonl):
    """Such a model's tokenizer gets ChatML's tokens added past the end of its embedding table: training on those
    ids would fail deep inside the model (or worse), so the run is refused first, saying what to choose."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as vocabularies
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from sft_space.errors import UserError
    from sft_space.memory import ModelShape
    from sft_space.train import check_vocabulary_fits

    words = "hello world how are you fine thanks".split()
    backend = Tokenizer(vocabularies.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2,
                                                **{w: i + 3 for i, w in enumerate(words)}}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    folder = tmp_path / "no-template"
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(folder)

    settings = run_settings("quick", source=str(write_jsonl(persona_chats(8))), model=str(folder),
                            output_dir=str(tmp_path / "runs"), max_steps=1)
    with pytest.raises(UserError, match=r"has no chat template, and the ChatML tokens it would need \(<\|im_end\|>, "
                                        r"<\|im_start\|>\) are not among the 10 tokens"):
        train(TrainRequest(settings))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    # Embeddings padded beyond the tokenizer have rows for the added tokens.
    check_vocabulary_fits("padded", models.load_tokenizer(str(folder)),
                          dataclasses.replace(ModelShape.from_config(config), vocab_size=len(tokenizer) + 8))


def test_trust_remote_code_reaches_the_tokenizer_as_it_reaches_the_model(tiny_settings, tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    seen = []
    real = AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **{k: v for k, v in kwargs.items() if k != "trust_remote_code"})

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    assert models.load_tokenizer(str(tiny_model_dir), trust_remote_code=True) is not None and seen == [True]

    class Seen(Exception):
        pass

    def stop_here(name, trust_remote_code=False):
        raise Seen(trust_remote_code)

    monkeypatch.setattr(models, "load_tokenizer", stop_here)
    with pytest.raises(Seen, match="True"):
        train(TrainRequest(tiny_settings(trust_remote_code=True)))


@pytest.fixture
def small_embedded_model(tiny_model_dir, tmp_path, monkeypatch):
    """The embedded default as a tiny GGUF file (the tiny Llama, real tokenizer), converted into a cache of the
    test's own: its one-time preparation takes a second or two instead of ~20 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_space import gguf_export

    gguf = tmp_path / "gguf" / models.EMBEDDED_GGUF_FILE
    gguf.parent.mkdir()
    gguf_export.write_gguf(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           AutoTokenizer.from_pretrained(tiny_model_dir), gguf, quant="f16")
    monkeypatch.setenv("SFT_SPACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "embedded_gguf", lambda: gguf)
    return gguf


@pytest.mark.slow  # a real conversion of the (tiny) built-in model, ~12 s
def test_the_app_prepares_the_built_in_model_in_the_background_once_and_the_page_says_so(small_embedded_model):
    from sft_space.ui import train_tab

    assert models.needs_preparation(models.EMBEDDED_MODEL) and not models.embedded_model_preparing()
    # Another process converting holds the lock: the app's preparation waits, and the page says it is under way.
    with models._conversion_lock(models.embedded_checkpoint_dir().parent):
        thread = models.prepare_embedded_model_in_background()
        assert thread is not None and models.embedded_model_preparing()
        line = train_tab.preparation_line()
        assert line.startswith("**One-time preparation of the built-in model (about 20 s)**")
        assert line in train_tab.progress_markdown(None)
    thread.join(timeout=120)
    assert not thread.is_alive() and models.PREPARATION.error is None
    assert models.embedded_model_prepared() and not models.needs_preparation(models.EMBEDDED_MODEL)
    assert train_tab.preparation_line() == "" and "preparation" not in train_tab.progress_markdown(None)
    # Done once: later calls find it (nothing said, nothing written again), and no second thread starts.
    config = models.embedded_checkpoint_dir() / "config.json"
    written = config.stat().st_mtime_ns
    said = []
    assert models.convert_embedded_model(said.append) == models.embedded_checkpoint_dir() and said == []
    assert models.prepare_embedded_model_in_background() is None and config.stat().st_mtime_ns == written


@pytest.mark.slow  # a whole (one-step) run
def test_a_run_that_must_prepare_the_built_in_model_says_so_with_its_stages(small_embedded_model, tiny_settings):
    said = []
    folder = train(TrainRequest(tiny_settings(model=models.EMBEDDED_MODEL, max_steps=1, sample_prompts=0),
                                events=listening(said.append)))
    preparing = [message for message in said if message.startswith(models.PREPARATION_MESSAGE)]
    assert len(preparing) >= 3 and said.index(preparing[0]) < said.index(f"Loading {models.EMBEDDED_MODEL}…")
    assert any(message.startswith("The built-in model is prepared") for message in said)
    assert folder.read()["status"] == runs.FINISHED
    # Each logged step says the slowest step so far: what the app's grace after Stop covers (child.py).
    assert all(entry["slowest_step_seconds"] > 0 for entry in folder.read_metrics() if "loss" in entry)
