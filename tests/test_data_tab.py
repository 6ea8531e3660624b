"""The Data tab without a browser: one source of truth for the visitor's data, refusals that clear the report and
stay said, the tab kept for the visitor across a reload, text from data shown as text, the page's words."""

import inspect
import json

import gradio as gr
import pytest
from markdown_it import MarkdownIt

from sft_space import checks
from sft_space.settings import DataSettings
from sft_space.ui import data_tab
from sft_space.ui.common import markdown_text, refused_markdown

TRACKER = "http://127.0.0.1:9/track.png"
# A column name and a role that would fetch the tracker if the page rendered them.
IMAGE_COLUMN = f"![t]({TRACKER})"
HTML_COLUMN = f"<img src={TRACKER}>"
# The check's outputs, in the order the tab's handlers return them.
REPORT, SETTINGS, SUMMARY = 0, 1, 2
# The upload handler's outputs before the check's: the upload box, its handle, the session, the source, the note.
UPLOAD_OUTPUTS = 5
# The restore's outputs before the check's: the form (source, Hub id, config, split, columns, maximum length),
# Skip invalid rows, the upload handle and the note.
RESTORED_FORM = 9


def chat(n):
    return {"messages": [{"role": "user", "content": f"Question {n}?"},
                         {"role": "assistant", "content": f"Answer {n}."}]}


def rendered(markdown):
    """The HTML a CommonMark renderer makes of `markdown` (raw HTML passed through, as Gradio's sanitiser keeps
    an <img>)."""
    return MarkdownIt("commonmark").render(markdown)


@pytest.fixture
def app(monkeypatch, tmp_path, tiny_model_dir):
    """The app's handlers by name, and a visitor token."""
    from sft_space import jobs
    from sft_space.ui import build_app

    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path / "runs"))
    built = build_app(jobs.JobManager(), default_model=str(tiny_model_dir))
    handlers = {f.fn.__name__: f.fn for f in built.fns.values() if f.fn is not None}
    return handlers, handlers["on_load"]("")


def upload(handlers, token, path):
    """The upload handler's outputs for `path` (a file Gradio just received)."""
    return handlers["on_new_file"](str(path), token)


def check(handlers, token, handle, source, model, hub="", columns="", length=2048):
    """The check's last outputs."""
    *_, last = handlers["on_check"](token, handle, source, hub, str(model), columns, "", "train", length,
                                    progress=None)
    return last


def test_text_from_data_is_shown_as_text_wherever_markdown_renders_it(write_jsonl, embedded_tokenizer):
    """A column named like a Markdown image (or an HTML one) is reported by its name: the summary, a refusal and
    a Hub config name show those characters, and nothing the browser would fetch."""
    rows = [{**chat(n), IMAGE_COLUMN: "x", HTML_COLUMN: "y"} for n in range(3)]
    report = checks.check_data(DataSettings(source=str(write_jsonl(rows))), embedded_tokenizer)
    assert "ignored_column" in {w.code for w in report.warnings}
    html = rendered(data_tab.summary_markdown(report))
    assert "<img" not in html and "<a " not in html and TRACKER in html
    with pytest.warns(UserWarning) as toast:
        line = refused_markdown("check_data", f"the columns {IMAGE_COLUMN!r}, {HTML_COLUMN!r} are not a format")
    assert "<img" not in rendered(line) and "<a " not in rendered(line) and TRACKER in rendered(line)
    # The toast renders HTML: it gets the message as text too.
    assert "<img" not in str(toast[0].message) and "&lt;img" in str(toast[0].message)
    for name in (IMAGE_COLUMN, HTML_COLUMN, "$$x$$", "1. a list", "www.example.com"):
        assert rendered(markdown_text(name)) == f"<p>{name.replace('<', '&lt;').replace('>', '&gt;')}</p>\n"


