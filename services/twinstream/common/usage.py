"""``python -m twinstream.<service> --help``: a service takes no arguments (its settings are
``TWINSTREAM_*`` environment variables), so the parser only prints that and exits, before any
setting is read, client built or port bound."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def parse_service_args(service: str, doc: str | None, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``): ``--help`` prints usage, any argument is an error."""
    parser = argparse.ArgumentParser(
        prog=f"python -m twinstream.{service}", description=(doc or "").strip(),
        epilog="Configured by TWINSTREAM_* environment variables only (docs/deploy.md lists them).")
    return parser.parse_args(argv)
