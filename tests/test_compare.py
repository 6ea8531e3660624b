"""Comparing runs: the curves of several runs on one frame, their settings side by side, only the visitor's runs."""

import dataclasses
import json

import pytest
from builders import evaluation_event, step_event, write_events

from sft_space import compare, runs
from sft_space.errors import UserError
from sft_space.settings import RunSettings


def make_run(runs_dir, run_id, owner="alice", losses=(3.0, 2.5, 2.0), eval_losses=(2.8,), **settings):
    """A run folder as training leaves it: a record with settings, plan and data, and a metrics stream."""
    folder = runs.RunFolder.create(runs_dir, run_id)
    values = {**dataclasses.asdict(RunSettings(source="/srv/app/runs/.uploads/ab12/captain.jsonl",
                                               output_dir="/srv/app/runs")), **settings}
    folder.write({"run_id": run_id, "status": "finished", "owner": owner, "settings": values,
                  "base_model": "embedded:SmolLM2-135M-Instruct",
                  "plan": {"precision": "fp32", "batch_size": 4, "four_bit": False, "reasons": ["fp32 on CPU"]},
                  "data": {"source": values["source"], "train_examples": 144, "validation_examples": 16,
                           "fingerprint": "0123456789abcdef0123"},
                  "final_metrics": {"step": len(losses), "loss": losses[-1],
                                    "eval_loss": eval_losses[-1] if eval_losses else None}})
    write_events(folder, *(step_event(step, loss, len(losses)) for step, loss in enumerate(losses, 1)))
    # Spread over the run, the last at its end.
    write_events(folder, *(evaluation_event(round(len(losses) * i / len(eval_losses)), eval_loss, len(losses))
                           for i, eval_loss in enumerate(eval_losses, 1)))
    return folder


def test_the_curves_of_several_runs_share_one_frame_one_run_per_series(tmp_path):
    make_run(tmp_path, "a", losses=(3.0, 2.0), eval_losses=(2.5,))
    make_run(tmp_path, "b", losses=(4.0, 3.0, 2.5), eval_losses=())
    folders = compare.open_runs(tmp_path, ["a", "b"], "alice")
    frame = compare.curves(folders)
    assert list(frame.columns) == ["step", "loss", "run", "split"]
    assert frame[frame["split"] == "train"].groupby("run")["loss"].apply(list).to_dict() == {
        "a": [3.0, 2.0], "b": [4.0, 3.0, 2.5]}
    assert frame[frame["split"] == "validation"][["step", "loss", "run"]].values.tolist() == [[2, 2.5, "a"]]
    comparison = compare.compare(folders)
    validation = comparison.split("validation")
    assert set(validation["run"]) == {"a"}  # a run without validation adds no line
    # A lone point is drawn as a short flat stroke around its step (a line through one point shows nothing).
    assert validation[["step", "loss"]].values.tolist() == [[1.5, 2.5], [2.5, 2.5]]
    assert comparison.split("train").equals(frame[frame["split"] == "train"].reset_index(drop=True))
    # One colour per run, the same on every plot of the comparison.
    assert list(comparison.colours) == ["a", "b"] and len(set(comparison.colours.values())) == 2


def test_a_metrics_line_that_is_not_a_loss_point_is_left_out(tmp_path):
    folder = make_run(tmp_path, "a", losses=(3.0,), eval_losses=())
    make_run(tmp_path, "b")
    with folder.events_path.open("a") as written:
        for entry in ({"step": 2, "loss": "high"}, {"step": 3, "loss": True}, {"step": None, "loss": 1.0},
                      {"step": 4, "loss": None}):
            written.write(json.dumps({**dataclasses.asdict(step_event(1, 1.0)), "event": "step", "time": 1.0, **entry}) + "\n")
        written.write('{"step": 5, "lo')  # a line cut off while it was written
    frame = compare.curves(compare.open_runs(tmp_path, ["a"], "alice"))
    assert frame.values.tolist() == [[1, 3.0, "a", "train"]]


