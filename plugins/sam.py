"""Placeholder: filled in by the sam plugin work."""
from radio_core import hookimpl


@hookimpl
def radio_register(registry) -> None:
    pass