def test_the_cores_messages_name_the_pages_boxes_never_a_flag(write_jsonl):
    """The data step's messages that name a setting say it in the page's words: by the box that holds it, or by
    the setting's own name where the page has none; the command line's flags are the command line's wording only."""
    from sft_space import data
    from sft_space.errors import DataSourceError

    with pytest.raises(DataSourceError) as unknown:
        data.load_data(str(write_jsonl([{"question": "q", "answer": "a"}], "odd.jsonl")))
    assert str(unknown.value).endswith("Map your columns, e.g. --columns prompt=question,response=answer.")
    assert data_tab.page_words(unknown.value.message).endswith(
        "Map your columns, e.g. “Column mapping”: prompt=question,response=answer.")
    long_chat = {"messages": chat(1)["messages"] * 2}
    rows = [{**chat(0), "extra": "x"}, long_chat, {"messages": [{"role": "user", "content": "x" * 2000}]}]
    loaded = data.load_data(str(write_jsonl(rows)), max_row_kb=1, max_messages=3)
    shown = {p.code: data_tab.page_words(p.message) for p in loaded.problems + loaded.warnings}
    assert {p.code: str(p.message) for p in loaded.problems + loaded.warnings} == {
        "ignored_column": "column 'extra' is not read in the OpenAI chat (messages) format and was ignored (1 "
                          "row(s), the first row 1); remove it, or map your columns (--columns) if it holds the data.",
        "too_many_messages": "row 2 has 4 messages, over the limit of 3 per row (max_messages, --max-messages); split "
                             "the conversation or raise the limit.",
        "row_too_large": "row 3 is 2 KB, over the limit of 1 KB per row (max_row_kb, --max-row-kb); split it or raise "
                         "the limit."}
    assert shown == {
        "ignored_column": "column 'extra' is not read in the OpenAI chat (messages) format and was ignored (1 "
                          "row(s), the first row 1); remove it, or map your columns (“Column mapping”) if it holds the data.",
        "too_many_messages": "row 2 has 4 messages, over the limit of 3 per row (max_messages); split the "
                             "conversation or raise the limit.",
        "row_too_large": "row 3 is 2 KB, over the limit of 1 KB per row (max_row_kb); split it or raise the limit."}
    with pytest.raises(DataSourceError) as too_many:
        data.load_data(str(write_jsonl([chat(n) for n in range(3)])), max_rows=2)
    assert "(the max_rows setting, --max-rows)" in str(too_many.value)
    assert "the limit (the max_rows setting); train on a sample" in data_tab.page_words(too_many.value.message)
    assert data_tab.page_words("No flags here, -- nor settings.") == "No flags here, -- nor settings."


def test_a_check_in_a_worker_process_comes_back_in_the_pages_words(write_jsonl, embedded_tokenizer):
    """The check of a visitor's data runs in a worker process (checks.check_data_in_worker): its refusals and its
    report's problems come back through a pipe still naming settings, which the page says by its boxes."""
    from sft_space import isolation
    from sft_space.errors import UserError

    def checked(path, **limits):
        return checks.check_data_in_worker(DataSettings(source=str(path), **limits), lambda: embedded_tokenizer,
                                           isolation.Limits.of())

    with pytest.raises(UserError) as refused:
        list(checked(write_jsonl([{"question": "q", "answer": "a"}], "odd.jsonl")))
    assert data_tab.page_words(refused.value.message).endswith("e.g. “Column mapping”: prompt=question,response=answer.")
    with pytest.warns(UserWarning, match="“Column mapping”"):
        assert "--" not in refused_markdown("check_data", refused.value)
    rows = [{**chat(0), "extra": "x"}, chat(1), {"messages": [{"role": "user", "content": "x" * 2000}]}]
    [report] = checked(write_jsonl(rows), max_row_kb=1)
    summary, problems = data_tab.summary_markdown(report), data_tab.problem_rows_table(report)
    assert "map your columns \\(“Column mapping”\\)" in summary  # Markdown-escaped, as the page shows text
    assert "(max_row_kb); split it" in problems["what to do"].iloc[0]
    assert "--" not in summary + "".join(problems["what to do"])


def test_a_refused_check_clears_the_report_and_says_why_where_it_stays(app, tmp_path, tiny_model_dir, write_jsonl):
    """After a good check, an empty file is refused: the report and the checked settings go (Start and the
    estimate cannot use the old ones, and the Train tab says there is no checked data), and the summary says the
    refusal in the page's words until the next action."""
    from sft_space.hardware import detect_hardware
    from sft_space.ui import train_tab

    handlers, token = app
    handle = upload(handlers, token, write_jsonl([chat(n) for n in range(3)], "good.jsonl"))[1]
    assert check(handlers, token, handle, data_tab.UPLOAD, tiny_model_dir)[REPORT].valid_rows == 3
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    handle = upload(handlers, token, empty)[1]
    with pytest.warns(UserWarning, match="contains no rows"):
        refused = check(handlers, token, handle, data_tab.UPLOAD, tiny_model_dir)
    assert refused[REPORT] is None and refused[SETTINGS] is None
    assert refused[SUMMARY].startswith("**Refused** · ") and "no rows" in refused[SUMMARY]
    assert list(refused[4].columns) == data_tab.TABLE_COLUMNS["problems"] and refused[4].empty
    assert "No checked data" in train_tab.estimate_markdown(detect_hardware(), None, refused[REPORT])
    with pytest.raises(Exception, match="no checked data"):
        train_tab.settings_from_form(refused[SETTINGS], False, str(tiny_model_dir), "quick", str(tmp_path), {})
    # A file of unknown columns: the refusal names the page's box, not the command line's flag.
    handle = upload(handlers, token, write_jsonl([{"question": "q", "answer": "a"}], "odd.jsonl"))[1]
    with pytest.warns(UserWarning):
        refused = check(handlers, token, handle, data_tab.UPLOAD, tiny_model_dir)
    assert "Column mapping" in refused[SUMMARY] and "--columns" not in refused[SUMMARY]