def test_the_table_puts_each_run_in_a_column_and_marks_what_differs(tmp_path):
    make_run(tmp_path, "quick", lora_r=8, learning_rate=2e-4, preset="quick")
    make_run(tmp_path, "bigger", lora_r=16, learning_rate=0.0002, preset="quick", losses=(3.0, 2.0, 1.5))
    comparison = compare.compare(compare.open_runs(tmp_path, ["quick", "bigger"], "alice"))
    table = comparison.table.set_index(compare.ROW)
    assert list(table.columns) == ["quick", "bigger", compare.DIFFERS]
    assert table.loc["lora_r", "quick"] == "8" and table.loc["lora_r", "bigger"] == "16"
    assert table.loc["lora_r", compare.DIFFERS]
    # 2e-4 and 0.0002 are the same number: not a difference.
    assert table.loc["learning_rate", "quick"] == table.loc["learning_rate", "bigger"] == "0.0002"
    assert not table.loc["learning_rate", compare.DIFFERS]
    # What the plan resolved ("auto" settings) and the results are compared too.
    assert table.loc["plan: batch_size", "quick"] == "4"
    assert table.loc["train loss (smoothed)", compare.DIFFERS]
    # An upload is named by its file name (its folder is the server's), the runs folder not at all.
    assert table.loc["data", "quick"] == "captain.jsonl" and "source" not in table.index
    assert "output_dir" not in table.index and "/srv" not in comparison.table.to_string()
    # Rows in the order the Train tab shows the settings.
    order = list(table.index)
    assert order.index("lora_r") < order.index("lora_alpha") < order.index("learning_rate")
    differing = comparison.rows(only_differences=True)
    assert list(differing[compare.ROW]) == ["train loss (smoothed)", "lora_r"]
    assert compare.DIFFERS not in differing.columns
    assert len(comparison.rows(only_differences=False)) == len(comparison.table)


def test_only_the_visitors_own_runs_can_be_compared(tmp_path):
    """Any client can send any run names: another visitor's run is refused exactly as a run that is not there."""
    make_run(tmp_path, "alices", owner="alice")
    make_run(tmp_path, "alices-2", owner="alice")
    make_run(tmp_path, "bobs", owner="bob")
    make_run(tmp_path, "from-cli", owner=None)  # command-line runs have no owner: the operator's, no visitor's
    assert [f.run_id for f in compare.open_runs(tmp_path, ["alices", "alices-2", "alices"], "alice")] == [
        "alices", "alices-2"]
    with pytest.raises(UserError, match="no run from-cli of yours"):
        compare.open_runs(tmp_path, ["alices", "from-cli"], "alice")
    with pytest.raises(UserError, match="no run bobs of yours") as refused:
        compare.open_runs(tmp_path, ["alices", "bobs"], "alice")
    with pytest.raises(UserError) as missing:
        compare.open_runs(tmp_path, ["alices", "nobodys"], "alice")
    assert str(refused.value).replace("bobs", "X") == str(missing.value).replace("nobodys", "X")
    with pytest.raises(UserError):
        compare.open_runs(tmp_path, ["alices", ".."], "alice")
    # A path names the run by its last part, inside the runs folder only.
    assert compare.open_runs(tmp_path, ["/elsewhere/alices"], "alice")[0].path == tmp_path / "alices"
    with pytest.raises(UserError, match="at most"):
        compare.open_runs(tmp_path, [f"run-{i}" for i in range(compare.MAX_RUNS + 1)], "alice")
    with pytest.raises(UserError, match="at least 2"):
        compare.compare(compare.open_runs(tmp_path, ["alices"], "alice"))


def test_values_read_the_same_however_they_were_written():
    assert [compare.shown(v) for v in (None, "", True, False, 2e-4, 0.0002, 1.0, 16, 0.05, 1e-5, 2.41234567)] == [
        "—", "—", "yes", "no", "0.0002", "0.0002", "1", "16", "0.05", "1e-05", "2.412"]
