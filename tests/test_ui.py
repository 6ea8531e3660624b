"""UI helpers that need no browser."""


def test_loss_curve_names_the_validation_series_before_its_first_point(tmp_path):
    from builders import evaluation_event, step_event, write_events

    from sft_space import runs
    from sft_space.ui import train_tab
    from sft_space.ui.train_tab import loss_curve

    folder = runs.RunFolder.create(tmp_path, "r")
    folder.write({"data": {"validation_examples": 3}})
    write_events(folder, step_event(1, 2.0))
    curve = loss_curve(folder.path)
    assert set(curve["split"]) == {train_tab.RAW, train_tab.SMOOTHED, train_tab.VALIDATION}
    assert curve["loss"].isna().sum() == 1
    write_events(folder, evaluation_event(1, 2.5))
    assert not loss_curve(folder.path)["loss"].isna().any()


def test_earlier_chat_turns_reach_the_model_as_their_text():
    """Gradio's Chatbot hands earlier turns back as lists of parts; the model must see the words, not a repr."""
    import gradio as gr

    from sft_space.ui.chat_tab import page_history

    chatbot = gr.Chatbot()
    history = chatbot.preprocess(chatbot.postprocess([{"role": "user", "content": "Hi there"},
                                                      {"role": "assistant", "content": "Ahoy!"}]))
    assert page_history(history, "fine-tuned") == [{"role": "user", "content": "Hi there"},
                                     {"role": "assistant", "content": "Ahoy!"}]


def test_sign_in_with_hugging_face_is_wired_only_on_a_space(monkeypatch, tiny_model_dir, tmp_path):
    """On a Space with hf_oauth the Publish button receives the visitor's OAuth token; elsewhere the app must not
    ask for OAuth at all (Gradio would then demand a logged-in machine just to start)."""
    from sft_space import jobs
    from sft_space.ui import build_app

    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path))
    local = build_app(jobs.JobManager(), default_model=str(tiny_model_dir))
    assert not local.expects_oauth
    monkeypatch.setenv("SYSTEM", "spaces")
    monkeypatch.setenv("SPACE_ID", "alice/sft-space")
    monkeypatch.setenv("OAUTH_CLIENT_ID", "client-id")
    # What a Space with hf_oauth sets; Gradio reads these when it is first imported.
    for name, value in (("OAUTH_CLIENT_ID", "client-id"), ("OAUTH_CLIENT_SECRET", "secret"),
                        ("OAUTH_SCOPES", "openid profile write-repos manage-repos"),
                        ("OPENID_PROVIDER_URL", "https://huggingface.co")):
        monkeypatch.setattr(f"gradio.oauth.{name}", value)
    on_space = build_app(jobs.JobManager(), default_model=str(tiny_model_dir))
    assert on_space.expects_oauth
    push = [f for f in on_space.fns.values() if getattr(f.fn, "__name__", "") == "on_push"]
    assert len(push) == 1
    # Gradio finds the parameter it fills by its annotation, through any wrapper of the handler.
    import gradio as gr
    from gradio.utils import get_type_hints

    assert get_type_hints(push[0].fn)["oauth_token"] == (gr.OAuthToken | None)


def test_a_visitor_sees_and_opens_only_their_own_runs(tmp_path):
    """On a shared Space every visitor's runs sit in one folder: each sees their own, and nobody those started
    from the command line (the operator's)."""
    import gradio as gr
    import pytest

    from sft_space import runs
    from sft_space.errors import UserError
    from sft_space.ui import chat_tab, runs_tab

    for run_id, owner in (("alices", "alice"), ("bobs", "bob"), ("from-cli", None)):
        folder = runs.RunFolder.create(tmp_path, run_id)
        folder.write({"run_id": run_id, "status": "finished", "owner": owner, "settings": {}})
        (folder.adapter_path).mkdir()
        (folder.adapter_path / "adapter_config.json").write_text("{}")
        (folder.adapter_path / "adapter_model.safetensors").write_bytes(b"")
    assert set(runs_tab.runs_table(str(tmp_path), "alice")["run"]) == {"alices"}
    assert {v for _, v in chat_tab.run_choices(str(tmp_path), "bob")} == {str(tmp_path / "bobs"), chat_tab.BASE_ONLY}
    with pytest.raises(gr.Error, match="no run from-cli of yours"):
        chat_tab.own_run_dir(str(tmp_path), str(tmp_path / "from-cli"), "alice")
    assert runs_tab.run_details(str(tmp_path), "bobs", "alice")[0].startswith("❌")
    with pytest.raises(gr.Error, match="no run bobs of yours"):
        chat_tab.own_run_dir(str(tmp_path), str(tmp_path / "bobs"), "alice")
    # A page can send any value: only the name counts, and it must be a run here.
    for forged in ("../alices", str(tmp_path.parent / "elsewhere" / "alices"), "/etc/passwd"):
        try:
            assert runs.open_visible(str(tmp_path), forged, "alice").path.parent == tmp_path
        except UserError:
            pass
    with pytest.raises(UserError):
        runs.open_visible(str(tmp_path), "..", "alice")


