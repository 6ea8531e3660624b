"""SFT Space: the Space's entry point (`python app.py`)."""

from sft_space.ui import build_app, launch

if __name__ == "__main__":
    launch(build_app())
