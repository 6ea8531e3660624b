"""Predict a LoRA/QLoRA run's peak memory from the model's shape, before any weight is loaded.

The model is built on PyTorch's meta device (shapes, no storage), so parameter counts and layer widths are
exact. What a decoder layer keeps for the backward pass is counted from the tensors it saves (below), and the
counts are calibrated against peaks measured on one H100 with TRL 1.16 (torch.cuda.max_memory_allocated; the
table in docs/BENCHMARKS.md, reproduced in tests/test_plan.py): on its seven runs the estimate is within +14% / −8%
of the measured peak (the test allows −10% to +20%, so that a small change to the count does not fail it). The
planner uses the prediction to choose 4-bit loading, gradient checkpointing and the batch size; the app shows it
beside each model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1024**3
BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2}
# 4-bit NF4 weights with double-quantised scales take ~0.53 bytes per parameter; embeddings and the head
# stay in 16 bit.
NF4_BYTES_PER_PARAMETER = 0.53
# CUDA context, allocator slack and kernels' workspaces: real memory, though max_memory_allocated leaves it out.
RUNTIME_OVERHEAD_GIB = 0.6
# TRL 1.16's fused LM head (on GPUs) projects at most this many tokens against this much of the vocabulary at once.
FUSED_HEAD_TOKENS, FUSED_HEAD_VOCABULARY = 4096, 32768


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
    # Width of the keys (and of the values): key-value heads × head size; 0 reads as the hidden size.
    kv_size: int = 0

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
            kv_size=getattr(text_config, "num_key_value_heads", None) and text_config.num_key_value_heads * (
                getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads)
            or 0,
        )


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    adapter_and_optimizer_gib: float
    activations_gib: float
    logits_gib: float
    masks_gib: float
    # What torch.cuda.max_memory_allocated would report: everything but the runtime's own overhead.
    allocated_gib: float
    total_gib: float


def layer_activation_bytes(shape: ModelShape, element: int, sequence_length: int, packed: bool,
                           liger: bool = False) -> float:
    """Bytes one decoder layer keeps per token for the backward pass, counted from the tensors it saves.

    Each RMSNorm keeps its input upcast to fp32, the normalised copy and its output (8 bytes per hidden unit in
    16 bit; Liger's fused norm keeps its input and one scale per row: 2); attention keeps the query before and
    after the rotary embedding, keys twice, values, and its output before and after the output projection's
    reshape (8 hidden widths and 6 key widths, counting two bytes each); the MLP keeps the gate and up
    projections, the activation and their product (8 intermediate widths). LoRA's inputs are these same tensors,
    and its rank-sized intermediates are negligible. A padded batch also keeps the [length × length] attention
    mask in every layer (2 bytes per entry): per token, 2 × length bytes. Packed batches are counted in
    `estimate_memory`, where the mask spans the whole flattened batch.
    """
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.kv_size or shape.hidden_size
    norms = 2 * (2 if liger else 8) * h
    attention = 8 * h + 6 * kv
    mlp = 8 * i
    per_token = (norms + attention + mlp) * element / 2
    if not packed:
        per_token += 2 * sequence_length
    return per_token


def estimate_memory(
    shape: ModelShape,
    tokens_per_step: int,
    precision: str,
    four_bit: bool = False,
    gradient_checkpointing: bool = False,
    lora_rank: int = 16,
    gpu: bool = True,
    sequence_length: int = 1024,
    packed: bool = False,
    liger: bool = False,
    trained_fraction: float = 1.0,
    shards: int = 1,
) -> MemoryEstimate:
    """Peak memory of one training step holding `tokens_per_step` tokens (batch × sequence length, padding
    included) in sequences of `sequence_length`; `packed` batches are flattened into one sequence (TRL's
    padding-free packing), and `trained_fraction` of the tokens are trained (the LM head runs only there).
    `shards` > 1: on each of that many GPUs under FSDP, each decoder layer wrapped alone."""
    element = BYTES_PER_ELEMENT[precision]
    embeddings = shape.embedding_parameters * (2 if four_bit else element)
    layers = (shape.parameters - shape.embedding_parameters) * (NF4_BYTES_PER_PARAMETER if four_bit else element)
    # fp32 master weights, gradients and two Adam moments for every adapter parameter.
    adapter = shape.lora_parameters(lora_rank) * 16
    if shards > 1:
        # Each GPU keeps its share of the layers, and gathers whole the layer it computes and the one it prefetches;
        # the root (embeddings, final norm, head) stays gathered through the step. The adapter and its optimizer
        # state are sharded with their layers.
        layers = layers / shards + 2 * layers / shape.num_layers
        adapter /= shards
    weights = embeddings + layers
    per_layer = layer_activation_bytes(shape, element, sequence_length, packed, liger)
    if gradient_checkpointing:
        # Each layer's input, and one layer's full set while it is recomputed.
        activations = tokens_per_step * (shape.num_layers * shape.hidden_size * element + per_layer)
    else:
        activations = tokens_per_step * shape.num_layers * per_layer
    # A packed batch is one sequence of every token, under a block-diagonal [tokens × tokens] mask that each layer
    # keeps (one layer's, with checkpointing): 2 bytes per entry.
    masks = 2 * tokens_per_step**2 * (1 if gradient_checkpointing else shape.num_layers) if packed else 0
    trained = max(1, int(tokens_per_step * trained_fraction))
    if gpu:
        # TRL's fused head: one tile of logits at a time, the trained positions' hidden states and their fp32
        # gradient. No full logits.
        logits = (min(trained, FUSED_HEAD_TOKENS) * min(shape.vocab_size, FUSED_HEAD_VOCABULARY) * element
                  + trained * shape.hidden_size * (element + 4))
    else:
        # The CPU path (trainer.trained_positions_loss): logits at the trained positions, their fp32 copy and gradient.
        logits = trained * shape.vocab_size * (element + 8)
    allocated = weights + adapter + activations + masks + logits
    overhead = RUNTIME_OVERHEAD_GIB * GIB if gpu else 0
    return MemoryEstimate(weights / GIB, adapter / GIB, activations / GIB, logits / GIB, masks / GIB,
                          allocated / GIB, (allocated + overhead) / GIB)