def test_the_data_chosen_last_is_the_data_checked(app, tiny_model_dir, write_jsonl):
    """The sample checked, then a file uploaded: the upload picks "Your file", the sample's report goes, and
    Check reads the file. Picking the sample again says the file is set aside; typing a Hub id picks the Hub."""
    handlers, token = app
    sample = check(handlers, token, None, data_tab.SAMPLE, tiny_model_dir)[REPORT]
    assert sample.rows == 160
    uploaded = upload(handlers, token, write_jsonl([chat(n) for n in range(3)], "mine.jsonl"))
    handle, source, *outputs = uploaded[1], uploaded[3], *uploaded[UPLOAD_OUTPUTS:]
    assert source == data_tab.UPLOAD and outputs[REPORT] is None and outputs[SETTINGS] is None
    assert "Your file **mine\\.jsonl** is chosen" in outputs[SUMMARY]
    report = check(handlers, token, handle, data_tab.UPLOAD, tiny_model_dir)[REPORT]
    assert report.rows == 3 and report.source.endswith("mine.jsonl")
    form = (data_tab.SAMPLE, "", "", "train", "", 2048)
    _, picked, *outputs = handlers["on_form_change"](token, handle, *form)
    assert picked == data_tab.SAMPLE and outputs[REPORT] is None
    assert "sample dataset** is chosen" in outputs[SUMMARY] and "mine\\.jsonl is set aside" in outputs[SUMMARY]
    _, picked, *outputs = handlers["on_hub_typed"](token, handle, data_tab.SAMPLE, "someone/chats", "", "train", "", 2048)
    assert picked == data_tab.HUB and "The Hub dataset **someone\\/chats** is chosen" in outputs[SUMMARY]


def test_the_data_tab_comes_back_for_the_signed_visitor_after_a_reload(app, tmp_path, tiny_model_dir, write_jsonl):
    """The upload, the form, Skip invalid rows and the report come back on the page's load, for the visitor whose
    signed id the page sends and no one else; the page sends only its token and model."""
    handlers, token = app
    restore = handlers["restore"]
    assert list(inspect.signature(restore).parameters) == ["token", "model_name", "progress"]
    rows = [chat(n) for n in range(4)] + ['{"messages": [{"role": "user", "content": "no reply"}]}']
    handle = upload(handlers, token, write_jsonl(rows, "mine.jsonl"))[1]
    handlers["on_skip"](token, True)
    handlers["on_form_change"](token, handle, data_tab.UPLOAD, "", "", "train", "", 512)
    checked = check(handlers, token, handle, data_tab.UPLOAD, tiny_model_dir, length=512)[REPORT]
    assert checked.invalid_rows == 1

    *_, restored = restore(token, str(tiny_model_dir), progress=None)
    form, report = restored[:RESTORED_FORM], restored[RESTORED_FORM + REPORT]
    assert form == (data_tab.UPLOAD, "", "", "train", "", 512, True, handle, "Kept on the server: **mine\\.jsonl**")
    assert report.rows == 5 and report.invalid_rows == 1 and report.max_length == 512
    assert restored[RESTORED_FORM + SETTINGS].source == handle

    # Another visitor gets an empty tab, a page without a valid token nothing at all.
    stranger = handlers["on_load"]("")
    *_, theirs = restore(stranger, str(tiny_model_dir), progress=None)
    assert theirs[7] is None and theirs[RESTORED_FORM + REPORT] is None
    (nothing,) = restore(token.replace("v1.", "v1.x"), str(tiny_model_dir), progress=None)
    assert all(isinstance(value, type(gr.skip())) for value in nothing)

    # An upload that is gone (swept, or over the visitor's quota) is not offered again.
    import pathlib

    pathlib.Path(handle).unlink()
    *_, restored = restore(token, str(tiny_model_dir), progress=None)
    assert restored[7] is None and restored[RESTORED_FORM + REPORT] is None
    assert "mine\\.jsonl is not kept on the server any more" in restored[RESTORED_FORM + SUMMARY]


