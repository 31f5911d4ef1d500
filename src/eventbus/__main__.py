"""``python -m eventbus``: the same as the ``eventbus`` console script."""

from eventbus.cli import main

raise SystemExit(main())
