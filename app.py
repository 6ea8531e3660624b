"""SFT Space: the Space's entry point (`python app.py`)."""

from sft_space import startup, storage


def prepare() -> None:
    """What must come before the libraries load: their known harmless messages filtered and the garbage collector
    set for loading them (startup.py), and on a Space with persistent storage, the runs and caches kept there
    (huggingface_hub reads HF_HOME when it is imported)."""
    startup.begin()
    storage.use_persistent_storage()


def main() -> None:
    prepare()
    from sft_space.ui import build_app, launch

    app = build_app()
    startup.serving()
    launch(app)


if __name__ == "__main__":
    main()
