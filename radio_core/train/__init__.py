"""Training: ``loop`` (the Trainer: fit and one step) built from small parts: ``setup``
(accelerator, optimiser, cache), ``stages`` (slots and loaders), ``objective`` (targets and
losses), ``checkpoint``, ``metrics``, ``signals``, ``schedule``."""
