"""The benchmark command runs both paths end to end on the tiny shape and reports comparable numbers."""

import json

import pytest

from sft_space import bench, cli


@pytest.mark.slow
def test_bench_measures_both_paths_on_real_tokens(capsys):
    assert cli.main(["bench", "--shape", "tiny", "--steps", "2", "--warmup-steps", "1", "--max-length", "256",
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON document
    ours, baseline = result["paths"]
    assert (ours["name"], baseline["name"]) == ("SFT Space default", "TRL defaults")
    for path in (ours, baseline):
        assert path["tokens_per_second"] > 0 and path["measured_seconds"] > 0
        # Real tokens only: never more than the batches could hold.
        assert 0 < path["measured_tokens"] <= 2 * path["batch_size"] * path["sequence_length"]
    assert ours["batch_size"] == baseline["batch_size"]
    assert result["speedup"] == round(ours["tokens_per_second"] / baseline["tokens_per_second"], 2)
    assert "gradient checkpointing on" in baseline["notes"]


def test_token_counter_leaves_padding_out():
    import torch

    counter = bench.TokenCounter(lambda rows: {"input_ids": torch.zeros(2, 5, dtype=torch.long),
                                               "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])})
    counter([{}, {}])
    assert counter.counts == [8]


def test_synthetic_chats_look_like_chat_data():
    rows = bench.synthetic_chats(200, seed=0)
    assert rows == bench.synthetic_chats(200, seed=0)  # the same data for both paths and every rerun
    words = sorted(len(r["messages"][1]["content"].split()) for r in rows)
    assert 100 < words[len(words) // 2] < 250 and words[-1] > 2 * words[len(words) // 2]


def test_every_bench_shape_is_offered_and_real_models_use_the_catalogs_numbers():
    from sft_space import catalog
    from sft_space.settings import BENCH_SHAPES

    assert set(BENCH_SHAPES) == {*bench.SHAPES, bench.EMBEDDED}
    catalog_ids = {entry.model_id for entry in catalog.CATALOG}
    assert [name for name, shape in bench.SHAPES.items() if shape.model_id not in catalog_ids] == ["tiny"]
    assert bench.SHAPES["qwen2.5-7b"] is catalog.entry("Qwen/Qwen2.5-7B-Instruct")


def test_bench_json_refusal_has_the_bench_shape_not_validates(capsys):
    """A refused bench prints one JSON object of its own: the error and the settings asked for."""
    assert cli.main(["bench", "--shape", "tiny", "--max-length", "8", "--json"]) == 1
    refusal = json.loads(capsys.readouterr().out)
    assert set(refusal) == {"error", "settings"}
    assert "max_length = 8 is out of range" in refusal["error"]
    assert refusal["settings"]["shape"] == "tiny" and refusal["settings"]["max_length"] == 8
