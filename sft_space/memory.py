"""Predict a LoRA/QLoRA run's peak memory from the model's shape, before any weight is loaded.

The model is built on PyTorch's meta device (shapes, no storage), so parameter counts and layer widths are
exact; the per-token activation cost is an engineering estimate of what a decoder layer keeps for the
backward pass. The planner uses the prediction to choose 4-bit loading, gradient checkpointing and the batch
size; the app shows it beside each model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1024**3
BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2}
# 4-bit NF4 weights with double-quantised scales take ~0.53 bytes per parameter; embeddings and the head
# stay in 16 bit.
NF4_BYTES_PER_PARAMETER = 0.53
# CUDA context, allocator slack and kernels' workspaces.
RUNTIME_OVERHEAD_GIB = 0.6
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on: parameter counts and layer widths."""

    parameters: int
    embedding_parameters: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    # (in_features, out_features) of every linear layer that LoRA adapts with 'all-linear'.
    lora_linears: tuple[tuple[int, int], ...]

    def lora_parameters(self, rank: int) -> int:
        return sum(rank * (fan_in + fan_out) for fan_in, fan_out in self.lora_linears)

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        embeddings = model.get_input_embeddings()
        head = model.get_output_embeddings()
        linears = tuple(
            (module.in_features, module.out_features)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        )
        return cls(
            parameters=sum(p.numel() for p in model.parameters()),
            embedding_parameters=embeddings.weight.numel(),
            hidden_size=text_config.hidden_size,
            intermediate_size=getattr(text_config, "intermediate_size", 4 * text_config.hidden_size),
            num_layers=text_config.num_hidden_layers,
            vocab_size=text_config.vocab_size,
            lora_linears=linears,
        )


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    adapter_and_optimizer_gib: float
    activations_gib: float
    logits_gib: float
    total_gib: float


def estimate_memory(
    shape: ModelShape,
    tokens_per_step: int,
    precision: str,
    four_bit: bool = False,
    gradient_checkpointing: bool = False,
    lora_rank: int = 16,
    gpu: bool = True,
) -> MemoryEstimate:
    """Peak memory of one training step holding `tokens_per_step` tokens (batch × sequence length)."""
    element = BYTES_PER_ELEMENT[precision]
    if four_bit:
        weights = (shape.parameters - shape.embedding_parameters) * NF4_BYTES_PER_PARAMETER
        weights += shape.embedding_parameters * 2
    else:
        weights = shape.parameters * element
    # fp32 master weights, gradients and two Adam moments for every adapter parameter.
    adapter = shape.lora_parameters(lora_rank) * 16
    h, i = shape.hidden_size, shape.intermediate_size
    # Per token and layer the backward pass keeps the inputs of every linear layer, the MLP's intermediate
    # activations and the LoRA dropout copies: about 12 hidden-widths plus 6 intermediate-widths.
    per_layer = (12 * h + 6 * i) * element
    if gradient_checkpointing:
        activations = tokens_per_step * (shape.num_layers * h * element + per_layer)
    else:
        activations = tokens_per_step * shape.num_layers * per_layer
    # Logits in the compute dtype, their fp32 upcast for the loss, and its gradient.
    logits = tokens_per_step * shape.vocab_size * (element + 8)
    overhead = RUNTIME_OVERHEAD_GIB * GIB if gpu else 0
    total = weights + adapter + activations + logits + overhead
    return MemoryEstimate(weights / GIB, adapter / GIB, activations / GIB, logits / GIB, total / GIB)