def test_the_app_caps_uploads_at_the_data_file_limit(monkeypatch):
    """Gradio refuses larger uploads before they fill the disk; the cap is the data settings' own limit, or the
    operator's."""
    from sft_space import models
    from sft_space.settings import DataSettings
    from sft_space.ui import launch

    # launch also starts the built-in model's conversion, which this test has no use for.
    monkeypatch.setattr(models, "prepare_embedded_model_in_background", lambda: None)
    captured = {}

    class StandIn:
        def queue(self, **kwargs):
            return self

        def launch(self, **kwargs):
            captured.update(kwargs)

    launch(StandIn())
    assert captured["max_file_size"] == DataSettings.max_file_mb * 2**20
    monkeypatch.setenv("SFT_SPACE_MAX_FILE_MB", "5")
    launch(StandIn())
    assert captured["max_file_size"] == 5 * 2**20
    # A fraction of a megabyte is a cap of its own, not 0 (which would refuse every upload), and rounds up.
    monkeypatch.setenv("SFT_SPACE_MAX_FILE_MB", "0.5")
    launch(StandIn())
    assert captured["max_file_size"] == 2**19
    monkeypatch.setenv("SFT_SPACE_MAX_FILE_MB", "1.0000001")
    launch(StandIn())
    assert captured["max_file_size"] == 1048577


def test_the_app_starts_and_lists_runs_whose_records_are_broken(monkeypatch, tmp_path, tiny_model_dir):
    """One broken run.json must not stop the app (its Runs table is built at start-up), nor hide the run."""
    from sft_space import jobs, runs
    from sft_space.ui import build_app, chat_tab, runs_tab

    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path))
    for run_id, text in (("empty-list", "[]"), ("cut-off", '{"run_id": "cut-off", "sta'),
                         ("wrong-types", '{"run_id": "wrong-types", "owner": "alice", "status": "finished", '
                                         '"created_at": 5, "final_metrics": {"loss": "low"}, "settings": null}')):
        folder = runs.RunFolder.create(tmp_path, run_id)
        folder.record_path.write_text(text)
        folder.adapter_path.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (folder.adapter_path / name).write_text("{}")
    build_app(jobs.JobManager(), default_model=str(tiny_model_dir))
    table = runs_tab.runs_table(str(tmp_path), "alice")
    assert set(table["run"]) == {"wrong-types"}  # the others name no owner: the operator's, shown to no visitor
    assert all(status.startswith("unreadable: ") for status in table["status"])
    assert chat_tab.run_choices(str(tmp_path), "alice") == [(chat_tab.BASE_ONLY, chat_tab.BASE_ONLY)]
    assert runs_tab.run_details(str(tmp_path), "wrong-types", "alice")[0].startswith("❌")


def test_two_visitors_in_one_app_reach_only_their_own_uploads_and_models(tmp_path, tiny_model_dir):
    import gradio as gr
    import pytest

    from sft_space import access
    from sft_space.ui import data_tab
    from sft_space.ui.common import Gate

    gate = Gate(str(tmp_path / "runs"), access.Identity.for_runs(tmp_path / "runs"),
                offered_models={str(tiny_model_dir)})
    uploaded = tmp_path / "gradio" / "captain.jsonl"
    uploaded.parent.mkdir()
    uploaded.write_text(data_tab.SAMPLE_DATA.read_text())
    handle = data_tab.keep_upload(gate, "alice", str(uploaded))
    check = ("", False, str(tiny_model_dir), "", "", "train", 2048)
    report = data_tab.check_source(gate, "alice", handle, *check)[0]
    assert report.valid_rows == 160
    with pytest.raises(gr.Error, match="upload the file again"):
        data_tab.check_source(gate, "bob", handle, *check)
    # Typed into the Hub box instead: a path is never read, whoever types it.
    with pytest.raises(gr.Error, match="not a Hub dataset id"):
        data_tab.check_source(gate, "alice", None, handle, False, str(tiny_model_dir), "", "", "train", 2048)
    # Another visitor's adapter (or any folder) is not a model a visitor may name.
    with pytest.raises(gr.Error, match="not a Hub model id"):
        data_tab.check_source(gate, "bob", None, "", True, str(tmp_path / "runs"), "", "", "train", 2048)


def test_every_handler_of_the_app_refuses_a_forged_visitor_id(monkeypatch, tmp_path, tiny_model_dir):
    """Any HTTP client can call any handler with any values: with a forged id (a visitor's bare id, as written in
    run records) nothing acts; the read-only refreshes show only what an anonymous page sees."""
    import inspect

    import gradio as gr
    import pytest

    from sft_space import jobs
    from sft_space.ui import build_app

    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path))
    app = build_app(jobs.JobManager(), default_model=str(tiny_model_dir))
    handlers = {f.fn.__name__: f.fn for f in app.fns.values() if f.fn is not None}
    identify = handlers["on_load"]
    alice = identify("")
    forged = alice.split(".")[1]
    calls = {
        # A handler that trains takes the visitor's Hugging Face profile first (Gradio fills it; None here).
        "on_start": (None, forged, None, None, False, str(tiny_model_dir), "quick") + (None,) * 20,
        "on_stop": (forged, ""),
        "on_resume": (None, forged, ""),
        "on_push": ("run", forged, "alice/x", "", True, False, False, "auto", False, ""),
        "resume_run": (None, forged, "run"),
        "on_delete": ("run", forged),
    }
    for name, args in calls.items():
        handler = handlers[name]
        with pytest.warns(UserWarning, match="reload the page"):
            unchanged = handler(*args[:len(inspect.signature(handler).parameters)])
        if name == "on_push":  # the Publish tab says a refusal in its outcome line, where it stays
            assert unchanged.startswith("**Refused** · ") and "reload the page" in unchanged
            continue
        # A refusal is a message: every output is left as it was (no red error badge on it).
        outputs = unchanged if isinstance(unchanged, tuple) else (unchanged,)
        assert all(isinstance(output, type(gr.skip())) for output in outputs), name
    with pytest.warns(UserWarning, match="reload the page"):
        next(handlers["on_send"]("hi", [], [], None, str(tiny_model_dir), "", 0.7, 16, forged, 0.95))
    # The chat's own refusals are messages too: a conversation too long for the shared hardware.
    with pytest.warns(UserWarning, match="press Clear"):
        unchanged = next(handlers["on_send"]("y" * 40_000, [], [], None, str(tiny_model_dir), "", 0.7, 16, alice,
                                             0.95))
    assert all(isinstance(output, type(gr.skip())) for output in unchanged)
    assert identify(forged) != forged and identify(alice) == alice


