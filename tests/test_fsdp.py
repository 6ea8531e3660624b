"""Sharding the model across GPUs (FSDP): the plan that decides it, what it hands transformers, and the doctor's row
that trains it on GPUs. transformers' Trainer shards only on GPUs (accelerate turns FSDP on for GPU process groups
alone), so no test here trains sharded: the parts that do not need a GPU are tested on their own, and the doctor's
FSDP row runs the whole path the day one is there."""

import dataclasses
import json

import pytest

from sft_space import doctor, models, trainer
from sft_space.errors import UserError
from sft_space.hardware import Hardware, TrainingPlan, plan_training
from sft_space.memory import ModelShape
from sft_space.runs import ADAPTER_WEIGHTS, RunFolder
from sft_space.settings import RunSettings

from builders import H100, T4

# Qwen2.5-7B's shape, written out: in 16 bit (~15 GiB of weights) it fits no 15 GB T4, and fits 2 or 4 of them.
HIDDEN, INTERMEDIATE, KV, LAYERS = 3584, 18944, 512, 28
SEVEN_B = ModelShape(7_615_616_512, 152064 * HIDDEN, HIDDEN, INTERMEDIATE, LAYERS, 152064,
                     ((HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTERMEDIATE),
                      (HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)) * LAYERS, KV)
# SmolLM2-135M's (the built-in model's) shape, written out too: building it on the meta device takes seconds.
SMALL = ModelShape(134_515_008, 49152 * 576, 576, 1536, 30, 49152,
                   ((576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)) * 30, 192)
SIXTEEN_BIT = RunSettings(max_length=1024, quantization="none")


def gpus(base, count):
    return dataclasses.replace(base, device_count=count)


def plan(settings, machine, shape=SEVEN_B, **kwargs):
    return plan_training(settings, machine, shape, 100_000, 1024, **kwargs)


# ---- the plan --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 4])
def test_auto_shards_a_model_that_fits_no_single_gpu_but_fits_shared(count):
    alone = plan(SIXTEEN_BIT, T4)
    assert not alone.fits and not alone.sharded
    shared = plan(SIXTEEN_BIT, gpus(T4, count))
    assert shared.sharded and shared.fits
    assert shared.estimated_peak_gib < T4.memory_gib * 0.85 < alone.estimated_peak_gib
    assert any(reason.startswith(f"sharded across the {count} GPUs with FSDP (the model fits no single GPU)")
               and "GiB per GPU" in reason for reason in shared.reasons)
    assert any(reason.endswith("GiB on each GPU") for reason in shared.reasons)


def test_auto_keeps_a_whole_copy_on_each_gpu_when_it_fits_and_off_never_shards():
    # 4-bit on one GPU comes before sharding: the model then fits each GPU whole, without a gather per layer.
    four_bit = plan(RunSettings(max_length=1024), gpus(T4, 2))
    assert four_bit.four_bit and four_bit.fits and not four_bit.sharded
    assert "not sharded: each GPU holds the whole model (it fits, and needs no gathers)" in four_bit.reasons
    off = plan(dataclasses.replace(SIXTEEN_BIT, shard="off"), gpus(T4, 4))
    assert not off.sharded and not off.fits
    assert "not sharded: off as chosen" in off.reasons
    assert not any("with FSDP" in reason for reason in off.reasons)
    # Too large even shared: the plan says what sharding would take, and never that the model fits.
    tight = plan(SIXTEEN_BIT, Hardware("cuda", "NVIDIA A2", 6.0, (8, 6), device_count=2))
    assert not tight.fits and not tight.sharded and not any("it fits" in reason for reason in tight.reasons)
    assert any(reason.startswith("sharded across the 2 GPUs with FSDP it would still take about")
               for reason in tight.reasons)
    # A run of one process on a machine of several GPUs has no one to share with.
    assert not plan(SIXTEEN_BIT, gpus(T4, 4), processes=1).sharded


def test_on_shards_a_model_that_would_fit_whole():
    small = SMALL
    forced = plan(RunSettings(shard="on"), gpus(H100, 2), small)
    assert forced.sharded and forced.fits
    assert any(reason.startswith("sharded across the 2 GPUs with FSDP as chosen") for reason in forced.reasons)
    assert forced.estimated_peak_gib < plan(RunSettings(shard="off"), gpus(H100, 2), small).estimated_peak_gib


def test_sharding_asked_where_it_cannot_shard_is_refused_with_what_to_do():
    cpu = Hardware("cpu", "CPU", 24.0, None, 2)
    with pytest.raises(UserError, match="needs CUDA GPUs, one process each; on a CPU transformers trains "
                                        "data-parallel only. Set shard to 'auto' or 'off'"):
        plan(RunSettings(shard="on"), cpu, SMALL, processes=2)
    with pytest.raises(UserError, match=r"this run has 1 \(NVIDIA H100.*--nproc-per-node N"):
        plan(RunSettings(shard="on"), H100, SMALL)
    # auto on a CPU never shards, however many processes train.
    assert not plan(RunSettings(), cpu, SMALL, processes=2).sharded


