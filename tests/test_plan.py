"""Settings, presets and the hardware plan: the decisions users of other tools see crash on their GPU."""

import dataclasses
import json

import pytest
from builders import A10G, H100, T4

from sft_space import catalog, cli, models
from sft_space.errors import UserError
from sft_space.hardware import Hardware, plan_training
from sft_space.memory import estimate_memory
from sft_space.settings import PRESETS, GenerationSettings, RunSettings, run_settings, to_command_line

CPU = Hardware("cpu", "CPU", 16.0, None, 2)



@pytest.fixture(scope="module")
def shapes():
    """Three of the catalog's models (its shapes are the published configs' numbers)."""
    return {name: catalog.shape_of(model_id) for name, model_id in (
        ("135m", models.EMBEDDED_MODEL), ("1b", "meta-llama/Llama-3.2-1B-Instruct"),
        ("7b", "Qwen/Qwen2.5-7B-Instruct"))}


def test_model_shapes_count_parameters_exactly(shapes):
    assert 134_000_000 < shapes["135m"].parameters < 135_000_000
    assert 1_230_000_000 < shapes["1b"].parameters < 1_240_000_000
    assert 7_600_000_000 < shapes["7b"].parameters < 7_700_000_000
    # LoRA r=16 on all linear layers of SmolLM2-135M: 4.9M parameters (what PEFT reports).
    assert shapes["135m"].lora_parameters(16) == 4_884_480


@pytest.mark.parametrize("hardware, precision", [(CPU, "fp32"), (T4, "fp16"), (A10G, "bf16"), (H100, "bf16")])
def test_precision_follows_the_hardware(shapes, hardware, precision):
    plan = plan_training(RunSettings(), hardware, shapes["135m"])
    assert plan.precision == precision
    assert not plan.four_bit and not plan.gradient_checkpointing


def test_a_cpu_with_bf16_instructions_trains_in_bf16_and_one_without_in_fp32(shapes, tmp_path):
    from sft_space.hardware import cpu_has_native_bf16

    plan = plan_training(RunSettings(), dataclasses.replace(CPU, native_bf16=True), shapes["135m"])
    assert plan.precision == "bf16" and "bf16 instructions" in plan.reasons[0]
    assert plan_training(RunSettings(precision="fp32"), dataclasses.replace(CPU, native_bf16=True),
                         shapes["135m"]).precision == "fp32"
    for flags, native in (("fpu avx512f avx512_bf16 sse", True), ("fpu amx_bf16 amx_tile", True),
                          ("fpu avx512f avx2", False)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert cpu_has_native_bf16(str(cpuinfo)) is native
    assert cpu_has_native_bf16(str(tmp_path / "absent")) is False


def test_bf16_on_a_t4_and_fp16_on_cpu_are_refused_with_a_reason(shapes):
    with pytest.raises(UserError, match="cannot train in bf16"):
        plan_training(RunSettings(precision="bf16"), T4, shapes["135m"])
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        plan_training(RunSettings(precision="fp16"), CPU, shapes["135m"])
    with pytest.raises(UserError, match="4-bit"):
        plan_training(RunSettings(quantization="4bit"), CPU, shapes["135m"])


def test_memory_decides_checkpointing_and_four_bit(shapes):
    small = plan_training(RunSettings(max_length=2048), T4, shapes["135m"])
    assert not small.gradient_checkpointing and not small.four_bit and small.fits
    seven_b = plan_training(RunSettings(max_length=2048), T4, shapes["7b"])
    assert seven_b.four_bit, "a 7B model in 16 bit (15 GiB of weights) cannot train on a 16 GB T4"
    assert seven_b.estimated_peak_gib <= T4.memory_gib * 0.85
    assert any("4-bit" in reason for reason in seven_b.reasons)
    roomy = plan_training(RunSettings(max_length=2048), H100, shapes["7b"])
    assert not roomy.four_bit and not roomy.gradient_checkpointing
    forced = plan_training(RunSettings(gradient_checkpointing="on", quantization="none"), H100, shapes["1b"])
    assert forced.gradient_checkpointing and not forced.four_bit


def test_estimates_grow_with_tokens_and_shrink_with_checkpointing_and_four_bit(shapes):
    shape = shapes["1b"]
    base = estimate_memory(shape, 4096, "bf16").total_gib
    assert estimate_memory(shape, 8192, "bf16").total_gib > base
    assert estimate_memory(shape, 4096, "bf16", gradient_checkpointing=True).total_gib < base
    assert estimate_memory(shape, 4096, "bf16", four_bit=True).total_gib < base


def test_presets_fill_settings_and_explicit_values_win():
    quick = run_settings("quick")
    assert (quick.epochs, quick.lora_r) == (PRESETS["quick"]["epochs"], PRESETS["quick"]["lora_r"])
    assert run_settings("thorough", lora_r=4).lora_r == 4
    with pytest.raises(UserError, match="Unknown setting"):
        run_settings("quick", lora_rank=4)
    with pytest.raises(UserError, match="Unknown preset"):
        run_settings("fastest")


def test_the_balanced_preset_is_the_fields_defaults():
    assert run_settings("balanced") == RunSettings()
    assert run_settings("balanced", lora_r=8) == dataclasses.replace(RunSettings(), lora_r=8)


def test_top_p_is_bounded_as_declared():
    low, high = GenerationSettings.__dataclass_fields__["top_p"].metadata["bounds"]
    assert (low, high) == (0.05, 1.0) and low <= GenerationSettings().top_p <= high
    for outside in (0.0, 1.5):
        with pytest.raises(UserError, match="top_p"):
            GenerationSettings(top_p=outside)
    assert cli.build_parser().parse_args(["chat", "runs/x", "--top-p", "0.5"]).top_p == 0.5


def test_every_setting_has_help_and_a_cli_flag():
    parser = cli.build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    destinations = {action.dest for action in train_parser._actions}
    for spec in dataclasses.fields(RunSettings):
        assert spec.metadata["help"], spec.name
        assert spec.name in destinations, f"--{spec.name} missing from 'train'"


def test_the_shown_command_line_reproduces_the_settings(tmp_path):
    settings = run_settings("quick", source="data.jsonl", lora_r=4, packing=False, learning_rate=1e-3,
                            output_dir=str(tmp_path / "elsewhere"), max_steps=7, trust_remote_code=True)
    argv = ["train", "data.jsonl", "--preset", "quick", *to_command_line(settings)]
    assert cli.train_settings(cli.build_parser().parse_args(argv)) == settings


def test_config_file_sits_between_preset_and_flags(tmp_path):
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"lora_r": 64, "epochs": 2, "preset": "thorough"}))
    args = cli.build_parser().parse_args(["train", "d.jsonl", "--config", str(config), "--epochs", "1"])
    settings = cli.train_settings(args)
    assert (settings.preset, settings.lora_r, settings.epochs) == ("thorough", 64, 1.0)
    assert settings.learning_rate == PRESETS["thorough"]["learning_rate"]


