"""Files a run writes or reads: the export directory (``export``), the user-facing
``RadioModel`` (``radio_model``), official RADIO checkpoints (``radio_checkpoint``), and the
layout of a run's checkpoint folder (``checkpoints``); transformers' native RADIO format
(``hf_transformers``), model cards (``model_card``) and ``radio export`` (``convert``)."""
