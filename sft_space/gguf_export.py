"""A merged model as one GGUF file: the format llama.cpp, Ollama and LM Studio read.

The file holds the architecture's numbers, the tokenizer (vocabulary, merges, special tokens, whether to add
BOS) and the chat template, so that those tools chat with the model correctly without any other file. Written
with the `gguf` package's own writer, tensor-name map and Python quantizers: no compiled tools.

Supported: the catalog's architectures, Llama (SmolLM2 and Llama 3.x included) and Qwen2, with a byte-level BPE
tokenizer. Anything else is refused before any work, naming what is supported.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .settings import GGUF_QUANTS

QUANTS = GGUF_QUANTS  # the quantizations offered (see settings.py)
# Our model_type -> llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES' spelling).
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# llama.cpp's names for the text-splitting rule a byte-level vocabulary was trained with (tokenizer.ggml.pre).
# Llama 3 and Qwen2 spell their rule as a regex; the GPT-2 rule is ByteLevel's own, with single digits for SmolLM.
SPLIT_REGEX_NAMES = ("llama-bpe", "qwen2")
SUPPORTED = "Llama (including SmolLM2 and Llama 3.x) and Qwen2"

Progress = Callable[[float, str], None]


def check_supported(config: Any) -> str:
    """llama.cpp's architecture name for the model `config` describes, or a UserError that says what is
    supported. Cheap (the config only): called before merging anything."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(f"GGUF export does not support the {model_type!r} architecture of this run's base model; "
                        f"it supports {SUPPORTED}. Export the merged model instead (--merged) and convert that "
                        "folder with llama.cpp's convert_hf_to_gguf.py, if llama.cpp supports it.")
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        raise UserError(f"GGUF export does not support the {rope['rope_type']!r} RoPE scaling of this run's base "
                        "model (only none and Llama 3's). Export the merged model instead (--merged).")
    return ARCHITECTURES[model_type]


def _rope_parameters(config: Any) -> dict[str, Any]:
    """RoPE settings as one dict: transformers 5 keeps them in `rope_parameters`, older configs in `rope_theta`
    and `rope_scaling`."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    return rope


def quant_type(quant: str) -> Any:
    from gguf import GGMLQuantizationType

    if quant not in QUANTS:
        raise UserError(f"Unknown GGUF quantization {quant!r}: choose one of {', '.join(QUANTS)}.")
    return {"f16": GGMLQuantizationType.F16, "q8_0": GGMLQuantizationType.Q8_0,
            "q4_0": GGMLQuantizationType.Q4_0}[quant]


# What the tokenizer adds to the file, per token of the vocabulary: its text, type and score, and about one merge
# (measured: 1.77 MB for SmolLM2's 49,152 tokens, 36 bytes each).
TOKENIZER_BYTES_PER_TOKEN = 37


def estimated_size(config: Any, quant: str) -> int:
    """About how many bytes the GGUF file of the model `config` describes takes in `quant`, from the config
    alone (before anything is merged): its matrices at the quantization's bytes per weight, the embedding (and an
    untied output layer) at 8 bits for q4_0 as `_stored_type` writes them, and the tokenizer. Within a few percent
    of the file (norms are kept in float32; a matrix whose rows do not split into blocks falls back to f16)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from .memory import ModelShape

    wanted = quant_type(quant)
    embedding_type = GGMLQuantizationType.Q8_0 if wanted == GGMLQuantizationType.Q4_0 else wanted

    def bytes_per_weight(kind: Any) -> float:
        block, size = GGML_QUANT_SIZES[kind]
        return size / block

    shape = ModelShape.from_config(config)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    embeddings = shape.embedding_parameters * (1 if getattr(text_config, "tie_word_embeddings", False) else 2)
    weights = (shape.parameters - embeddings) * bytes_per_weight(wanted) + embeddings * bytes_per_weight(embedding_type)
    return math.ceil(weights + shape.vocab_size * TOKENIZER_BYTES_PER_TOKEN)


