"""How every command's console is made: the one place rich is told how wide to print.

On a terminal rich fits what it prints to the terminal's width. Into a file or a pipe (a CI log,
`| tee`) it would wrap at 80 columns, splitting a printed command or path in two; there nothing
is wrapped, so a command prints on one line to copy, and a table takes the width it needs.
"""
from __future__ import annotations

from rich.console import Console

# the width a table may take when not on a terminal: wider than any line the commands print
UNWRAPPED_WIDTH = 1000


def make_console(stderr: bool = True) -> Console:
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console.soft_wrap = True
        console.width = UNWRAPPED_WIDTH
    return console