def test_a_sharded_4_bit_plan_counts_the_whole_quantized_model_each_gpu_loads():
    """transformers quantizes the whole model onto each process's GPU before FSDP shares it out."""
    sharded = plan(RunSettings(max_length=1024, quantization="4bit", shard="on"), gpus(T4, 4))
    assert sharded.sharded and sharded.four_bit
    assert sharded.estimated_peak_gib >= SEVEN_B.parameters * 0.5 / 1024**3


# ---- what transformers is handed -------------------------------------------------------------------------------


def sharded_plan(**changes):
    values = dict(device="cuda", precision="bf16", four_bit=False, gradient_checkpointing=True, batch_size=2,
                  sequence_length=512, packing=True, estimated_peak_gib=10.0, fits=True, processes=2,
                  examples_per_step=4, sharded=True)
    return TrainingPlan(**{**values, **changes})


def test_a_sharded_plan_hands_the_trainer_fsdp2_wrapping_each_decoder_layer(tmp_path, monkeypatch):
    """The arguments are built as transformers 5 builds them (TrainingArguments' FSDP processing) and accelerate's
    FSDP plugin is made of them. The plan's device is the CPU here: TrainingArguments refuses bf16 and pinned
    memory without a GPU, and nothing of the FSDP settings depends on the device."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    # TrainingArguments writes this variable of the process; the test's process gets its own back.
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    here = sharded_plan(device="cpu", precision="fp32")
    args = trainer.trainer_arguments(RunSettings(), here, RunFolder(tmp_path), None, 1, ["LlamaDecoderLayer"])
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert plugin["state_dict_type"] == "FULL_STATE_DICT" and plugin["reshard_after_forward"] is True
    # Activation checkpointing through FSDP's own setting, not the model's (transformers refuses both).
    assert plugin["activation_checkpointing"] is True and args.activation_checkpointing is False
    # 16-bit weights are read by the first process alone and broadcast as they are sharded.
    assert plugin["cpu_ram_efficient_loading"] is True and "use_orig_params" not in plugin
    made = FullyShardedDataParallelPlugin(**plugin)
    assert made.fsdp_version == 2 and made.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert trainer.fsdp_arguments(sharded_plan(four_bit=True), ["X"])["fsdp_config"]["cpu_ram_efficient_loading"] \
        is False

    unsharded = trainer.trainer_arguments(RunSettings(), dataclasses.replace(here, sharded=False),
                                          RunFolder(tmp_path), None, 1)
    assert unsharded.fsdp_plugin_args is None and unsharded.activation_checkpointing is True


def test_the_decoder_layers_are_named_by_the_model_under_peft_s_wrapper():
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert trainer.decoder_layer_classes(model) == ["LlamaDecoderLayer"]
    wrapped = get_peft_model(model, trainer.lora_config(RunSettings(lora_r=2)))
    assert trainer.decoder_layer_classes(wrapped) == ["LlamaDecoderLayer"]


@pytest.mark.parametrize("precision, storage", [("bf16", "bf16"), ("fp16", "fp32")])
def test_sharded_4_bit_packs_its_weights_in_a_float_type_fsdp_can_shard(precision, storage, monkeypatch):
    import torch

    kwargs = trainer.load_model_kwargs(RunSettings(), sharded_plan(precision=precision, four_bit=True))
    quantization = kwargs["quantization_config"]
    assert quantization.bnb_4bit_quant_storage == trainer.torch_dtype(storage)
    # The model loads in the same type, so every weight FSDP shares out has one type; FSDP places the shares.
    assert kwargs["dtype"] == trainer.torch_dtype(storage) and "device_map" not in kwargs
    # Unsharded, bitsandbytes keeps its uint8 storage and the model loads onto this process's GPU (stood in here).
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    whole = trainer.load_model_kwargs(RunSettings(), sharded_plan(precision=precision, four_bit=True, sharded=False))
    assert whole["quantization_config"].bnb_4bit_quant_storage == torch.uint8
    assert whole["device_map"] == {"": 0} and whole["dtype"] == trainer.torch_dtype(precision)


# ---- saving: the adapter gathered whole -------------------------------------------------------------------------


def test_the_adapter_gathered_from_fsdp_s_shares_saves_as_the_unsharded_one_does(tmp_path, monkeypatch):
    """torch's fully_shard on a one-process gloo group on this CPU: the weights become DTensors, as on GPUs; the
    adapter gathered from them and saved is the adapter the unsharded model saves."""
    import torch
    import torch.distributed as dist
    from peft import get_peft_model
    from safetensors.torch import load_file
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    model = get_peft_model(LlamaForCausalLM(config), trainer.lora_config(RunSettings(lora_r=2)))
    for name, weight in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: give the saved weights something to compare
            torch.nn.init.normal_(weight)
    model.save_pretrained(tmp_path / "whole")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert any(isinstance(weight, DTensor) for weight in model.parameters())
        state = trainer_gathered(model)
        assert state and not any(isinstance(weight, DTensor) for weight in state.values())
        model.save_pretrained(tmp_path / "gathered", state_dict=state)
    finally:
        dist.destroy_process_group()
    whole, gathered = (load_file(tmp_path / folder / ADAPTER_WEIGHTS) for folder in ("whole", "gathered"))
    assert whole.keys() == gathered.keys() and len(whole) == 2 * 7 * 2
    for name in whole:
        assert torch.equal(whole[name], gathered[name]), name


def trainer_gathered(model):
    from sft_space.train import gathered_adapter

    return gathered_adapter(model)


# ---- the doctor's FSDP row -------------------------------------------------------------------------------------


def doctor_rows(machine):
    base = doctor.base_settings("data.jsonl", models.EMBEDDED_MODEL, 1000, 10, "runs")
    rows = doctor.plan_checks(doctor.CHECKS, base, machine, SMALL, 1000 * doctor.REPEATS, 1000, True)
    return {item.check.plan: item for item in rows}


def test_the_doctor_trains_the_sharded_plan_on_two_gpus_and_skips_it_with_fewer():
    row = doctor_rows(gpus(H100, 2))["FSDP"]
    assert not row.skipped and row.plan.sharded and row.check.processes == 2
    assert row.settings.shard == "on" and row.settings.sample_prompts == 2
    command = doctor.processes_command(row.settings, row.check.processes, "doctor-09")
    assert command[command.index("--shard") + 1] == "on" and command[command.index("--nproc-per-node") + 1] == "2"
    # Its estimate is each GPU's share, below the data-parallel row's whole copy.
    two = doctor_rows(gpus(H100, 2))["2 processes"]
    shape = SMALL
    assert doctor.estimated_allocated_gib(row.plan, shape, 16, 2) < doctor.estimated_allocated_gib(two.plan, shape, 16)
    # Eight GPUs: the row still trains two processes, and plans for two shares.
    assert doctor_rows(gpus(H100, 8))["FSDP"].plan.estimated_peak_gib == row.plan.estimated_peak_gib
    assert doctor_rows(H100)["FSDP"].skipped == "needs 2 GPUs, one per process; this machine has 1"


def test_the_doctor_fails_a_sharded_run_whose_adapter_is_a_share_or_whose_answers_are_missing(tmp_path):
    import torch
    from safetensors.torch import save_file

    shape = ModelShape(0, 0, 8, 16, 1, 32, ((8, 8), (8, 16)))
    settings = RunSettings(lora_r=2, sample_prompts=2)
    folder = RunFolder(tmp_path)
    folder.adapter_path.mkdir(parents=True)
    whole = {"a.lora_A": torch.zeros(2, 8), "a.lora_B": torch.zeros(8, 2), "b.lora_A": torch.zeros(2, 8),
             "b.lora_B": torch.zeros(16, 2)}
    save_file(whole, folder.adapter_path / ADAPTER_WEIGHTS)
    folder.samples_path.write_text(json.dumps([{"after": "x", "before": "y"}] * 2))
    record = {"plan": {"sharded": True}}
    assert doctor.sharded_problems(folder, record, settings, shape) == []
    save_file({**whole, "b.lora_B": torch.zeros(8, 2)}, folder.adapter_path / ADAPTER_WEIGHTS)
    folder.samples_path.write_text(json.dumps([{"after": "x", "before": "y"}]))
    assert doctor.sharded_problems(folder, {"plan": {"sharded": False}}, settings, shape) == [
        "the run did not shard the model (its plan in run.json says so)",
        "the saved adapter is not whole: 64 weights of the 80 its layers have",
        "1 of 2 held-out prompts were answered before and after"]


# ---- the Train tab ---------------------------------------------------------------------------------------------


def test_the_train_tab_says_each_gpu_s_memory_when_the_model_is_sharded(embedded_tokenizer):
    from sft_space import checks
    from sft_space.ui import train_tab

    from builders import SAMPLE_DATA

    settings = RunSettings(source=str(SAMPLE_DATA), model=models.EMBEDDED_MODEL, shard="on")
    report = checks.check_data(settings, embedded_tokenizer)
    text = train_tab.estimate_markdown(gpus(H100, 2), settings, report)
    each = plan_training(settings, gpus(H100, 2), SMALL, report.stats()["total_tokens"],
                         report.stats()["tokens_per_example"]["max"]).estimated_peak_gib
    assert f"The model is sharded across the 2 GPUs (FSDP): about **{each:.1f} GiB on each GPU**." in text
    assert "sharded" not in train_tab.estimate_markdown(gpus(H100, 2), dataclasses.replace(settings, shard="auto"),
                                                        report)


def test_the_setting_is_a_train_flag_and_a_field_of_the_train_tab_s_advanced_settings():
    from sft_space import cli
    from sft_space.ui import train_tab

    parse = cli.build_parser().parse_args
    assert cli.train_settings(parse(["train", "data.jsonl", "--shard", "on"])).shard == "on"
    assert cli.train_settings(parse(["train", "data.jsonl"])).shard == "auto"
    with pytest.raises(SystemExit):
        parse(["train", "data.jsonl", "--shard", "always"])
    assert "shard" in [spec.name for spec in train_tab.advanced_fields()]
