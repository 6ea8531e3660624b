from . import startup

startup.begin()  # before the libraries load

from .cli import main  # noqa: E402

raise SystemExit(startup.end(main()))
