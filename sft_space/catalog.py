"""The models offered in the app's picker, with their shapes, so fit can be judged without downloading.

The shapes are the published configs' numbers; `ModelShape.from_config` turns them into exact parameter
counts on the meta device. Any other Hub id or folder still works: its config is read when it is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from . import models
from .hardware import Hardware, plan_training
from .memory import ModelShape
from .settings import RunSettings


@dataclass(frozen=True)
class CatalogModel:
    model_id: str
    family: str  # "llama" or "qwen2": the config class the numbers belong to
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tied_embeddings: bool
    licence: str

    def config(self, **extra: Any) -> Any:
        """The transformers config of this shape; `extra` sets more of its fields (token ids, positions)."""
        from transformers import LlamaConfig, Qwen2Config

        config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[self.family]
        return config_class(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                            tie_word_embeddings=self.tied_embeddings, **extra)


CATALOG = (
    CatalogModel(models.EMBEDDED_MODEL, "llama", 576, 1536, 30, 9, 3, 49152, True, "apache-2.0"),
    CatalogModel("HuggingFaceTB/SmolLM2-360M-Instruct", "llama", 960, 2560, 32, 15, 5, 49152, True, "apache-2.0"),
    CatalogModel("Qwen/Qwen2.5-0.5B-Instruct", "qwen2", 896, 4864, 24, 14, 2, 151936, True, "apache-2.0"),
    CatalogModel("meta-llama/Llama-3.2-1B-Instruct", "llama", 2048, 8192, 16, 32, 8, 128256, True, "llama3.2"),
    CatalogModel("Qwen/Qwen2.5-1.5B-Instruct", "qwen2", 1536, 8960, 28, 12, 2, 151936, True, "apache-2.0"),
    CatalogModel("HuggingFaceTB/SmolLM2-1.7B-Instruct", "llama", 2048, 8192, 24, 32, 32, 49152, True, "apache-2.0"),
    CatalogModel("Qwen/Qwen2.5-3B-Instruct", "qwen2", 2048, 11008, 36, 16, 2, 151936, True, "other"),
    CatalogModel("Qwen/Qwen2.5-7B-Instruct", "qwen2", 3584, 18944, 28, 28, 4, 152064, False, "apache-2.0"),
)


def entry(model_id: str) -> CatalogModel:
    """The catalog's entry for a model it offers."""
    return next(m for m in CATALOG if m.model_id == model_id)


@lru_cache(maxsize=None)
def shape_of(model_id: str) -> ModelShape:
    return ModelShape.from_config(entry(model_id).config())


def fit_verdict(shape: ModelShape, hardware: Hardware, max_length: int = 2048) -> str:
    """A few words on whether (and how) a model trains on `hardware`."""
    plan = plan_training(RunSettings(max_length=max_length), hardware, shape)
    if hardware.kind == "cpu":
        return "CPU: fine" if shape.parameters < 400e6 else "CPU: very slow, use a GPU"
    if not plan.fits:
        return "too large for this GPU"
    how = "4-bit QLoRA" if plan.four_bit else plan.precision
    if plan.gradient_checkpointing:
        how += " + checkpointing"
    return f"fits ({how}, ~{plan.estimated_peak_gib:.0f} GiB)"


@dataclass(frozen=True)
class Offer:
    """A catalog model as this machine offers it: the id to load, its size, and whether (and how) it trains here."""

    model_id: str
    parameters: int
    verdict: str
    embedded: bool  # the catalog's entry for the embedded default model
    built_in: bool  # loaded from the file installed with the app, not from the Hub


def offers(hardware: Hardware) -> list[Offer]:
    """Every catalog model, in the catalog's order, judged for `hardware`."""
    found = []
    for entry in CATALOG:
        shape = shape_of(entry.model_id)
        embedded = entry.model_id == models.EMBEDDED_MODEL
        # Without the embedded file (a Space installs requirements.txt only) the same model comes from the Hub.
        model_id = models.default_model() if embedded else entry.model_id
        found.append(Offer(model_id, shape.parameters, fit_verdict(shape, hardware), embedded,
                           model_id == models.EMBEDDED_MODEL))
    return found
