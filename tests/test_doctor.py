"""The doctor: its quick pass trains for real on this CPU (a tiny model), and every GPU-only plan is planned as a
GPU would train it, on stand-in hardware: the plan chosen, the dtype, the 4-bit config handed to transformers."""

import contextlib
import json
import math
import sys
import time

import pytest

from sft_space import catalog, cli, doctor, hardware, models
from sft_space.errors import UserError
from sft_space.hardware import Hardware
from sft_space.settings import DoctorSettings

from builders import H100, T4  # T4: compute capability 7.5, no bf16

TWO_A10G = Hardware("cuda", "NVIDIA A10G", 22.0, (8, 6), device_count=2)
CPU = Hardware("cpu", "CPU", 24.0, None, 2, native_bf16=True)
TOKENS = 1000


def planned(machine, bitsandbytes=True, model=models.EMBEDDED_MODEL, tokens=TOKENS):
    base = doctor.base_settings("data.jsonl", model, tokens, 10, "runs")
    rows = doctor.plan_checks(doctor.CHECKS, base, machine, catalog.shape_of(models.EMBEDDED_MODEL),
                              tokens * doctor.REPEATS, tokens, bitsandbytes)
    return {item.check.plan: item for item in rows}


def test_a_t4_trains_in_fp16_so_the_forced_fp16_row_is_the_default_one():
    rows = planned(T4)
    assert rows["default"].plan.precision == "fp16" and not rows["default"].skipped
    assert "the same plan as the 'default' row" in rows["fp16"].skipped
    assert rows["4-bit QLoRA"].plan.four_bit and rows["4-bit QLoRA"].plan.precision == "fp16"
    assert rows["checkpointing on"].plan.gradient_checkpointing and not rows["checkpointing on"].skipped
    assert rows["2 processes"].skipped == "needs 2 GPUs, one per process; this machine has 1"
    assert rows["FSDP"].skipped == "needs 2 GPUs, one per process; this machine has 1"


def test_a_bf16_gpu_also_trains_the_t4_path_and_each_plan_it_supports():
    rows = planned(H100)
    assert rows["default"].plan.precision == "bf16"
    assert rows["fp16"].plan.precision == "fp16" and not rows["fp16"].skipped
    assert rows["4-bit QLoRA"].plan.four_bit and rows["4-bit QLoRA"].plan.precision == "bf16"
    # A GPU packs by default: the packing row is the default one, no packing a plan of its own.
    assert "the same plan as the 'default' row" in rows["packing"].skipped
    assert not rows["no packing"].plan.packing and not rows["no packing"].skipped
    assert "the same plan as the 'default' row" in rows["checkpointing off"].skipped


def test_two_gpus_train_the_two_process_row_and_a_missing_bitsandbytes_skips_4_bit():
    rows = planned(TWO_A10G, bitsandbytes=False)
    assert not rows["2 processes"].skipped and rows["2 processes"].check.processes == 2
    assert rows["4-bit QLoRA"].skipped == "bitsandbytes is not installed (pip install bitsandbytes)"


def test_the_two_process_row_trains_the_same_settings_through_the_command_line_s_launcher():
    item = planned(TWO_A10G)["2 processes"]
    command = doctor.processes_command(item.settings, item.check.processes, "doctor-08")
    assert command[:5] == [sys.executable, "-m", "sft_space", "train", "data.jsonl"]
    assert command[-4:] == ["--nproc-per-node", "2", "--run-name", "doctor-08"]
    parsed = cli.build_parser().parse_args(command[3:])
    assert cli.train_settings(parsed) == item.settings


def test_a_cpu_skips_the_gpu_plans_saying_why():
    rows = planned(CPU, tokens=128)
    assert rows["fp16"].skipped == "fp16 mixed precision needs a CUDA GPU; this machine has none"
    assert rows["4-bit QLoRA"].skipped == "4-bit (QLoRA) loading needs a CUDA GPU; this machine has none"
    assert rows["2 processes"].skipped == "needs 2 GPUs, one per process; this machine has none"
    assert rows["default"].plan.precision == "bf16" and rows["default"].plan.packing


def test_a_plan_the_estimate_says_does_not_fit_is_skipped_with_the_estimate():
    small = Hardware("cuda", "Small GPU", 0.5, (8, 0))
    rows = planned(small)
    assert "is over what this GPU holds (0 GiB)" in rows["default"].skipped


