"""SFT Space: the Space's entry point (`python app.py`)."""

from sft_space import quiet, storage


def prepare() -> None:
    """What must come before the libraries load: their known harmless messages filtered, and on a Space with
    persistent storage, the runs and caches kept there (huggingface_hub reads HF_HOME when it is imported)."""
    quiet.quiet_known_messages()
    storage.use_persistent_storage()


def main() -> None:
    prepare()
    from sft_space.ui import build_app, launch

    launch(build_app())


if __name__ == "__main__":
    main()