def test_only_the_named_handlers_are_offered_as_an_api(monkeypatch, tmp_path, tiny_model_dir):
    """The page's own events stay off the API page and out of the Gradio clients; the API has stable names."""
    from sft_space import jobs
    from sft_space.ui import PUBLIC_API, build_app

    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path))
    app = build_app(jobs.JobManager(), default_model=str(tiny_model_dir))
    assert set(app.get_api_info()["named_endpoints"]) == {f"/{name}" for name in PUBLIC_API}
    # Files any client posts to Gradio's upload route, unused, do not pile up in the shared folder.
    assert app.delete_cache == (900, 3600)


def test_a_chat_conversation_is_bounded_before_any_model_is_loaded(tmp_path):
    """A page can send any history: one too long for the shared hardware is refused, whatever its shape."""
    import pytest

    from sft_space import access
    from sft_space.settings import GenerationSettings
    from sft_space.errors import UserError
    from sft_space.ui import chat_tab

    long_history = [{"role": "user", "content": [{"type": "text", "text": "x" * access.MAX_CHAT_CHARACTERS}]}]
    for message, history in (("y" * (access.MAX_CHAT_CHARACTERS + 1), []), ("hi", long_history)):
        with pytest.raises(UserError, match="press Clear"):
            chat_tab.checked_conversation(message, GenerationSettings(), history, [])
    # Inside the GPU function a model that cannot load is a gr.Error: the one exception ZeroGPU's worker passes
    # on with its message (any other reads "ZeroGPU worker error").
    import gradio as gr

    with pytest.raises(gr.Error) as refused:
        list(chat_tab.respond("hi", [], [], None, "no/such-model", GenerationSettings()))
    assert "no/such-model" in refused.value.message


def test_the_forms_number_boxes_refuse_what_the_settings_refuse():
    """Numbers from the page are bounded where the settings declare it: Gradio enforces a number box's bounds
    for any client, and the settings refuse the same values from the command line or a config file."""
    import pytest

    from sft_space.errors import UserError
    from sft_space.settings import RunSettings, run_settings
    from sft_space.ui.common import settings_component
    from sft_space.ui.train_tab import advanced_fields

    bounded = [spec for spec in advanced_fields() if "bounds" in spec.metadata]
    assert {"lora_r", "epochs", "max_steps", "batch_size", "sample_prompts"} <= {spec.name for spec in bounded}
    for spec in bounded:
        low, high = spec.metadata["bounds"]
        box = settings_component(spec, render=False)
        assert box.preprocess(high) == high
        with pytest.raises(Exception, match="greater than maximum"):
            box.preprocess(high + 1)
        with pytest.raises(UserError, match=f"{spec.name} = .* out of range"):
            run_settings("quick", **{spec.name: high * 2 + 1})
    with pytest.raises(UserError, match="max_length"):
        RunSettings(max_length=10**9)
    # A choice outside its field's choices (a config file, or a client that skips the page) is refused too.
    with pytest.raises(UserError, match="report_to = 'wandb' is not one of none, trackio, tensorboard"):
        run_settings("quick", report_to="wandb")


def test_start_with_invalid_rows_is_refused_before_any_run_and_says_what_to_do(tmp_path, write_jsonl,
                                                                              tiny_model_dir, embedded_tokenizer):
    import pytest

    from sft_space import checks, jobs
    from sft_space.errors import UserError
    from sft_space.settings import DataSettings
    from sft_space.ui import train_tab
    from builders import distinct_chats

    path = write_jsonl(distinct_chats(10) + [{"messages": [{"role": "user", "content": "Hi"}]}])
    settings = DataSettings(source=str(path))
    report = checks.check_data(settings, embedded_tokenizer)
    advanced = {spec.name: spec.default for spec in train_tab.advanced_fields()}
    with pytest.raises(UserError, match="1 of 11 rows have errors .* tick Skip invalid rows .* 10 valid"):
        train_tab.settings_from_form(settings, False, str(tiny_model_dir), "quick", str(tmp_path), advanced, report)
    assert train_tab.settings_from_form(settings, True, str(tiny_model_dir), "quick", str(tmp_path), advanced, report)
    # A refused job reads "Refused", and its reason once.
    job = jobs.Job("j", "alice", settings, state=jobs.JobState.REFUSED, message="bad data", error="bad data")
    shown = train_tab.progress_markdown(job)
    assert shown.startswith("**Refused**") and shown.count("bad data") == 1


