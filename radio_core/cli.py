"""The ``radio`` console script: ``radio train|validate|sweep|plugins ...``."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

USAGE = """usage: radio COMMAND [ARGS]

commands:
  train RECIPE [overrides] [--resume | --overwrite]
                                        train a student (same as python -m radio_core.run)
  validate RECIPE [overrides]           check a recipe and its plugin names
  sweep SWEEP.yaml [--only NAME] [--dry-run] [--status]
                                        run an ablation sweep (same as python -m radio_core.sweep),
                                        here or as SLURM / Ray jobs; --status: state of every run
  plugins [--kind KIND]                 list registered teachers, students, adaptors, losses, datasets
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from .run import main as run_main

        return run_main(rest)
    if cmd == "validate":
        from .run import main as run_main

        return run_main(rest + ["--validate"])
    if cmd == "sweep":
        from .sweep import main as sweep_main

        return sweep_main(rest)
    if cmd == "plugins":
        from .plugins import main as plugins_main

        return plugins_main(rest)
    print(f"radio: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
