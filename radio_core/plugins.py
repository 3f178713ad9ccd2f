"""List every registered component:  python -m radio_core.plugins [--kind teacher]"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .protocols import KINDS
from .registry import get_registry


def format_table(kind: Optional[str] = None, verbose: bool = False) -> str:
    reg = get_registry()
    ambiguous = {(k, n) for k, n, _ in reg.conflicts}
    rows = [(c.kind, c.name if (c.kind, c.name) not in ambiguous else f"{c.distribution}:{c.name}",
             f"{c.distribution} ({c.plugin})", ("CONFLICT: " if (c.kind, c.name) in ambiguous else "") + c.doc)
            for c in reg.components(kind)]
    head = ("kind", "name", "provided by (entry point)", "description")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  " + head[3]]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[3] for r in rows]
    for k, n, _ in reg.conflicts:
        if kind in (None, k):
            lines.append(f"CONFLICT: {reg.conflict_message(k, n)}")
    for f in reg.failures:
        lines.append(f"FAILED to load plugin {f.entry_point!r} from {f.distribution}: {f.error}")
        if verbose:
            lines.append(f.traceback)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="radio_core.plugins", description="List registered radio-distill plugins.")
    p.add_argument("--kind", choices=KINDS)
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of plugins that failed to load")
    args = p.parse_args(argv)
    print(format_table(args.kind, args.verbose))
    reg = get_registry()
    return 1 if reg.failures or reg.conflicts else 0


if __name__ == "__main__":
    sys.exit(main())
