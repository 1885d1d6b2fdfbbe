"""``python -m twinstream.learn ...``: see twinstream.learn.cli."""

from twinstream.learn.cli import main

raise SystemExit(main())