def file_name(name: str, quant: str) -> str:
    """The GGUF file's name as the Hub's local apps expect it: the quantization last, in capitals, so that
    `ollama run hf.co/<user>/<repo>:Q8_0` and `llama-cli -hf <user>/<repo>:Q8_0` find it."""
    return f"{name}-{quant.upper()}.gguf"


# ---- the tokenizer -------------------------------------------------------------------------------------------


def _pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """tokenizer.ggml.pre: llama.cpp's name for how the text is split before the merges apply. Read from the
    tokenizer's own pre-tokenizer, so that llama.cpp and transformers split text the same way."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    for step in steps:
        if step.get("type") == "Split":
            regex = (step.get("pattern") or {}).get("Regex")
            for name in SPLIT_REGEX_NAMES:
                if regex == GGUF_PRE_TOKENIZER_SPLITS.get(name):
                    return name
            raise UserError("GGUF export does not know this tokenizer's way of splitting text (a regex that is "
                            f"neither Llama 3's nor Qwen2's); it supports the tokenizers of {SUPPORTED}.")
    byte_level = next((step for step in steps if step.get("type") == "ByteLevel"), None)
    if byte_level is not None and byte_level.get("use_regex", True):
        single_digits = any(step.get("type") == "Digits" and step.get("individual_digits") for step in steps)
        return "smollm" if single_digits else "gpt-2"
    raise UserError(f"GGUF export does not know this tokenizer's pre-tokenizer ({', '.join(map(str, kinds))}); it "
                    f"supports the byte-level tokenizers of {SUPPORTED}.")


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, pre_tokenizer: str | None) -> None:
    """Vocabulary, token types, merges, special token ids, add-BOS/EOS and the chat template."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="sft-space-gguf-tokenizer-") as saved:
        tokenizer.save_pretrained(saved)
        tokenizer_json = json.loads((Path(saved) / "tokenizer.json").read_text(encoding="utf-8"))
        model = tokenizer_json.get("model") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback") or \
                (tokenizer_json.get("decoder") or {}).get("type") != "ByteLevel":
            raise UserError("GGUF export supports byte-level BPE tokenizers (GPT-2 style, as SmolLM2, Llama 3 and "
                            f"Qwen2 have); this model's tokenizer is a {model.get('type')} of another kind.")
        # Merges, special token ids, add_bos/add_eos and the chat template, as gguf reads them from the folder.
        special = gguf.SpecialVocab(saved, load_merges=True, n_vocab=vocab_size)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            # The embedding matrix has rows no token uses (Qwen2 pads it to a round size): llama.cpp needs a
            # name for each row, marked unused.
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            # Control tokens (<|im_start|>, <|im_end|>) are matched whole in a prompt and end generation;
            # llama.cpp knows them by this type.
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer or _pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Said outright, never left to a default: llama.cpp adds BOS to a byte-level vocabulary unless told not to,
    # and SmolLM2's chat template starts without one.
    special.add_special_token["bos"] = _adds_first(tokenizer)
    special.add_special_token["eos"] = False
    if special.chat_template is None and tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    if not special.chat_template:
        raise UserError("This model's tokenizer has no chat template, so llama.cpp-based tools could not chat "
                        "with it; the GGUF file was not written.")
    special.add_to_gguf(writer, quiet=True)


