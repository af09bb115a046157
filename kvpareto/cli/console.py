"""The two consoles every command prints to: tables and text on `out` (stdout); progress, status
and errors on `err`, so that `--json` output on stdout stays machine-readable."""

from __future__ import annotations

import sys

from rich.console import Console

# Rich assumes 80 columns when output is not a terminal; tables read better a little wider.
out = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True)