def test_what_the_server_keeps_of_a_visitors_choices_is_bounded():
    choices = data_tab.DataChoices(capacity=2)
    for visitor in ("a", "b", "c"):
        choices.update(visitor, hub_id=visitor)
    assert choices.get("a") == data_tab.DataChoice() and choices.get("c").hub_id == "c"
    # A page can send anything: each value is bounded, and a source or length that is not one becomes the default.
    kept = data_tab.form_choice("somewhere", "x" * 10_000, None, None, json.dumps(["c"] * 1000), "lots")
    assert kept["source"] == data_tab.UPLOAD and len(kept["hub_id"]) == data_tab.KEPT_CHARACTERS
    assert kept["max_length"] == DataSettings.max_length and kept["hub_split"] == "train"
    assert data_tab.form_choice(data_tab.HUB, "", "", "", "", 4)["max_length"] == DataSettings.max_length


def test_empty_tables_have_their_headers_before_a_check(app, tmp_path, tiny_model_dir):
    from sft_space import jobs
    from sft_space.ui import build_app

    built = build_app(jobs.JobManager(), default_model=str(tiny_model_dir))
    tables = {block.elem_id: block for block in built.blocks.values()
              if isinstance(block, gr.Dataframe) and block.elem_id}
    for elem_id, name in (("problem-counts", "counts"), ("problem-rows", "problems"), ("data-statistics", "statistics")):
        assert tables[elem_id].value["headers"] == data_tab.TABLE_COLUMNS[name], elem_id
    assert len(tables["problem-rows"].column_widths) == 4 and tables["problem-rows"].wrap


def test_a_publish_refusal_stays_said_in_its_outcome_line(app):
    handlers, token = app
    with pytest.warns(UserWarning, match="no run"):
        download, outcome = handlers["on_zip"](None, "someone-elses-run", token)
    assert download["visible"] is False and outcome.startswith("**Refused** · ")


def test_checked_data_is_checked_again_when_another_model_is_picked(app, tiny_model_dir):
    """The preview and the token counts are the model's: picking another model checks the data again with it, so
    the tab never shows another model's view of the data; a model the page may not name clears the report."""
    handlers, token = app
    on_model_change = handlers["on_model_change"]
    (untouched,) = on_model_change(token, None, str(tiny_model_dir), progress=None)
    assert all(isinstance(value, type(gr.skip())) for value in untouched)  # nothing checked yet
    check(handlers, token, None, data_tab.SAMPLE, tiny_model_dir)
    *_, again = on_model_change(token, None, str(tiny_model_dir), progress=None)
    assert again[REPORT].rows == 160
    with pytest.warns(UserWarning, match="not a Hub model id"):
        *_, refused = on_model_change(token, None, "/etc", progress=None)
    assert refused[REPORT] is None and refused[SUMMARY].startswith("**Refused** · ")
    (untouched,) = on_model_change(token, None, str(tiny_model_dir), progress=None)
    assert all(isinstance(value, type(gr.skip())) for value in untouched)


def test_a_refused_upload_leaves_the_box_and_the_report_and_says_why(monkeypatch, tmp_path, tiny_model_dir,
                                                                      write_jsonl):
    """An upload over what the app keeps per visitor: the box is emptied, the earlier report and handle go (what
    the tab shows is what Check would read), and the summary says why."""
    from sft_space import jobs
    from sft_space.ui import build_app

    monkeypatch.setenv("SFT_SPACE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("SFT_SPACE_UPLOAD_MB_PER_VISITOR", "1")
    built = build_app(jobs.JobManager(), default_model=str(tiny_model_dir))
    handlers = {f.fn.__name__: f.fn for f in built.fns.values() if f.fn is not None}
    token = handlers["on_load"]("")
    with pytest.warns(UserWarning, match="MB this app keeps per visitor"):
        box, handle, _, source, note, *outputs = upload(handlers, token, write_jsonl([chat("x" * 2**20)]))
    assert box is None and handle is None and source == data_tab.UPLOAD and note == ""
    assert outputs[REPORT] is None and outputs[SUMMARY].startswith("**Refused** · ")