def test_the_data_tab_shows_complete_counts_and_a_sample_of_rows_for_each_problem(write_jsonl, embedded_tokenizer):
    """A file with thousands of problems stays readable: every count is complete, the rows are a sample per code."""
    from builders import distinct_chats

    from sft_space import checks
    from sft_space.settings import DataSettings
    from sft_space.ui import data_tab

    rows = distinct_chats(10) + [{"messages": [{"role": "user", "content": f"Hi {i}"}]} for i in range(300)]
    rows += [distinct_chats(1)[0]] * 30
    calls = []
    progress = lambda value, desc=None, unit=None: calls.append((value, desc))  # noqa: E731
    report = checks.check_data(DataSettings(source=str(write_jsonl(rows))), embedded_tokenizer,
                               on_progress=data_tab._progress_bar(progress))
    counts = data_tab.problem_counts_table(report).set_index("code")
    assert counts.loc["no_assistant_turn", "rows"] == 300 and counts.loc["no_assistant_turn", "severity"] == "error"
    assert counts.loc["duplicate", "rows"] == 30 and counts.loc["duplicate", "severity"] == "warning"
    shown = data_tab.problem_rows_table(report)
    per_code = shown.groupby("code").size()
    assert per_code["no_assistant_turn"] == data_tab.PROBLEM_ROWS_PER_CODE == per_code["duplicate"]
    assert shown["row"].is_monotonic_increasing and shown["row"].iloc[-1] == len(rows)  # spread to the end
    assert calls and calls[-1][0] == (len(rows), len(rows))


def test_the_preview_shows_the_kept_examples_of_a_file_with_repeats(tmp_path, tiny_model_dir, monkeypatch):
    """The preview numbers the examples kept for training (repeats dropped), not the valid rows, so every number it
    offers shows an example; and a session keeps a bounded number of them, however large the file."""
    import json

    from builders import distinct_chats

    from sft_space import access
    from sft_space.ui import data_tab
    from sft_space.ui.common import Gate

    gate = Gate(str(tmp_path / "runs"), access.Identity.for_runs(tmp_path / "runs"),
                offered_models={str(tiny_model_dir)})
    rows = distinct_chats(8)
    uploaded = tmp_path / "gradio" / "repeats.jsonl"
    uploaded.parent.mkdir()
    uploaded.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:4]))
    handle = data_tab.keep_upload(gate, "alice", str(uploaded))
    check = ("", False, str(tiny_model_dir), "", "", "train", 2048)
    outputs = data_tab.check_source(gate, "alice", handle, *check)
    report = outputs[0]
    assert report.valid_rows == 12 and len(report.valid_examples) == 8
    assert outputs[7].maximum == 8
    assert "Example 8 of 8</b>" in data_tab.preview_html(report, str(tiny_model_dir), 12)
    # A large file: the session keeps a preview of the examples, and every count covers all of them.
    monkeypatch.setattr(data_tab, "PREVIEW_EXAMPLES", 3)
    report = data_tab.check_source(gate, "alice", handle, *check)[0]
    assert len(report.valid_examples) == 3 and report.stats()["examples"] == 8
    assert "Example 3 of the first 3 of 8</b>" in data_tab.preview_html(report, str(tiny_model_dir), 5)


def _app_with_runs(monkeypatch, tmp_path, tiny_model_dir):
    """The app over a runs folder holding two runs of a visitor (alice: a page's signed id) and one of another."""
    from test_compare import make_run

    from sft_space import jobs
    from sft_space.ui import build_app

    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path))
    app = build_app(jobs.JobManager(), default_model=str(tiny_model_dir))
    handlers = {f.fn.__name__: f for f in app.fns.values() if f.fn is not None}
    alice, bob = handlers["on_load"].fn(""), handlers["on_load"].fn("")
    make_run(tmp_path, "alice-quick", owner=alice.split(".")[1], lora_r=8)
    make_run(tmp_path, "alice-rank16", owner=alice.split(".")[1], lora_r=16, losses=(3.2, 2.4, 1.9))
    make_run(tmp_path, "bobs", owner=bob.split(".")[1])
    return app, handlers, alice


def test_the_compare_view_overlays_a_visitors_runs_and_tells_their_settings_apart(tmp_path):
    """Runs tab: two runs' curves on one plot (one colour each, train and validation), their settings side by side
    with only what differs, or all of them with the differences highlighted."""
    from test_compare import make_run

    from sft_space.ui import runs_tab

    make_run(tmp_path, "quick", owner="alice", lora_r=8)
    make_run(tmp_path, "rank16", owner="alice", lora_r=16, losses=(3.2, 2.4, 1.9), eval_losses=(2.9, 2.2))
    note, train, validation, table = runs_tab.compare_view(str(tmp_path), ["quick", "rank16"], True, "alice")
    for plot in (train, validation):
        assert {row[2] for row in plot.value["data"]} == {"quick", "rank16"}
        assert set(plot.color_map) == {"quick", "rank16"} and len(set(plot.color_map.values())) == 2
    assert train.color_map == validation.color_map
    assert list(table.columns[1:]) == ["quick", "rank16"] and "lora_r" in list(table.iloc[:, 0])
    assert "learning_rate" not in list(table.iloc[:, 0]) and note.startswith(f"{len(table)} of ")
    # Every setting, the differing rows highlighted.
    styled = runs_tab.compare_view(str(tmp_path), ["quick", "rank16"], False, "alice")[3]
    shown = styled.data.set_index(styled.data.columns[0])
    assert "learning_rate" in shown.index
    styles = styled._compute().ctx  # (row, column) -> the CSS the table cell gets
    highlighted = {shown.index[row] for (row, _), style in styles.items() if style}
    assert highlighted == {"lora_r", "train loss (smoothed)", "validation loss"}
    assert all(style == [tuple(runs_tab.DIFFERENT.split(": "))] for style in styles.values() if style)
    # One run picked (or none): a prompt, nothing drawn.
    assert runs_tab.compare_view(str(tmp_path), ["quick"], True, "alice")[:3] == (runs_tab.PICK_TWO, None, None)