def test_epochs_and_max_steps_are_exclusive_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "d.jsonl", "--epochs", "1", "--max-steps", "5"])
    assert exit_info.value.code == 2


def test_a_gpu_packs_and_a_cpu_packs_only_short_examples(shapes):
    from sft_space.hardware import CPU_PACK_LENGTH

    settings = run_settings("balanced", max_length=2048)
    long_examples = dict(total_tokens=2_000_000, longest_example=800)
    on_gpu = plan_training(settings, H100, shapes["135m"], **long_examples)
    assert on_gpu.packing and on_gpu.sequence_length == 2048
    small = plan_training(settings, H100, shapes["135m"], total_tokens=48 * 500, longest_example=300)
    assert small.packing and small.sequence_length == 512, "a small dataset gets shorter packs, more steps"
    on_cpu = plan_training(settings, CPU, shapes["135m"], **long_examples)
    assert not on_cpu.packing and any("no packing on CPU" in r for r in on_cpu.reasons)
    short_on_cpu = plan_training(settings, CPU, shapes["135m"], total_tokens=2_000_000, longest_example=200)
    assert short_on_cpu.packing and short_on_cpu.sequence_length == CPU_PACK_LENGTH
    unpacked = run_settings("balanced", max_length=2048, packing=False)
    assert not plan_training(unpacked, H100, shapes["135m"], **long_examples).packing


@pytest.mark.parametrize("four_bit", [False, True])
def test_a_run_that_does_not_quantize_leaves_bitsandbytes_unloaded(monkeypatch, shapes, four_bit):
    """PEFT imports bitsandbytes whenever it is installed (~1.5 s on two CPU cores, before the first loss); a run
    that loads in 16 or 32 bit keeps it out, a 4-bit one needs it."""
    import sys

    from sft_space import models, trainer

    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)  # as in a fresh process; restored after
    monkeypatch.setattr(models, "load_causal_lm", lambda name, **kwargs: kwargs)
    plan = plan_training(RunSettings(), T4, shapes["7b" if four_bit else "135m"])
    assert plan.four_bit == four_bit
    loaded = trainer.load_model_for_training(RunSettings(), dataclasses.replace(plan, device="cpu"))
    assert ("quantization_config" in loaded) == four_bit
    assert (sys.modules.get("bitsandbytes", "absent") is None) != four_bit


