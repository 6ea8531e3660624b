"""GGUF export: the file llama.cpp, Ollama and LM Studio read, written from a real trained run.

The round trip reads the exported file back with transformers' own GGUF reader (weights dequantized, tokenizer
and chat template rebuilt from the file's metadata) and compares it with the merged model it came from. The Hub
is replaced at its boundary by test_publish's FakeHub.
"""

from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from sft_space import cli, gguf_export, models, publish
from sft_space.chat import generate_reply
from sft_space.errors import UserError
from sft_space.settings import GenerationSettings, PublishSettings
from sft_space.ui import publish_tab
from test_publish import PLANTED_TOKEN, PROMPT, FakeHub

# How far the GGUF model's logits may stray from the merged float32 model's, on the tiny trained model:
# the largest difference of any logit, and the relative error ||Δ|| / ||logits|| over the whole prompt.
# f16 is the merged weights rounded once to 16 bits (measured: max 0.009, relative 0.0008); q8_0 rounds each
# block of 32 weights to 8 bits (max 0.29, relative 0.021); q4_0 to 4 bits, its embedding and output layer kept
# at 8 (relative 0.26 on this tiny random-initialised model; the real SmolLM2 is in docs/BENCHMARKS.md).
TOLERANCE = {"f16": (0.05, 0.005), "q8_0": (0.6, 0.06), "q4_0": (None, 0.4)}
# How many greedy tokens of the reply must be the merged model's. The tiny model learned the reply's opening
# ("Ahoy! 3 ..."); after it, its near-uniform guesses flip on any rounding, so q8_0 is held to the learned part
# and 16 bits to the whole reply. 4 bits may change a close choice even there: its logits are checked above.
REPLY_TOKENS = {"f16": 24, "q8_0": 6, "q4_0": 0}


@pytest.fixture(scope="module")
def merged(trained_run):
    model, tokenizer = publish.merged_model(trained_run)
    return model.eval(), tokenizer


def load_gguf(path, with_tokenizer=True):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if with_tokenizer else None


def prompt_ids(tokenizer):
    return tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


@pytest.mark.slow  # about 20 s each: transformers' GGUF reader takes ~15 s to read the file back
@pytest.mark.parametrize("quant", gguf_export.QUANTS)
def test_the_gguf_file_gives_the_merged_models_logits_and_reply(trained_run, merged, tmp_path, capsys, quant):
    out = tmp_path / "model.gguf"
    assert cli.main(["export", str(trained_run.path), "--gguf", str(out), "--quant", quant]) == 0
    assert f"Wrote {out}" in capsys.readouterr().out
    model, tokenizer = merged
    # The tokenizer is written the same whatever the tensors' quantization: read back once (f16), as transformers'
    # reader takes ~4 s for each of its three passes over the 49,152-token vocabulary.
    back, back_tokenizer = load_gguf(out, with_tokenizer=quant == "f16")

    ids = prompt_ids(tokenizer)
    if back_tokenizer is not None:
        # The tokenizer and chat template in the file give the very same tokens.
        assert prompt_ids(back_tokenizer).tolist() == ids.tolist()
    else:
        back_tokenizer = tokenizer
    with torch.no_grad():
        expected, got = model(ids).logits, back(ids).logits
    largest, relative = TOLERANCE[quant]
    difference = (got - expected).abs().max().item()
    error = ((got - expected).norm() / expected.norm()).item()
    assert error <= relative, f"{quant}: relative error {error:.4f}"
    if largest is not None:
        assert difference <= largest, f"{quant}: largest logit difference {difference:.4f}"
    if REPLY_TOKENS[quant]:
        greedy = GenerationSettings(max_new_tokens=REPLY_TOKENS[quant])
        assert generate_reply(back, back_tokenizer, PROMPT, greedy) == generate_reply(model, tokenizer, PROMPT, greedy)


