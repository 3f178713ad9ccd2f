"""Planning a run before anything is built: stages, teacher groups and rank assignment
(``partition``), pre-build recipe checks (``checks``), and the meta-device dry run (``planner``)."""