def test_the_compare_view_is_off_the_api_and_refuses_another_visitors_runs(monkeypatch, tmp_path, tiny_model_dir):
    """Any HTTP client can call any handler with any values: naming another visitor's run is refused (as a run
    that is not there), and so is a forged visitor id; the event is not offered as an API."""
    import gradio as gr
    import pytest

    app, handlers, alice = _app_with_runs(monkeypatch, tmp_path, tiny_model_dir)
    on_compare = handlers["on_compare"]
    assert on_compare.api_visibility == "private"
    assert "/compare_runs" not in app.get_api_info()["named_endpoints"]
    note, train, _, table = on_compare.fn(["alice-quick", "alice-rank16"], True, alice)
    assert {row[2] for row in train.value["data"]} == {"alice-quick", "alice-rank16"}
    for picked, token, message in ((["alice-quick", "bobs"], alice, "no run bobs of yours"),
                                   (["alice-quick", "alice-rank16"], alice.split(".")[1], "reload the page")):
        with pytest.warns(UserWarning, match=message):
            outputs = on_compare.fn(picked, True, token)
        assert all(isinstance(output, type(gr.skip())) for output in outputs)
    # The tab's refresh offers the visitor's own runs to compare, and keeps the picks still there.
    summary, table, _, picks = handlers["on_refresh"].fn(None, alice, ["alice-rank16", "gone"])
    assert set(table["run"]) == {"alice-quick", "alice-rank16"} and summary == "2 runs, newest first."
    # A visitor with no runs is told so, not shown an empty table alone.
    assert handlers["on_refresh"].fn(None, handlers["on_load"].fn(""), [])[0].startswith("No runs of yours")
    assert set(picks["choices"]) == {"alice-quick", "alice-rank16"} and picks["value"] == ["alice-rank16"]


def test_the_runs_table_fits_the_page(tmp_path):
    """A run's row stays within what fits beside the others at 1280 px: a short time stamp and model name, never a
    full time stamp or a whole model path, which push the last column past the page's edge."""
    from sft_space import runs
    from sft_space.ui import runs_tab

    folder = runs.RunFolder.create(tmp_path, "20250101-100000-captain_byte")
    folder.write({"run_id": folder.run_id, "owner": "alice", "status": "finished",
                  "created_at": "2025-01-01T10:00:00+0100", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                  "data": {"source": "/srv/app/runs/.uploads/0123456789abcdef01234567/captain_byte.jsonl",
                           "train_examples": 144}, "final_metrics": {"step": 46, "loss": 2.41234, "eval_loss": 2.3}})
    table = runs_tab.runs_table(str(tmp_path), "alice")
    row = table.iloc[0]
    assert row["started"] == "2025-01-01 10:00" and row["model"] == "SmolLM2-135M-Instruct"
    assert row["data"] == "captain_byte.jsonl"
    # The columns together fit the table's 1,214 px in a 1,280 px window, and each holds its value and its header's
    # longest word at 8.7 px a character and 16 px of padding (measured in Chromium).
    assert sum(runs_tab.RUNS_COLUMNS) <= 1214 and len(runs_tab.RUNS_COLUMNS) == len(row)
    for (name, value), width in zip(row.items(), runs_tab.RUNS_COLUMNS):
        assert max(len(str(value)), *map(len, name.split())) * 8.7 + 16 <= width, name
    assert runs_tab._short_model("embedded:SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert runs_tab._short_model("/home/me/models/tiny/") == "tiny" and runs_tab._short_model(None) == ""


def test_the_token_histogram_starts_at_zero_and_names_both_lines(write_jsonl, embedded_tokenizer, tmp_path,
                                                                tiny_model_dir, monkeypatch):
    """The bar plot's axis starts at zero (Gradio's plots do not by themselves: they start at -100/-200), its legend
    is not cut off (no fixed height), and bars of the two kinds at one position stand side by side, not stacked."""
    import gradio as gr

    from builders import distinct_chats

    from sft_space import checks, jobs
    from sft_space.settings import DataSettings
    from sft_space.ui import build_app, data_tab

    report = checks.check_data(DataSettings(source=str(write_jsonl(distinct_chats(30)))), embedded_tokenizer)
    frame = data_tab.token_histogram(report)
    kinds = frame.groupby("kind")
    assert set(kinds.groups) == {"all tokens", "trained tokens"}
    # The same bins for both, from zero to the longest example, empty ones included.
    bins = kinds["tokens"].apply(list)
    width = bins["all tokens"][1] - bins["all tokens"][0]
    assert bins["all tokens"] == bins["trained tokens"] and bins["all tokens"][0] == width / 2  # [0, width)
    assert (kinds["examples"].sum() == len(report.token_counts)).all()
    assert data_tab.token_histogram(checks.Report("x", "openai", 0, 2048)) is None
    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path))
    app = build_app(jobs.JobManager(), default_model=str(tiny_model_dir))
    plot = next(block for block in app.blocks.values() if getattr(block, "elem_id", None) == "token-histogram")
    assert isinstance(plot, gr.LinePlot) and plot.x_lim[0] == 0 and plot.y_lim[0] == 0
    assert plot.height is None  # a fixed height cuts off the legend below the plot
    assert set(plot.color_map) == {"all tokens", "trained tokens"}


