"""UI helpers that need no browser."""


def test_loss_curve_names_the_validation_series_before_its_first_point(tmp_path):
    from sft_space import runs
    from sft_space.ui.train_tab import loss_curve

    folder = runs.RunFolder.create(tmp_path, "r")
    folder.write({"data": {"validation_examples": 3}})
    folder.append_metrics({"step": 1, "loss": 2.0})
    curve = loss_curve(folder.path)
    assert set(curve["split"]) == {"train", "validation"} and curve["loss"].isna().sum() == 1
    folder.append_metrics({"step": 1, "eval_loss": 2.5})
    assert not loss_curve(folder.path)["loss"].isna().any()


def test_earlier_chat_turns_reach_the_model_as_their_text():
    """Gradio's Chatbot hands earlier turns back as lists of parts; the model must see the words, not a repr."""
    import gradio as gr

    from sft_space.ui.chat_tab import _as_messages

    chatbot = gr.Chatbot()
    history = chatbot.preprocess(chatbot.postprocess([{"role": "user", "content": "Hi there"},
                                                      {"role": "assistant", "content": "Ahoy!"}]))
    assert _as_messages(history) == [{"role": "user", "content": "Hi there"},
                                     {"role": "assistant", "content": "Ahoy!"}]
