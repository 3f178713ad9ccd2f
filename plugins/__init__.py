"""Built-in plugins of radio-distill (installed as the package ``radio_plugins``).

Each module registers itself through the ``radio_core`` entry-point group, exactly as a
third-party package would, and imports its model library only when a component is built.
"""