def test_the_chat_messages_start_below_the_chatbots_toolbar(monkeypatch, tmp_path, tiny_model_dir):
    """Each chatbot's label and toolbar icons float over the top of its message list: the list starts below them,
    so a question is never cut off under the icons (seen in a screenshot before the change)."""
    from sft_space import jobs
    from sft_space.ui import build_app, chat_tab

    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path))
    app = build_app(jobs.JobManager(), default_model=str(tiny_model_dir))
    ids = {getattr(block, "elem_id", None): block for block in app.blocks.values()}
    assert f"<style>{chat_tab.CHAT_CSS}</style>" == ids["chat-style"].value
    for chatbot in ("chat-tuned", "chat-base"):
        assert chatbot in ids and f"#{chatbot} [role=log]" in chat_tab.CHAT_CSS
    assert "margin-top: 36px; height: calc(100% - 36px)" in chat_tab.CHAT_CSS


def test_a_large_hub_dataset_shows_a_first_look_then_the_whole_report(tmp_path, tiny_model_dir, monkeypatch,
                                                                      hub_online):
    import datasets
    from builders import chat

    from sft_space import access, checks
    from sft_space.ui import data_tab
    from sft_space.ui.common import Gate

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (
        chat((f"Question {i}?", f"Answer {i}.")) for i in range(checks.FIRST_LOOK_ROWS + 500)))
    gate = Gate(str(tmp_path / "runs"), access.Identity.for_runs(tmp_path / "runs"),
                offered_models={str(tiny_model_dir)})
    stages = list(data_tab.check_source_in_stages(gate, "alice", None, "someone/large", False, str(tiny_model_dir),
                                                  "", "", "train", 2048))
    assert [outputs[0].rows for outputs in stages] == [checks.FIRST_LOOK_ROWS, checks.FIRST_LOOK_ROWS + 500]
    assert stages[0][2].startswith("⏳ **A first look at the first 2,000 rows**")
    assert not stages[1][2].startswith("⏳")


def _space_app(monkeypatch, tmp_path, tiny_model_dir, **variables):
    """The app as a Space with sign-in builds it: SPACE_ID and the rest set, Gradio's OAuth settings read."""
    from sft_space import jobs
    from sft_space.ui import build_app

    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path / "runs"))
    for name, value in {"SYSTEM": "spaces", "SPACE_ID": "acme/sft-space", "SPACE_AUTHOR_NAME": "acme",
                        "SPACE_HOST": "acme-sft-space.hf.space", "OAUTH_CLIENT_ID": "client-id", **variables}.items():
        monkeypatch.setenv(name, value)
    for name, value in (("OAUTH_CLIENT_ID", "client-id"), ("OAUTH_CLIENT_SECRET", "secret"),
                        ("OAUTH_SCOPES", "openid profile write-repos manage-repos"),
                        ("OPENID_PROVIDER_URL", "https://huggingface.co")):
        monkeypatch.setattr(f"gradio.oauth.{name}", value)
    app = build_app(jobs.JobManager(), default_model=str(tiny_model_dir))
    return app, {f.fn.__name__: f.fn for f in app.fns.values() if f.fn is not None}


def _profile(username, orgs=()):
    import gradio as gr

    return gr.OAuthProfile({"sub": "1", "name": username, "preferred_username": username, "picture": "",
                            "profile": f"https://huggingface.co/{username}",
                            "orgs": [{"sub": "2", "name": org, "preferred_username": org} for org in orgs]})


def test_on_a_space_a_visitor_who_may_not_train_is_refused_start_resume_and_publish(monkeypatch, tmp_path,
                                                                                    tiny_model_dir):
    """The decision comes from the profile Gradio passes (its session cookie), never from the page's values: the
    same page, signed out, is refused in one sentence; the owner's organisation's member goes on to the next
    check."""
    import inspect

    import gradio as gr
    import pytest

    app, handlers = _space_app(monkeypatch, tmp_path, tiny_model_dir)
    token = handlers["on_load"]("", None)
    refused = "Only acme, who owns this Space"
    start = (token, "", None, None, False, str(tiny_model_dir), "quick") + (None,) * 30
    # Publishing takes Gradio's OAuth token, profile and progress first, then the form, whose values are None
    # here: the gate comes first.
    push = (None, None, None, "run", token) + (None,) * 20
    for name, args in (("on_start", (None, *start)), ("on_resume", (None, token, "")),
                       ("resume_run", (None, token, "run")), ("on_push", push)):
        handler = handlers[name]
        with pytest.warns(UserWarning, match=refused):
            result = handler(*(args if name == "on_push" else args[:len(inspect.signature(handler).parameters)]))
        if name in ("on_start", "on_resume"):
            # The status line keeps the refusal, said once as a refusal.
            assert f"**Refused** · {refused}" in result[1]
    member = _profile("alice", orgs=["acme"])
    with pytest.warns(UserWarning, match="Check your data in the Data tab first"):
        handlers["on_start"](member, *start[:len(inspect.signature(handlers["on_start"]).parameters) - 1])
    # Gradio finds the profile by its annotation, through the wrapper that turns refusals into messages.
    from gradio.utils import get_type_hints

    for name in ("on_start", "on_resume", "resume_run", "on_push", "show_access"):
        assert get_type_hints(handlers[name])["profile"] == (gr.OAuthProfile | None), name


