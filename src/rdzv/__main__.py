"""``python -m rdzv``: the same as the ``rdzv`` command."""

from rdzv.cli import main

raise SystemExit(main())
