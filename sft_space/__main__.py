from .quiet import quiet_known_messages

quiet_known_messages()  # before the libraries load: bitsandbytes logs while it is imported

from .cli import main  # noqa: E402

raise SystemExit(main())