def test_the_duplicate_button_is_offered_to_those_refused_and_at_the_top_of_the_original_space(
        monkeypatch, tmp_path, tiny_model_dir):
    import gradio as gr

    from sft_space import jobs
    from sft_space.ui import build_app

    def duplicate_buttons(app):
        return {block.elem_id for block in app.blocks.values() if isinstance(block, gr.DuplicateButton)}

    # On a machine of one's own the button would do nothing, and anyone trains: there is none.
    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path / "local"))
    assert duplicate_buttons(build_app(jobs.JobManager(), default_model=str(tiny_model_dir))) == set()
    # A duplicated Space: the button sits beside the Train tab's refusal.
    app, handlers = _space_app(monkeypatch, tmp_path, tiny_model_dir, SFT_SPACE_ORIGINAL_SPACE="acme/sft-space",
                               SPACE_ID="bob/sft-space", SPACE_AUTHOR_NAME="bob")
    assert duplicate_buttons(app) == {"duplicate-train"}
    # The original public Space: also at the top of the page, for the visitors who may not train.
    app, handlers = _space_app(monkeypatch, tmp_path, tiny_model_dir, SFT_SPACE_ORIGINAL_SPACE="acme/sft-space")
    assert duplicate_buttons(app) == {"duplicate-train", "duplicate-top"}
    row, reason, cost, top = handlers["show_access"](None)
    assert row["visible"] and top["visible"] and not cost["visible"]
    assert reason.startswith("Only acme, who owns this Space") and "duplicate the Space" in reason
    row, reason, cost, top = handlers["show_access"](_profile("acme"))
    assert not row["visible"] and not top["visible"] and cost["visible"] and reason == ""
    assert "This app trains on **CPU" in cost["value"]


def test_the_preview_html_highlights_trained_tokens_colours_roles_and_escapes_text(embedded_tokenizer):
    from sft_space import render
    from sft_space.ui.chatml_html import ROLE_COLOURS, to_html

    rendered = render.render_conversation(embedded_tokenizer, [
        {"role": "user", "content": "Say <b>hi</b> & bye"},
        {"role": "assistant", "content": "hi & bye"},
    ])
    page = to_html(rendered)
    marked = [piece.split(">", 1)[1] for piece in page.split("<mark class=\"sft-trained\"")[1:]]
    assert "".join(m.split("</mark>")[0] for m in marked) == "hi &amp; bye&lt;|im_end|&gt;"
    assert "Say &lt;b&gt;hi&lt;/b&gt; &amp; bye" in page  # user text escaped, never interpreted
    assert f"color:{ROLE_COLOURS['user']}" in page
    assert f"{rendered.n_tokens} tokens, {rendered.n_trained} trained" in page
    # The system turn the template writes by itself is coloured as the legend's system.
    default = page.index("You are a helpful AI assistant")
    assert page.startswith(f"color:{ROLE_COLOURS['system']}", page.rindex("color:", 0, default))


def test_the_operators_data_limits_reach_the_check_and_the_run_and_no_page_can_raise_them(
        monkeypatch, tmp_path, tiny_model_dir):
    """DataSettings' max_rows and max_file_mb are the operator's (SFT_SPACE_MAX_ROWS, SFT_SPACE_MAX_FILE_MB):
    the Data tab checks with them, the checked settings carry them on to training, and the page sends none."""
    import inspect

    import pytest

    from sft_space import access, jobs
    from sft_space.errors import UserError
    from sft_space.ui import build_app, data_tab
    from sft_space.ui.common import Gate

    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path))
    monkeypatch.setenv("SFT_SPACE_MAX_ROWS", "100")  # the sample has 160 rows
    app = build_app(jobs.JobManager(), default_model=str(tiny_model_dir))
    handlers = {f.fn.__name__: f.fn for f in app.fns.values() if f.fn is not None}
    check = handlers["on_check"]
    assert not {"max_rows", "max_file_mb"} & set(inspect.signature(check).parameters)
    token = handlers["on_load"]("")
    with pytest.warns(UserWarning, match="more than 100 rows, the limit"):
        list(check(token, None, "sample", "", str(tiny_model_dir), "", "", "train", 2048, progress=None))
    monkeypatch.setenv("SFT_SPACE_MAX_ROWS", "1000")
    monkeypatch.setenv("SFT_SPACE_MAX_FILE_MB", "5")
    gate = Gate(str(tmp_path), access.Identity.for_runs(tmp_path), offered_models={str(tiny_model_dir)})
    _, settings, *_ = data_tab.check_source(gate, "alice", None, "", True, str(tiny_model_dir), "", "", "train", 2048,
                                            limits=access.data_limits())
    assert (settings.max_rows, settings.max_file_mb) == (1000, 5.0)
    monkeypatch.setenv("SFT_SPACE_MAX_ROWS", "0")
    with pytest.raises(UserError, match="max_rows = 0 is out of range"):
        access.data_limits()


