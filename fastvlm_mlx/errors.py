import sys
from contextlib import contextmanager
from typing import Iterator

import typer


class FastVLMError(Exception):
    """An error the user can fix; the CLI prints it as one line and exits 2."""


@contextmanager
def exit_codes() -> Iterator[None]:
    """For a CLI command: a FastVLMError is one `error:` line and exit 2, Ctrl-C exit 130."""
    try:
        yield
    except FastVLMError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise typer.Exit(130)