def _adds_first(tokenizer: Any) -> bool:
    """Whether the tokenizer starts every text with its BOS token."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


# ---- the weights ---------------------------------------------------------------------------------------------


def _undo_rotary_permutation(weights: Any, heads: int) -> Any:
    """Llama's q and k rows in llama.cpp's rotary layout. Hugging Face checkpoints order each head's rows as
    [first halves | second halves] of the rotated pairs; llama.cpp's Llama kernel wants the pairs interleaved.
    (Qwen2 runs in llama.cpp with the same rotation as transformers: nothing to change.)"""
    rows = weights.shape[0]
    return (weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _llama3_rope_factors(config: Any, rope: dict[str, Any]) -> Any:
    """Llama 3's long-context RoPE frequency factors, as llama.cpp reads them (the rope_freqs tensor)."""
    import numpy as np

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _stored_type(gguf_name: str, weights: Any, wanted: Any) -> Any:
    """The type one tensor is stored in: vectors (norms, biases) stay float32, as llama.cpp keeps them; a matrix
    whose rows do not split into the quantization's blocks falls back to f16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if weights.ndim < 2:
        return GGMLQuantizationType.F32
    if wanted == GGMLQuantizationType.Q4_0 and gguf_name in ("token_embd.weight", "output.weight"):
        # The embedding is also the output layer in tied models: llama.cpp's own 4-bit recipes keep it at 6 bits
        # or more, because every next-token choice passes through it. q8_0 is the nearest Python can write.
        return GGMLQuantizationType.Q8_0
    block_size = GGML_QUANT_SIZES[wanted][0]
    if weights.shape[-1] % block_size:
        return GGMLQuantizationType.F16
    return wanted


def _tensors(model: Any, arch: str) -> list[tuple[str, Any]]:
    """(GGUF name, float32 numpy array) for every weight, in llama.cpp's names and layout."""
    import gguf

    config = model.config
    arch_id = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    tensors = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the same matrix as the embedding: llama.cpp reuses token_embd when output is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"GGUF export found a weight it has no llama.cpp name for ({hf_name}); this "
                            f"{config.model_type} model has a part the export does not know.")
        weights = tensor.detach().float().cpu().numpy()
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf_name else kv_heads
            weights = _undo_rotary_permutation(weights, heads)
        tensors.append((gguf_name, weights))
    rope = _rope_parameters(config)
    if rope.get("rope_type") == "llama3":
        tensors.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_factors(config, rope)))
    return tensors


# ---- the file ------------------------------------------------------------------------------------------------


def _add_architecture(writer: Any, config: Any, quant: str) -> None:
    from gguf import GGML_QUANT_VERSION, LlamaFileType

    rope = _rope_parameters(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": LlamaFileType.MOSTLY_Q4_0}[quant])
    writer.add_quantization_version(GGML_QUANT_VERSION)


def write_gguf(model: Any, tokenizer: Any, path: str | Path, quant: str = "q8_0", name: str = "",
               description: str = "", base_model: str | None = None, licence: str | None = None,
               pre_tokenizer: str | None = None, on_progress: Progress | None = None) -> Path:
    """Write `model` (float32 weights, adapter merged in) and `tokenizer` to the GGUF file `path`, its matrices
    in `quant`. `pre_tokenizer`: llama.cpp's pre-tokenizer name when the caller knows it better than the tokenizer
    file says (a model that came from a GGUF file). Written beside `path` and renamed into place, so an
    interrupted export never leaves a file that looks finished."""
    import gguf

    arch = check_supported(model.config)
    wanted = quant_type(quant)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its file is readable by its owner only, and the export is for sharing.
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    writer = gguf.GGUFWriter(staging, arch)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or "fine-tuned model")
        if description:
            writer.add_description(description)
        if licence:
            writer.add_license(licence)
        if base_model:
            writer.add_base_model_count(1)
            writer.add_base_model_name(0, base_model.split("/")[-1])
            writer.add_base_model_repo_url(0, f"https://huggingface.co/{base_model}")
        _add_architecture(writer, model.config, quant)
        _add_tokenizer(writer, tokenizer, model.config.vocab_size, pre_tokenizer)
        tensors = _tensors(model, arch)
        for number, (gguf_name, weights) in enumerate(tensors, start=1):
            stored = _stored_type(gguf_name, weights, wanted)
            data = gguf.quants.quantize(weights, stored)
            writer.add_tensor(gguf_name, data, raw_dtype=stored if data.dtype == "uint8" else None)
            if on_progress is not None and (number % 16 == 0 or number == len(tensors)):
                on_progress(0.9 * number / len(tensors), f"Quantizing to {quant}: {number} of {len(tensors)} tensors")
        if on_progress is not None:
            on_progress(0.95, f"Writing {path.name}…")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, path)
    finally:
        writer.close()
        staging.unlink(missing_ok=True)
    return path