# Peak memory measured on one H100 (torch.cuda.max_memory_allocated, GiB) with TRL 1.16, transformers 5.17,
# PEFT 0.21: random-init Llama shapes, bf16, SDPA, LoRA r=16 all-linear, max length 1024, batches of the recipe's
# conversations (bench.GPU_MEMORY_RECIPE_REPLY_WORDS) padded to the longest, or packed (bfd, padding-free).
# (shape, gradient checkpointing, packed, Liger kernels, batch size, measured peak)
MEASURED_PEAKS = [
    ("135m", True, False, False, 8, 1.00),
    ("135m", False, False, False, 8, 7.68),
    ("135m", True, True, False, 8, 1.16),
    ("135m", False, True, True, 8, 9.75),
    ("135m", False, True, True, 16, 26.51),
    ("1b", True, False, False, 8, 4.24),
    ("1b", False, False, False, 8, 15.31),
]


@pytest.mark.parametrize("name, checkpointing, packed, liger, batch, measured", MEASURED_PEAKS)
def test_the_estimate_is_within_a_fifth_of_each_measured_peak_and_never_a_tenth_under(
        shapes, name, checkpointing, packed, liger, batch, measured):
    estimate = estimate_memory(shapes[name], batch * 1024, "bf16", gradient_checkpointing=checkpointing,
                               sequence_length=1024, packed=packed, liger=liger)
    # max_memory_allocated leaves out the CUDA runtime's own memory, which the plan's total adds.
    assert estimate.total_gib == pytest.approx(estimate.allocated_gib + 0.6)
    assert 0.9 * measured <= estimate.allocated_gib <= 1.2 * measured, estimate


def test_the_measurements_recipe_reaches_full_batches_of_the_maximum_length(embedded_tokenizer):
    """The table's token counts (batch × 1024): a peak is the largest step's, and with the recipe's replies (the
    bench's synthetic words) a batch of 8 padded to 1,024 tokens comes within the first 16 steps, and then again."""
    from sft_space.bench import GPU_MEMORY_RECIPE_REPLY_WORDS, synthetic_chats

    rows = synthetic_chats(8 * 16, seed=0, reply_words=GPU_MEMORY_RECIPE_REPLY_WORDS)
    texts = [embedded_tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in rows]
    lengths = [len(ids) for ids in embedded_tokenizer(texts, add_special_tokens=False)["input_ids"]]
    padded_to = [min(1024, max(lengths[i:i + 8])) for i in range(0, len(lengths), 8)]
    assert padded_to.count(1024) >= 2, padded_to


def test_a_packed_gpu_batch_is_sized_by_its_masks(shapes):
    """Packed batches are flattened into one sequence whose [tokens × tokens] mask every layer keeps: the plan
    takes a smaller batch than the padded estimate would allow (on one H100: 26.5 GiB at 16 × 1024 on 135M,
    docs/BENCHMARKS.md)."""
    plan = plan_training(RunSettings(max_length=1024), T4, shapes["135m"], total_tokens=10**7, longest_example=1024)
    assert plan.packing and plan.batch_size <= 8 and plan.fits


def test_after_out_of_memory_the_plan_shrinks_in_order_of_cost_keeping_the_examples_per_step(shapes):
    from sft_space.planning import plan_after_out_of_memory

    settings = RunSettings(gradient_accumulation=1)
    plan = dataclasses.replace(plan_training(settings, T4, shapes["135m"]), batch_size=6, gradient_checkpointing=False,
                               four_bit=False)
    seen = []
    while (step := plan_after_out_of_memory(settings, plan)) is not None:
        settings, plan, _ = step
        seen.append((plan.batch_size, settings.gradient_accumulation, plan.gradient_checkpointing, plan.four_bit))
    assert seen == [(3, 2, False, False), (1, 6, False, False), (1, 6, True, False), (1, 6, True, True)]
    assert plan.reasons[-1] == "out of memory, so 4-bit (QLoRA) weights"


def test_the_model_picker_labels_each_catalog_model_with_its_size_and_fit():
    from sft_space.ui.model_choices import picker_choices

    on_cpu = picker_choices(CPU)
    assert [model_id for _, model_id in on_cpu] == [offer.model_id for offer in catalog.offers(CPU)]
    assert len(on_cpu) == len(catalog.CATALOG)
    assert dict((model_id, label) for label, model_id in on_cpu)["Qwen/Qwen2.5-7B-Instruct"] == (
        "Qwen/Qwen2.5-7B-Instruct · 7.6B · CPU: very slow, use a GPU")
    assert on_cpu[0][0].startswith("SmolLM2-135M-Instruct") and " · 135M · CPU: fine" in on_cpu[0][0]
    assert dict((model_id, label) for label, model_id in picker_choices(T4))["Qwen/Qwen2.5-7B-Instruct"].endswith(
        catalog.fit_verdict(catalog.shape_of("Qwen/Qwen2.5-7B-Instruct"), T4))


def test_a_one_core_machine_is_described_in_the_singular():
    from sft_space.hardware import Hardware

    assert Hardware("cpu", "CPU", 16.0, cpu_count=1).describe() == "CPU, 1 core, 16 GiB memory"
    assert Hardware("cpu", "CPU", 16.0, cpu_count=2).describe() == "CPU, 2 cores, 16 GiB memory"
