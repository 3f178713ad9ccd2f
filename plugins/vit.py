"""Placeholder: filled in by the vit plugin work."""
from radio_core import hookimpl


@hookimpl
def radio_register(registry) -> None:
    pass
