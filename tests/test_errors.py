"""Messages that name settings: the command line's wording as a string, another skin's words on asking, and the
mentions kept through pickling (a worker process sends its refusals through a pipe)."""

import json
import pickle

import pytest

from sft_space.errors import DataSourceError, Message, Setting, UserError, said

LIMIT = Message("over the limit (max_rows", Setting("max_rows", after_its_name=True), "); map your columns (",
                Setting("columns"), "), e.g. ", Setting("columns", "prompt=question"), ".")


def boxes(setting):
    """A page's namer: its one box, with the value the message shows in it."""
    if setting.name != "columns":
        return None
    return f"“Column mapping”: {setting.value}" if setting.value else "“Column mapping”"


def test_a_message_is_the_command_lines_wording_and_says_settings_in_other_words():
    cli = "over the limit (max_rows, --max-rows); map your columns (--columns), e.g. --columns prompt=question."
    assert LIMIT == cli and str(LIMIT) == cli and f"{LIMIT}" == cli and json.dumps(LIMIT) == json.dumps(cli)
    # A setting the skin has a name for goes by it; one it has none for by its own name (beside the name already
    # said, nothing).
    assert LIMIT.said(boxes) == ("over the limit (max_rows); map your columns (“Column mapping”), e.g. "
                                 "“Column mapping”: prompt=question.")
    assert LIMIT.said(lambda setting: None) == ("over the limit (max_rows); map your columns (columns), e.g. columns "
                                                "prompt=question.")
    beside = Message("(max_rows", Setting("max_rows", after_its_name=True), ")")
    assert beside.said(lambda setting: "“Rows”") == "(max_rows, “Rows”)"
    assert said("plain --words", boxes) == "plain --words"


def test_a_message_and_an_error_raised_with_it_keep_their_mentions_through_pickling():
    assert pickle.loads(pickle.dumps(LIMIT)).parts == LIMIT.parts
    error = pickle.loads(pickle.dumps(DataSourceError(LIMIT)))
    assert type(error) is DataSourceError and str(error) == LIMIT
    assert error.message.said(boxes) == LIMIT.said(boxes)
    assert UserError("plain").message == "plain" and UserError("a", "b").message == str(UserError("a", "b"))


def test_a_message_quoting_another_keeps_its_mentions():
    """InvalidRows quotes a row's problem in its own message: the page still names the problem's settings by its
    boxes, never by flags."""
    from sft_space.training_data import InvalidRows
    from sft_space.ui.common import page_words, refused_markdown

    quoted = Message("Row 3: ", LIMIT, " Then go on.")
    assert str(quoted) == f"Row 3: {LIMIT} Then go on." and quoted.said(boxes).startswith("Row 3: over the limit")
    refusal = InvalidRows(LIMIT, valid_rows=9)
    assert "--columns" in str(refusal)
    shown = page_words(refusal.message)
    assert "--" not in shown and "“Column mapping”" in shown and shown.endswith("train on the 9 valid ones.")
    with pytest.warns(UserWarning):
        assert "--" not in refused_markdown("on_start", refusal)


def test_the_train_tabs_refusals_say_settings_in_the_pages_words_and_quote_as_text():
    from sft_space.ui import train_tab

    with pytest.warns(UserWarning) as toast:
        said_there = train_tab.refusal("on_start", UserError(Message("<b>model</b>: map your columns (",
                                                                     Setting("columns"), ")")))
    assert said_there == "<b>model</b>: map your columns (“Column mapping”)"
    assert str(toast[0].message) == "&lt;b&gt;model&lt;/b&gt;: map your columns (“Column mapping”)"


def test_a_flag_is_the_settings_name_on_the_command_line():
    from sft_space.errors import flag
    from sft_space.settings import RunSettings, to_command_line

    assert flag("max_rows") == "--max-rows" and flag("packing", "--no-") == "--no-packing"
    assert Setting("skip_invalid_rows").flag == "--skip-invalid-rows"
    assert to_command_line(RunSettings(max_steps=9, packing=False)) == ["--max-steps", "9", "--no-packing"]
