"""radio_proxy: a proxy benchmark small enough for a CPU.

A procedurally generated world (``world``), specialist teachers trained on it from scratch
through the real CLIP / DINOv2 / SAM library code (``teachers``), and a frozen-feature
downstream evaluation of students and teachers (``downstream``). Installed from the folder
``proxy/`` by the radio-distill distribution; registers its components through the
``radio_core`` entry-point group (``radio_proxy.plugin``) like any third-party package.
"""
