"""The benchmark: our default training path against a plain TRL SFTTrainer with TRL's defaults.

Both train the same LoRA (same rank, targets and learning rate) on the same synthetic conversations, with
the same maximum length and batch size, in one process, on a model of a named shape with random weights (or the
embedded default's real weights). Each is timed over steps after a warm-up, counting only real tokens (padding
excluded), from the start of the first measured step to the end of the last: whatever the path does between
steps (logging, syncs) counts against it. Checkpoint saving is off for both.

    python -m sft_space bench [--shape tiny] [--steps 20] [--json]
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import catalog, models
from .catalog import CatalogModel
from .hardware import Hardware, detect_hardware, plan_training
from .memory import ModelShape
from .settings import BenchSettings, run_settings

# The bench's shapes by name: the catalog's numbers for the models it offers, and a tiny one that suits a CPU.
SHAPES = {
    "tiny": CatalogModel("tiny", "llama", 64, 128, 2, 4, 2, 49152, True, "apache-2.0"),
    "smollm2-135m": catalog.entry(models.EMBEDDED_MODEL),
    "llama-3.2-1b": catalog.entry("meta-llama/Llama-3.2-1B-Instruct"),
    "qwen2.5-7b": catalog.entry("Qwen/Qwen2.5-7B-Instruct"),
}
EMBEDDED = "embedded"
# The replies of the H100 memory measurements (docs/BENCHMARKS.md; lognormal(5.3, 0.8) words, capped at 1,400):
# long enough that most batches of 8 pad to the 1,024-token maximum. tests/test_plan.py checks the estimator
# against them.
GPU_MEMORY_RECIPE_REPLY_WORDS = (5.3, 0.8, 1400)
# Dense bf16 (fp16 on the T4) tensor-core peaks, TFLOP/s, for MFU.
PEAK_TFLOPS = {"T4": 65.0, "L4": 121.0, "L40S": 362.0, "A10G": 125.0, "A100": 312.0, "H100": 989.0, "H200": 989.0}
WORDS = ("the ship sails north at dawn while the crew checks ropes maps and the weather report before "
         "lunch a captain writes down every course change so that the log stays honest and clear").split()


@dataclass
class PathResult:
    name: str
    tokens_per_second: float
    measured_tokens: int
    measured_seconds: float
    batch_size: int
    sequence_length: int
    peak_memory_gib: float | None
    mfu: float | None
    notes: str


def synthetic_chats(count: int, seed: int, reply_words: tuple[float, float, int] = (5.0, 0.5, 700)
                    ) -> list[dict[str, Any]]:
    """Conversations whose lengths spread like real chat data: by default median about 250 tokens, a long tail.
    `reply_words` is the reply's length in words: lognormal (mu, sigma), capped."""
    rng = random.Random(seed)
    mu, sigma, cap = reply_words

    def sentence(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."

    rows = []
    for _ in range(count):
        reply_words = min(int(rng.lognormvariate(mu, sigma)), cap)
        rows.append({"messages": [{"role": "user", "content": sentence(rng.randint(8, 40))},
                                  {"role": "assistant", "content": sentence(max(reply_words, 5))}]})
    return rows


def shape_config(shape: str, tokenizer: Any) -> Any:
    return SHAPES[shape].config(max_position_embeddings=32768, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


class TokenCounter:
    """Wraps a data collator and counts each batch's real tokens (padding excluded), in order."""

    def __init__(self, collator: Any):
        self.collator = collator
        self.counts: list[int] = []

    def __call__(self, features: Any) -> Any:
        batch = self.collator(features)
        mask = batch.get("attention_mask")
        self.counts.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _window_timer(warmup_steps: int) -> Any:
    from transformers import TrainerCallback

    class WindowTimer(TrainerCallback):
        start = end = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup_steps:
                _synchronize()
                self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            _synchronize()
            self.end = time.perf_counter()

    return WindowTimer()


def peak_tflops(hardware: Hardware) -> float | None:
    """The GPU's dense 16-bit tensor peak, when it is one we know (by the model's whole name: "L4" is not the
    "L40S")."""
    return next((peak for name, peak in PEAK_TFLOPS.items()
                 if re.search(rf"\b{re.escape(name)}\b", hardware.name)), None)


def _measure(name: str, trainer: Any, settings: BenchSettings, hardware: Hardware, shape: ModelShape,
             sequence_length: int, notes: str) -> PathResult:
    import torch

    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    timer = _window_timer(settings.warmup_steps)
    trainer.add_callback(timer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    seconds = timer.end - timer.start
    tokens = sum(counter.counts[settings.warmup_steps: settings.warmup_steps + settings.steps])
    rate = tokens / seconds
    peak = peak_tflops(hardware)
    # LoRA training costs about 4 FLOPs per frozen parameter per token: forward (2) and the activation
    # gradients of the backward pass (2); the adapter's own weight gradients are negligible.
    mfu = rate * 4 * shape.parameters / (peak * 1e12) if peak else None
    memory = torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else None
    return PathResult(name, round(rate, 1), tokens, round(seconds, 2), trainer.args.per_device_train_batch_size,
                      sequence_length, round(memory, 2) if memory is not None else None,
                      round(mfu, 4) if mfu is not None else None, notes)


def run_bench(settings: BenchSettings, hardware: Hardware | None = None) -> dict[str, Any]:
    """Train both paths and return their measurements and the ratio of their speeds."""
    import torch
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import ModelConfig, SFTConfig, SFTTrainer

    from datasets import Dataset

    from .runs import RunFolder
    from .trainer import build_trainer, load_model_for_training, lora_config, release_memory, torch_dtype
    from .training_data import prepare_data

    # The LoRA dropout of TRL's own LoRA settings (trl.ModelConfig, what `trl sft` uses); rank, alpha, targets and
    # learning rate are ours for both paths.
    trl_lora_dropout = ModelConfig.__dataclass_fields__["lora_dropout"].default

    hardware = hardware or detect_hardware()
    tokenizer = models.load_tokenizer(models.EMBEDDED_MODEL)
    embedded = settings.shape == EMBEDDED
    config = models.load_config(models.EMBEDDED_MODEL) if embedded else shape_config(settings.shape, tokenizer)
    shape = ModelShape.from_config(config)
    total_steps = settings.warmup_steps + settings.steps
    with tempfile.TemporaryDirectory(prefix="sft-space-bench-") as workdir:
        work = Path(workdir)
        # Enough conversations that neither path runs out in `total_steps` at batch 8 of max-length packs.
        rows = synthetic_chats(total_steps * 8 * max(1, settings.max_length // 150) + 32, settings.seed)
        source = work / "bench.jsonl"
        source.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
        run = run_settings("quick", source=str(source), model=models.EMBEDDED_MODEL if embedded else "bench",
                           max_length=settings.max_length, max_steps=total_steps, validation_fraction=0.0,
                           sample_prompts=0, seed=settings.seed, output_dir=str(work / "runs"),
                           save_every=10**9, skip_invalid_rows=True)
        prepared = prepare_data(run, tokenizer)
        stats = prepared.report.stats()
        plan = plan_training(run, hardware, shape, stats["total_tokens"], stats["tokens_per_example"]["max"])
        device = "cuda" if plan.device == "cuda" else "cpu"

        def fresh_model(precision: str) -> Any:
            torch.manual_seed(settings.seed)
            if embedded:
                return load_model_for_training(run, dataclasses.replace(plan, precision=precision))
            return AutoModelForCausalLM.from_config(config, dtype=torch_dtype(precision),
                                                    attn_implementation="sdpa").to(device)

        folder = RunFolder(work / "ours")
        folder.path.mkdir()
        ours = build_trainer(run, plan, folder, fresh_model(plan.precision), tokenizer, prepared,
                             gradient_accumulation=run.gradient_accumulation)
        ours_result = _measure("SFT Space default", ours, settings, hardware, shape, plan.sequence_length,
                               "; ".join(plan.reasons))
        del ours
        release_memory()

        # TRL's default precision is bf16, on a CPU too (weights as the checkpoint stores them: bf16 for the
        # catalog's models); a GPU without bf16 (T4) is given fp16, as TRL's default would fail there.
        baseline_precision = "fp16" if plan.precision == "fp16" else "bf16"
        baseline_args = SFTConfig(
            output_dir=str(work / "baseline"), max_length=settings.max_length, max_steps=total_steps,
            per_device_train_batch_size=plan.batch_size, learning_rate=run.learning_rate, seed=settings.seed,
            use_cpu=device == "cpu", bf16=baseline_precision == "bf16", fp16=baseline_precision == "fp16",
            save_strategy="no", report_to="none", disable_tqdm=True)
        baseline = SFTTrainer(model=fresh_model(baseline_precision), args=baseline_args,
                              # The same conversations ours trains on (those within the maximum length).
                              train_dataset=Dataset.from_list([{"messages": e.messages} for e in prepared.train]),
                              processing_class=tokenizer,
                              peft_config=lora_config(dataclasses.replace(run, lora_dropout=trl_lora_dropout)))
        baseline.remove_callback(PrinterCallback)
        checkpointing = "on" if baseline_args.activation_checkpointing else "off"
        baseline_result = _measure("TRL defaults", baseline, settings, hardware, shape, settings.max_length,
                                   f"{baseline_precision}, padding to the longest in each batch, gradient "
                                   f"checkpointing {checkpointing}, LoRA dropout {trl_lora_dropout}, loss on every "
                                   "token")
        del baseline
        release_memory()
    return {"settings": asdict(settings), "hardware": hardware.describe(), "parameters": shape.parameters,
            "precision": plan.precision, "paths": [asdict(ours_result), asdict(baseline_result)],
            "speedup": round(ours_result.tokens_per_second / baseline_result.tokens_per_second, 2)}


def format_report(result: dict[str, Any]) -> str:
    lines = [f"{result['settings']['shape']} ({result['parameters'] / 1e6:,.0f}M parameters) on "
             f"{result['hardware']}, {result['precision']}, max length {result['settings']['max_length']}, "
             f"{result['settings']['steps']} measured steps",
             f"  {'path':<20}{'tokens/s':>12}{'batch':>7}{'seq len':>9}{'peak GiB':>10}{'MFU':>8}"]
    for path in result["paths"]:
        memory = f"{path['peak_memory_gib']:.2f}" if path["peak_memory_gib"] is not None else "n/a"
        mfu = f"{path['mfu']:.1%}" if path["mfu"] is not None else "n/a"
        lines.append(f"  {path['name']:<20}{path['tokens_per_second']:>12,.0f}{path['batch_size']:>7}"
                     f"{path['sequence_length']:>9}{memory:>10}{mfu:>8}")
    lines.append(f"  speed-up: {result['speedup']}×")
    for path in result["paths"]:
        lines.append(f"  {path['name']}: {path['notes']}")
    return "\n".join(lines)
