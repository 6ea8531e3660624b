"""The run-time estimate the Space's owner sees before Start: measured figures where they exist, derived ones
said to be derived."""

import pytest
from builders import H100, T4

from sft_space import checks, estimate, models
from sft_space.hardware import Hardware
from sft_space.settings import run_settings

TWO_CORES = Hardware("cpu", "CPU", 24.0, None, 2)


def report(examples=160, tokens=85):
    """A checked dataset as the Train tab holds it: per example (messages, tokens, trained tokens)."""
    return checks.Report("data.jsonl", "openai", examples, 2048, token_counts=[(2, tokens, tokens // 2)] * examples)


def test_the_measured_machines_give_their_measured_figure_and_say_so():
    settings = run_settings("quick", model=models.EMBEDDED_MODEL)
    plan, length = estimate.estimate_run(settings, TWO_CORES, 13_600, 85, 160)
    assert length.throughput == estimate.Throughput(125.0, estimate.CPU_MEASURED["fp32"].where)
    assert length.throughput.source.startswith("measured:") and "the project's benchmarks" in length.throughput.source
    assert length.tokens == 13_600 and length.seconds == pytest.approx(13_600 / 125.0)
    _, on_h100 = estimate.estimate_run(settings, H100, 13_600, 85, 160)
    assert on_h100.throughput.tokens_per_second == 13_146 and "one H100" in on_h100.throughput.source


def test_every_other_figure_says_it_is_derived_and_from_what():
    small = run_settings("quick", model=models.EMBEDDED_MODEL)
    _, on_t4 = estimate.estimate_run(small, T4, 13_600, 85, 160)
    assert on_t4.throughput.source.startswith("derived from SmolLM2-135M on one H100")
    assert "scaled by 16-bit tensor peak (65 vs 989 TFLOP/s)" in on_t4.throughput.source
    assert on_t4.throughput.tokens_per_second == pytest.approx(13_146 * 65 / 989)
    # A larger model: its compute per token grows with its size; a CPU with more cores goes faster.
    large = run_settings("quick", model="Qwen/Qwen2.5-7B-Instruct")
    _, seven_b = estimate.estimate_run(large, T4, 13_600, 85, 160)
    assert "Llama-3.2-1B" in seven_b.throughput.source and "scaled by model size" in seven_b.throughput.source
    assert seven_b.seconds > on_t4.seconds
    _, eight_cores = estimate.estimate_run(small, Hardware("cpu", "CPU", 24.0, None, 8), 13_600, 85, 160)
    assert eight_cores.throughput.tokens_per_second == pytest.approx(500) and "8 cores" in eight_cores.throughput.source
    # Gradient checkpointing, when the plan needs it, costs what the H100 runs measured (estimate.CHECKPOINTING_SPEED).
    checkpointed = run_settings("quick", model=models.EMBEDDED_MODEL, gradient_checkpointing="on")
    _, slower = estimate.estimate_run(checkpointed, H100, 13_600, 85, 160)
    assert slower.throughput.tokens_per_second == pytest.approx(13_146 * 0.45) and "checkpointing" in slower.throughput.source
    # A GPU whose speed nothing tells: no figure rather than a made-up one.
    assert estimate.estimate_run(small, Hardware("cuda", "Some GPU", 24.0, (8, 0)), 13_600, 85, 160)[1] is None


def test_max_steps_counts_the_steps_batches():
    settings = run_settings("quick", model=models.EMBEDDED_MODEL, max_steps=10, gradient_accumulation=2)
    plan, length = estimate.estimate_run(settings, H100, 13_600, 85, 160)
    assert plan.packing and length.tokens == 10 * plan.batch_size * 2 * plan.sequence_length


def test_the_train_tab_says_the_hardware_and_the_runs_length_before_start():
    from sft_space.ui.train_tab import estimate_markdown

    settings = run_settings("balanced", model=models.EMBEDDED_MODEL)
    assert estimate_markdown(TWO_CORES, None, None) == ("This app trains on **CPU, 2 cores, 24 GiB memory**. No "
                                                        "checked data: check your data (Data tab) to see how long a "
                                                        "run of it would take here.")
    text = estimate_markdown(T4, settings, report())
    assert text.startswith("This app trains on **Tesla T4 (15 GiB, compute capability 7.5)**. This run: about **")
    assert "(3 epochs, 40,800 tokens at ~864 tokens/s; derived from SmolLM2-135M on one H100" in text


def test_a_smaller_model_or_another_precision_is_said_to_be_derived():
    from sft_space.hardware import TrainingPlan
    from sft_space.memory import ModelShape

    tiny = ModelShape(3_000_000, 1_000_000, 64, 128, 2, 49152, ())
    plan = TrainingPlan("cpu", "bf16", False, False, 1, 320, True, 1.0, True)
    speed = estimate.throughput(TWO_CORES, tiny, plan)
    assert speed.tokens_per_second == 200.0  # the bf16 figure, for a bf16 plan
    assert speed.source == ("derived from SmolLM2-135M on a 2-core CPU, bf16 (the project's benchmarks), taken as is for "
                            "this smaller model (3M parameters)")


def test_a_gpus_peak_is_found_by_its_whole_name():
    """An L40S is not an L4 (its run would be estimated three times too long), nor an A100 an A10G."""
    from sft_space.bench import peak_tflops

    def gpu(name):
        return Hardware("cuda", name, 44.0, (8, 9))

    assert peak_tflops(gpu("NVIDIA L40S")) == 362.0
    assert peak_tflops(gpu("NVIDIA L4")) == 121.0
    assert peak_tflops(gpu("NVIDIA A100-SXM4-80GB")) == 312.0
    assert peak_tflops(gpu("NVIDIA A10G")) == 125.0
    assert peak_tflops(gpu("NVIDIA H100 80GB HBM3")) == 989.0
    assert peak_tflops(gpu("Some GPU")) is None
