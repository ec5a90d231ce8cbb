"""``python -m triggers.cli``: the same as the ``comfys3`` command."""

from triggers.cli.main import main

raise SystemExit(main())