@pytest.mark.parametrize("machine, compute", [(T4, "float16"), (H100, "bfloat16")])
def test_the_4_bit_row_hands_transformers_an_nf4_config_in_the_gpus_dtype(monkeypatch, machine, compute):
    import torch

    from sft_space import trainer

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    handed = {}
    monkeypatch.setattr(models, "load_causal_lm", lambda name, **kwargs: handed.update(kwargs, name=name))
    item = planned(machine)["4-bit QLoRA"]
    trainer.load_model_for_training(item.settings, item.plan)
    config = handed["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert str(config.bnb_4bit_compute_dtype) == f"torch.{compute}"
    assert handed["dtype"] == getattr(torch, compute) and handed["device_map"] == {"": 0}


def test_the_fp16_row_loads_the_weights_in_fp16_on_the_gpu(monkeypatch):
    import torch

    from sft_space import trainer

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    # A plan without 4 bit keeps bitsandbytes out of sys.modules; put back what this process had afterwards.
    monkeypatch.setitem(sys.modules, "bitsandbytes", sys.modules.get("bitsandbytes"))
    handed = {}
    monkeypatch.setattr(models, "load_causal_lm", lambda name, **kwargs: handed.update(kwargs))
    item = planned(H100)["fp16"]
    trainer.load_model_for_training(item.settings, item.plan)
    assert handed["dtype"] == torch.float16 and "quantization_config" not in handed


def row(**values):
    return doctor.Row(**{"plan": "default", "shape": "tiny", "status": "", "reason": "", "steps": 3,
                         "loss_before": 2.0, "loss_after": 1.0, **values})


def plan():
    return hardware.plan_training(doctor.base_settings("d.jsonl", "m", 128, 3, "runs"), CPU,
                                  catalog.shape_of(models.EMBEDDED_MODEL), 128 * 256, 128)


def test_a_row_passes_only_when_every_step_trained_and_the_loss_fell():
    finished = {"status": "finished", "plan": {"reasons": []}}
    assert doctor.judge(row(), 3, finished, plan()).status == doctor.PASSED
    flat = doctor.judge(row(loss_after=2.5), 3, finished, plan())
    assert flat.status == doctor.FAILED and "the loss did not fall (2.000 → 2.500)" in flat.reason
    broken = doctor.judge(row(loss_after=math.nan), 3, finished, plan())
    assert broken.status == doctor.FAILED and "not a finite number" in broken.reason
    failed = doctor.judge(row(steps=1), 3, {"status": "failed", "error": "CUDA error", "plan": {}}, plan())
    assert failed.reason.startswith("the run ended failed at step 1 of 3: CUDA error")
    retried = {"status": "finished", "plan": {"reasons": ["out of memory, so batch size 4"]}}
    assert "out of memory in the plan as estimated" in doctor.judge(row(), 3, retried, plan()).reason


def test_the_table_has_a_line_per_row_and_keeps_a_reason_s_bar_in_its_cell():
    result = {"machine": doctor.machine_facts(CPU), "steps": 3, "sequence_tokens": 128, "seconds": 5.0,
              "rows": [vars(row(status="passed", reason="a | b")), vars(row(plan="fp16", status="skipped"))]}
    table = doctor.markdown_table(result).splitlines()
    assert table[2].startswith("| plan | shape | steps | tokens/s | peak GiB | estimate GiB | ratio |")
    assert table[4].endswith("| 2.000 → 1.000 | passed | a \\| b |") and table[5].startswith("| fp16 |")
    assert len(table) == 6


def test_a_refused_doctor_prints_one_json_object(capsys):
    assert cli.main(["doctor", "--json", "--max-length", "8"]) == 1
    refusal = json.loads(capsys.readouterr().out)
    assert refusal["rows"] == [] and "too short for a conversation" in refusal["error"]


@pytest.mark.slow  # three real trainings, with their start-up: ~10 s on a quiet machine, 35 s under load
def test_the_quick_pass_trains_each_cpu_plan_for_real_and_says_why_the_others_are_skipped(tiny_model_dir, tmp_path,
                                                                                           capsys):
    code = cli.main(["doctor", "--quick", "--json", "--model", str(tiny_model_dir), "--steps", "2", "--out",
                     str(tmp_path)])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    machine = result["machine"]
    assert machine["kind"] == "cpu" and "bitsandbytes" in machine["versions"] and machine["sdpa"] is True
    rows = {item["plan"]: item for item in result["rows"]}
    assert list(rows) == [check.plan for check in doctor.CHECKS]
    for name in ("default", "checkpointing on", "no packing"):
        trained = rows[name]
        assert trained["status"] == "passed", trained
        assert trained["steps"] == 2 and trained["tokens_per_second"] > 0
        assert trained["peak_memory_gib"] > 0 and trained["estimated_memory_gib"] > 0 and trained["ratio"] > 0
        assert trained["loss_after"] < trained["loss_before"]
    assert "fp16 mixed precision needs a CUDA GPU" in rows["fp16"]["reason"]
    assert "4-bit (QLoRA) loading needs a CUDA GPU" in rows["4-bit QLoRA"]["reason"]
    for covered in ("checkpointing off", "packing"):
        assert "the same plan as the 'default' row" in rows[covered]["reason"]
    assert rows["2 processes"]["reason"] == "needs 2 GPUs, one per process; this machine has none"
    assert rows["FSDP"]["reason"] == "needs 2 GPUs, one per process; this machine has none"
    assert {item["status"] for name, item in rows.items() if name not in ("default", "checkpointing on",
                                                                          "no packing")} == {"skipped"}
    written = json.loads((tmp_path / "doctor.json").read_text())
    assert written["rows"] == result["rows"]
    assert (tmp_path / "doctor.md").read_text().count("\n| ") == 1 + len(doctor.CHECKS)


def test_the_settings_refuse_a_sequence_too_short_for_a_conversation():
    with pytest.raises(UserError, match="--max-length"):
        DoctorSettings(max_length=8)


SPACE = {"SYSTEM": "spaces", "SPACE_ID": "acme/sft-space", "SPACE_AUTHOR_NAME": "acme", "OAUTH_CLIENT_ID": "client"}


class NoRun:
    """A JobManager with no run: the machine is the check's."""

    @contextlib.contextmanager
    def machine_held(self, why, refused):
        yield


def button(tmp_path, environ, who="anyone"):
    from sft_space import access
    from sft_space.settings import AccessSettings
    from sft_space.ui.common import Gate

    return Gate(str(tmp_path), access.Identity.for_runs(tmp_path), AccessSettings(who_may_train=who), environ=environ)


def test_on_a_space_only_its_owner_may_check_the_hardware_whoever_may_train(tmp_path):
    import gradio as gr

    from sft_space.ui.train_tab import check_hardware

    never = lambda: pytest.fail("the check ran")  # noqa: E731
    with pytest.raises(gr.Error, match="Only acme, who owns this Space .* may check this hardware, and you are "
                                       "signed in as bob"):
        list(check_hardware(button(tmp_path, SPACE), NoRun(), {"preferred_username": "bob"}, never))
    result = {"rows": [vars(row(status="passed"))], "machine": doctor.machine_facts(CPU), "steps": 3,
              "sequence_tokens": 128, "seconds": 1.0}
    shown = list(check_hardware(button(tmp_path, SPACE), NoRun(), {"preferred_username": "acme"},
                                lambda: iter(["building the tiny shape", result])))
    assert shown[0].endswith("- building the tiny shape")
    assert shown[-1].startswith("**Checked** · 1 passed, 0 failed, 0 skipped") and "| default | tiny |" in shown[-1]
    # Off a Space, whoever may train may check it.
    assert list(check_hardware(button(tmp_path, {}), NoRun(), None, lambda: iter([result])))


def test_the_hardware_is_not_checked_while_a_run_trains_and_no_run_starts_while_it_is(tmp_path, monkeypatch):
    import threading

    from sft_space import jobs
    from sft_space.settings import run_settings
    from sft_space.ui.train_tab import check_hardware

    release = threading.Event()
    manager = jobs.JobManager(runner=lambda job, *args, **kwargs: release.wait(10))
    settings = run_settings("quick", output_dir=str(tmp_path / "runs"))
    manager.submit(settings, "alice")
    with pytest.raises(UserError, match="A run is training or waiting on this machine"):
        list(check_hardware(button(tmp_path, {}), manager, None, lambda: pytest.fail("the check ran")))
    release.set()
    while manager.current() is not None and not manager.current().done:
        time.sleep(0.05)

    def a_check_that_starts():
        yield "Training the default plan"
        # While the check trains, a visitor's Start (or Resume) is refused with what to do.
        with pytest.raises(UserError, match="being checked"):
            manager.submit(settings, "bob")
        yield {"rows": [vars(row(status="passed"))], "machine": doctor.machine_facts(CPU), "steps": 3,
               "sequence_tokens": 128, "seconds": 5.0}

    assert list(check_hardware(button(tmp_path, {}), manager, None, a_check_that_starts))[-1].startswith("**Checked**")
    manager.submit(settings, "bob")  # once it has ended, runs start again
    release.set()


@pytest.mark.slow
def test_the_app_s_check_runs_in_a_child_and_says_why_it_did_not_finish(tmp_path):
    checking = doctor.check_in_child(DoctorSettings(quick=True, model=str(tmp_path / "no-such-model")))
    with pytest.raises(UserError, match=r"did not finish: it exited with status 1: .*no-such-model"):
        next(checking)


def test_one_check_at_a_time():
    first = doctor.check_in_child(DoctorSettings(quick=True))
    doctor._ONE_CHECK.acquire()
    try:
        with pytest.raises(UserError, match="already running"):
            next(first)
    finally:
        doctor._ONE_CHECK.release()