@pytest.mark.slow
def test_the_file_holds_what_llama_cpp_needs(trained_run, tmp_path):
    from gguf import GGUFReader, GGMLQuantizationType, TokenType

    out = publish.export_gguf(trained_run.path, tmp_path / "model.gguf", "q4_0")
    reader = GGUFReader(out)
    value = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert value("general.architecture") == "llama" and value("llama.block_count") == 2
    assert value("tokenizer.ggml.model") == "gpt2" and len(value("tokenizer.ggml.merges")) > 40000
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    assert types[tokens.index("<|im_end|>")] == TokenType.CONTROL and types[tokens.index("Hello")] == TokenType.NORMAL
    assert tokens[value("tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    assert value("tokenizer.ggml.add_bos_token") is False  # SmolLM2's template starts without a BOS token
    assert "<|im_start|>" in value("tokenizer.chat_template")
    stored = {t.name: t.tensor_type for t in reader.tensors}
    assert stored["blk.0.attn_q.weight"] == GGMLQuantizationType.Q4_0
    assert stored["token_embd.weight"] == GGMLQuantizationType.Q8_0  # the tied output layer stays at 8 bits
    assert stored["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    assert "output.weight" not in stored  # tied: llama.cpp reuses the embedding
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.slow
def test_a_merged_push_with_a_gguf_merges_once_and_quantizes_from_float32(trained_run, tmp_path, monkeypatch):
    """Both the merged weights (here bf16) and the GGUF file come from one merge; the GGUF file is the very file
    `export --gguf` writes on its own, so it was not made from the weights already rounded to bf16."""
    from peft import PeftModel

    loads = []
    real = PeftModel.from_pretrained.__func__
    monkeypatch.setattr(PeftModel, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: loads.append(args) or real(cls, *args, **kwargs)))
    settings = PublishSettings(repo_id="alice/x", merged=True, merged_dtype="bfloat16", gguf=True, gguf_quant="f16")
    files = publish.stage(trained_run.path, tmp_path / "staged", settings, licence="apache-2.0")
    assert len(loads) == 1, "one merge for both"
    gguf_file = tmp_path / "staged" / gguf_export.file_name("x", "f16")
    assert gguf_file.relative_to(tmp_path / "staged") in files and Path("model.safetensors") in files
    alone = publish.export_gguf(trained_run.path, tmp_path / "alone.gguf", "f16", name="alice/x", licence="apache-2.0")
    assert gguf_file.read_bytes() == alone.read_bytes()


@pytest.mark.slow  # about 20 s: the GGUF reader again
def test_a_qwen2_model_round_trips(tiny_model_dir, embedded_tokenizer, tmp_path):
    """Qwen2's own path: biases on q, k and v, no rotary permutation, an output layer of its own."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(embedded_tokenizer) + 32, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=False, initializer_range=0.15,
                         eos_token_id=embedded_tokenizer.eos_token_id)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(std=0.1)
    out = gguf_export.write_gguf(model, embedded_tokenizer, tmp_path / "qwen.gguf", "f16", name="tiny-qwen")
    back, back_tokenizer = load_gguf(out)
    ids = prompt_ids(embedded_tokenizer)
    with torch.no_grad():
        difference = (back(ids).logits - model(ids).logits).abs().max().item()
    assert difference <= TOLERANCE["f16"][0]
    # The 32 embedding rows no token uses (as Qwen2 pads its vocabulary) are named, and change no tokenization.
    assert back.config.vocab_size == config.vocab_size
    assert prompt_ids(back_tokenizer).tolist() == ids.tolist()


def test_an_unsupported_architecture_is_refused_before_any_work(run_copy, tmp_path, capsys):
    from transformers import GPT2Config

    base = tmp_path / "gpt2-base"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(base)
    record = run_copy.read()
    record["base_model"] = record["settings"]["model"] = str(base)
    run_copy.write(record)
    out = tmp_path / "model.gguf"
    assert cli.main(["export", str(run_copy.path), "--gguf", str(out)]) == 1
    err = capsys.readouterr().err
    assert "GGUF export does not support the 'gpt2' architecture" in err and "Llama" in err and "Qwen2" in err
    assert not out.exists()
    hub = FakeHub()
    with pytest.raises(UserError, match="does not support the 'gpt2' architecture"):
        publish.push(run_copy.path, publish.PublishSettings(repo_id="alice/x", gguf=True), PLANTED_TOKEN, api=hub)
    assert hub.commits == [] and hub.created == []


@pytest.mark.slow
def test_push_uploads_the_gguf_beside_the_adapter_with_a_run_it_locally_section(run_copy, tmp_path):
    from gguf import GGUFReader

    folder = run_copy
    hub = FakeHub()
    steps = []
    settings = publish.PublishSettings(repo_id="alice/sailor", gguf=True, gguf_quant="q8_0")
    publish.push(folder.path, settings, PLANTED_TOKEN, api=hub, on_progress=lambda f, m: steps.append((f, m)))
    files = hub.files("alice/sailor")
    assert {"sailor-Q8_0.gguf", "adapter_model.safetensors", "README.md"} <= set(files)
    assert "and GGUF (q8_0)" in hub.commits[0]["message"]
    assert [f for f, _ in steps] == sorted(f for f, _ in steps)
    assert any("Quantizing to q8_0" in m for _, m in steps)

    (tmp_path / "sailor-Q8_0.gguf").write_bytes(files["sailor-Q8_0.gguf"])
    reader = GGUFReader(tmp_path / "sailor-Q8_0.gguf")
    assert reader.get_field("general.name").contents() == "alice/sailor"
    assert reader.get_field("general.base_model.count") is None  # a local base model: no Hub id to name

    card = ModelCard(files["README.md"].decode())
    assert "gguf" in card.data.tags and card.data.library_name == "peft"
    assert "## Run it locally" in card.text
    for command in ("llama-cli -hf alice/sailor:Q8_0", "ollama run hf.co/alice/sailor:Q8_0", "lms get alice/sailor",
                    "FROM ./sailor-Q8_0.gguf"):
        assert command in card.text
    assert folder.read()["published"][-1]["gguf"] == "q8_0"


def test_cli_push_takes_gguf_and_quant(run_copy, monkeypatch, capsys):
    hub = FakeHub()
    monkeypatch.setenv("HF_TOKEN", PLANTED_TOKEN)
    monkeypatch.setattr("huggingface_hub.HfApi", lambda token: hub)
    assert cli.main(["push", str(run_copy.path), "--repo", "alice/tiny", "--gguf", "--quant", "f16"]) == 0
    assert "tiny-F16.gguf" in hub.files("alice/tiny")
    assert "Quantizing to f16" in capsys.readouterr().err


def test_the_publish_tab_pushes_a_gguf(run_copy):
    hub = FakeHub()
    values = dict(private=True, update_existing=False, merged=False, merged_dtype="auto", gguf=True,
                  gguf_quant="q4_0", demo_space=False, description="")
    assert set(values) == set(publish_tab.FORM_FIELDS)
    run_copy.update(owner="visitor-1")  # started in the app by this visitor's browser
    shown = publish_tab.publish_run(str(run_copy.path.parent), str(run_copy.path), "visitor-1", "alice/app-gguf",
                                    PLANTED_TOKEN, None, values, api=hub)
    assert "alice/app-gguf" in shown and "app-gguf-Q4_0.gguf" in hub.files("alice/app-gguf")
    assert "ollama run hf.co/alice/app-gguf:Q4_0" in shown


@pytest.mark.slow
def test_the_publish_tab_downloads_a_gguf_of_the_visitors_own_run(run_copy, tmp_path):
    import gradio as gr
    from gguf import GGUFReader

    runs_dir = str(run_copy.path.parent)
    downloads = publish.Downloads(tmp_path / "downloads", 10**9)
    run_copy.update(owner="alice")  # started in the app by alice's browser
    path = publish_tab.gguf_run(runs_dir, run_copy.run_id, "alice", "q8_0", downloads)["value"]
    assert path.endswith("-Q8_0.gguf") and GGUFReader(path).get_field("general.architecture").contents() == "llama"
    with pytest.raises(gr.Error, match="no run"):
        publish_tab.gguf_run(runs_dir, run_copy.run_id, "mallory", "q8_0", downloads)


@pytest.mark.slow
def test_a_gguf_download_is_made_once_per_quantization_while_the_adapter_is_unchanged(run_copy, tmp_path,
                                                                                      monkeypatch):
    """Asked again (a page pressing the button over and over), the file already made is handed out: no second
    merge, no second file. A new adapter (the run resumed) is a new file; the estimate that decides whether it
    fits is close to the file's real size, and the page says that size in MB of a million bytes."""
    made, real = [], publish.export_gguf
    monkeypatch.setattr(publish, "export_gguf", lambda *args, **kwargs: made.append(args[2]) or real(*args, **kwargs))
    runs_dir, downloads = str(run_copy.path.parent), publish.Downloads(tmp_path / "downloads", 10**9)
    run_copy.update(owner="alice")
    first = publish_tab.gguf_run(runs_dir, run_copy.run_id, "alice", "f16", downloads)
    again = publish_tab.gguf_run(runs_dir, run_copy.run_id, "alice", "f16", downloads)
    assert again["value"] == first["value"] and made == ["f16"]
    size = Path(first["value"]).stat().st_size
    assert first["label"] == f"Save persona-F16.gguf ({size / 10**6:.1f} MB)"
    estimate = gguf_export.estimated_size(models.load_config(str(run_copy.settings().model)), "f16")
    assert size <= estimate <= size * 1.02
    publish_tab.gguf_run(runs_dir, run_copy.run_id, "alice", "q4_0", downloads)
    assert made == ["f16", "q4_0"]
    weights = run_copy.adapter_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes())  # saved again, as a resumed run saves it
    publish_tab.gguf_run(runs_dir, run_copy.run_id, "alice", "f16", downloads)
    assert made == ["f16", "q4_0", "f16"]


def test_an_unknown_quantization_is_refused(trained_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", str(trained_run.path), "--gguf", str(tmp_path / "x.gguf"), "--quant", "q5_k"])
    assert "invalid choice: 'q5_k'" in capsys.readouterr().err
    with pytest.raises(UserError, match="choose one of f16, q8_0, q4_0"):
        publish.export_gguf(trained_run.path, tmp_path / "x.gguf", "q5_k")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_llama_3_rope_scaling_is_written_as_llama_cpp_reads_it_and_other_scalings_are_refused(embedded_tokenizer,
                                                                                                tmp_path):
    from gguf import GGUFReader
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(vocab_size=len(embedded_tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=131072, rope_parameters=rope)
    out = gguf_export.write_gguf(LlamaForCausalLM(config), embedded_tokenizer, tmp_path / "llama3.gguf", "q8_0")
    reader = GGUFReader(out)
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    # One factor per rotated pair: the fastest-turning pairs untouched, the slowest stretched by the full factor.
    assert len(factors) == 16 // 2 and factors[0] == 1.0 and factors[-1] == 32.0
    assert list(factors) == sorted(factors)
    assert reader.get_field("llama.rope.freq_base").contents() == 500000.0

    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(UserError, match="does not support the 'yarn' RoPE scaling"):
        gguf_export.write_gguf(LlamaForCausalLM(config), embedded_tokenizer, tmp_path / "yarn.gguf", "q8_0")
    assert not (tmp_path / "yarn.gguf").exists()
