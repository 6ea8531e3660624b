"""The models offered in the app's picker, with their shapes, so fit can be judged without downloading.

The shapes are the published configs' numbers; `ModelShape.from_config` turns them into exact parameter
counts on the meta device. Any other Hub id or folder still works: its config is read when it is chosen, and a Hub
model a visitor names is judged first by the size its metadata gives (`check_hub_model_fits`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

from . import hub, models
from .errors import UserError
from .hardware import USABLE_MEMORY_FRACTION, Hardware, detect_hardware, plan_training
from .memory import GIB, NF4_BYTES_PER_PARAMETER, RUNTIME_OVERHEAD_GIB, ModelShape
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


def tokenizer_loader(model: str, offered: Collection[str]) -> Callable[[], Any]:
    """How a worker process (isolation.py) gets a model's tokenizer for a visitor's check or preview. A model the
    app offers has its tokenizer loaded here, once: workers are forked from the app and find it in memory. Any
    other model's is loaded in the worker itself, each time, so that its files and its template run under the
    worker's limits, never in the app."""
    if model in offered:
        tokenizer = models.cached_tokenizer(model)
        return lambda: tokenizer
    return partial(models.load_tokenizer, model)


# ------------------------------------------------------------------------------------- Hub models by size

TRAIN, CHAT = "train", "chat"
# Memory beyond the weights themselves, as a share of them: activations, the adapter and its optimizer, the chat's
# cache. A rough bound: it only has to tell a model that may fit from one that cannot.
WEIGHTS_HEADROOM = 1.2


@lru_cache(maxsize=1)
def this_machine() -> Hardware:
    return detect_hardware()


def bytes_per_parameter(hardware: Hardware, purpose: str) -> float:
    """What one parameter of the weights takes here: training may load them in 4 bit on a GPU (QLoRA), and in
    bf16 on a CPU with bf16 instructions; chat loads 16 bit on a GPU and fp32 on a CPU (chat._inference_dtype)."""
    if hardware.kind == "cuda":
        return NF4_BYTES_PER_PARAMETER if purpose == TRAIN else 2
    return 2 if purpose == TRAIN and hardware.native_bf16 else 4


def largest_parameters(hardware: Hardware, purpose: str) -> int:
    """About the most parameters a model may have to be loaded here for `purpose` (on one GPU: every GPU of a
    run holds the whole model)."""
    usable = max(0.0, hardware.memory_gib * USABLE_MEMORY_FRACTION - RUNTIME_OVERHEAD_GIB) * GIB
    return int(usable / (bytes_per_parameter(hardware, purpose) * WEIGHTS_HEADROOM))


def size_label(parameters: float) -> str:
    """A parameter count as people write it: 135M, 1.2B."""
    return f"{parameters / 1e9:.1f}B" if parameters >= 1e9 else f"{parameters / 1e6:.0f}M"


def check_hub_model_fits(model_id: str, purpose: str = TRAIN, hardware: Hardware | None = None) -> None:
    """Refuse a Hub model too large to train (`purpose` TRAIN) or to chat with (CHAT) on `hardware` (this machine
    by default), judged from the size its metadata gives, before anything of it is downloaded; the refusal says its
    size and what fits. A folder here or the embedded model is not the Hub's, and is not asked about; nor is any
    model when the Hub does not answer (one in the local cache then loads, any other is refused when loaded)."""
    if not hub.is_hub_name(model_id) or not hub.reachable():
        return
    size = hub.model_size(model_id)
    hardware = hardware or this_machine()
    parameters = size.parameters or (size.weight_bytes and size.weight_bytes // 2)  # 16-bit weights, by far the most
    if not parameters:
        raise UserError(f"{model_id} has no safetensors weights on the Hub (the only kind this app loads: other "
                        "formats can run code when loaded), so it cannot be used here; choose another model.")
    largest = largest_parameters(hardware, purpose)
    if parameters <= largest:
        return
    fitting = [(shape_of(entry.model_id).parameters, entry.model_id.replace(models.EMBEDDED_MODEL,
                                                                            models.HUB_DEFAULT_MODEL))
               for entry in CATALOG if shape_of(entry.model_id).parameters <= largest]
    suggestion = f", such as {max(fitting)[1]}" if fitting else ""
    needed = parameters * bytes_per_parameter(hardware, purpose) * WEIGHTS_HEADROOM / GIB
    doing = "train" if purpose == TRAIN else "chat with"
    raise UserError(f"{model_id} has {size_label(parameters)} parameters: to {doing} it needs about {needed:,.0f} GiB, "
                    f"and this machine ({hardware.describe()}) can {doing} models of up to about "
                    f"{size_label(largest)} parameters. Choose a smaller model{suggestion}.")