def test_a_suggested_prompt_is_one_the_run_held_out(tmp_path):
    from sft_space import runs
    from sft_space.ui import chat_tab

    folder = runs.RunFolder.create(tmp_path, "held-out")
    folder.write({"run_id": "held-out", "status": "finished", "owner": "alice"})
    assert chat_tab.suggestion(str(tmp_path), str(folder.path), "alice") == "Hello! Who are you?"
    runs.write_json_atomic(folder.samples_path, [
        {"prompt": [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Where be the gold?"}],
         "reference": "Buried.", "before": None, "after": None}])
    assert chat_tab.suggestion(str(tmp_path), str(folder.path), "alice") == "Where be the gold?"
    # A samples.json of another shape (hand-edited, or from another version) never makes the button fail.
    runs.write_json_atomic(folder.samples_path, [{"prompt": [3, {"role": "user"}]}, {"prompt": "x"}])
    assert chat_tab.suggestion(str(tmp_path), str(folder.path), "alice") == "Hello! Who are you?"


def test_the_chat_model_cache_keeps_one_model_and_loads_it_once_for_many_visitors(tiny_model_dir, tmp_path):
    """Every visitor's reply comes from the one model in memory; asking for another replaces it."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from sft_space.chat import ChatModelCache

    cache = ChatModelCache()
    with ThreadPoolExecutor(max_workers=4) as pool:
        models = list(pool.map(lambda _: cache.get(None, str(tiny_model_dir)), range(4)))
    assert all(model is models[0] for model in models) and not models[0].has_adapter
    assert models[0].base_model == str(tiny_model_dir)
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    replaced = cache.get(None, str(other))
    assert replaced is not models[0] and replaced.base_model == str(other)
    assert cache.get(None, str(other)) is replaced
    assert cache.get(None, str(tiny_model_dir)) is not models[0]  # the first was let go, so it is loaded again


def test_the_chat_sliders_are_the_generation_settings_bounds_and_defaults():
    import dataclasses

    import gradio as gr
    import pytest

    from sft_space.settings import GenerationSettings
    from sft_space.ui import chat_tab

    with gr.Blocks():
        sliders = {name: chat_tab.settings_slider(name, name) for name in ("temperature", "top_p", "max_new_tokens")}
    for spec in dataclasses.fields(GenerationSettings):
        if spec.name in sliders:
            slider = sliders[spec.name]
            offered = spec.metadata.get("app_bounds") or spec.metadata["bounds"]
            assert (slider.minimum, slider.maximum) == offered
            assert slider.value == spec.default and slider.info == spec.metadata["help"]
    settings = chat_tab.generation_settings(None, 0.7, 0.5, 64.0)
    assert settings == GenerationSettings(max_new_tokens=64, temperature=0.7, top_p=0.5)
    # The shared app offers shorter replies than the command line takes, and Gradio refuses more for any client.
    assert sliders["max_new_tokens"].maximum == 1024
    assert GenerationSettings(max_new_tokens=4096).max_new_tokens == 4096
    with pytest.raises(gr.Error):
        sliders["max_new_tokens"].preprocess(4096)


def test_top_p_reaches_sampling_and_greedy_ignores_it(tiny_model_dir):
    """With a temperature, the same random draws from a narrower nucleus give another reply; without one (greedy)
    top_p changes nothing."""
    import torch

    from sft_space.chat import load_chat_model
    from sft_space.settings import GenerationSettings

    chat = load_chat_model(None, str(tiny_model_dir))
    question = [{"role": "user", "content": "Ahoy, who are you?"}]

    def reply(temperature: float, top_p: float) -> str:
        torch.manual_seed(0)
        return chat.reply(question, GenerationSettings(max_new_tokens=12, temperature=temperature, top_p=top_p))

    assert reply(1.0, 0.05) != reply(1.0, 1.0)
    assert reply(0.0, 0.05) == reply(0.0, 1.0)


def test_launch_prepares_the_built_in_model_only_where_the_page_preselects_it(monkeypatch, tiny_model_dir):
    """The one-time conversion at start-up is for the first run of the built-in default; an app whose operator
    preselects another model (as the browser tests do) spends no start-up CPU on it."""
    from sft_space import models
    from sft_space.ui import launch

    started = []
    monkeypatch.setattr(models, "prepare_embedded_model_in_background", lambda: started.append(True))
    monkeypatch.setattr(models, "default_model", lambda: models.EMBEDDED_MODEL)

    class StandIn:
        def queue(self, **kwargs):
            return self

        def launch(self, **kwargs):
            pass

    monkeypatch.delenv("SFT_SPACE_DEFAULT_MODEL", raising=False)
    launch(StandIn())
    assert started == [True]
    monkeypatch.setenv("SFT_SPACE_DEFAULT_MODEL", str(tiny_model_dir))
    launch(StandIn())
    assert started == [True]
