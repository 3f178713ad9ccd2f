"""List every registered component:  radio plugins [--kind teacher] [--verbose] [NAME ...]

``--verbose`` adds each factory's arguments (name, type, default, one-line help; see
``radio_core.arguments``) and the tracebacks of plugins that failed to load.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from .arguments import format_arguments
from .protocols import KINDS
from .registry import get_registry
from .utils import OneLineParser


def format_table(kind: Optional[str] = None, verbose: bool = False, names: Sequence[str] = ()) -> str:
    reg = get_registry()
    ambiguous = {(k, n) for k, n, _ in reg.conflicts}
    comps = [c for c in reg.components(kind) if not names or c.name in names]
    rows = [(c.kind, c.name if (c.kind, c.name) not in ambiguous else f"{c.distribution}:{c.name}",
             f"{c.distribution} ({c.plugin})", ("CONFLICT: " if (c.kind, c.name) in ambiguous else "") + c.doc)
            for c in comps]
    head = ("kind", "name", "provided by (entry point)", "description")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  " + head[3]]
    for comp, r in zip(comps, rows):
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[3])
        if verbose:
            lines += format_arguments(comp.kind, comp.factory) + [""]
    for k, n, _ in reg.conflicts:
        if kind in (None, k):
            lines.append(f"CONFLICT: {reg.conflict_message(k, n)}")
    for w in reg.warnings:
        lines.append(f"WARNING: {w}")
    for f in reg.failures:
        lines.append(f"FAILED to load plugin {f.entry_point!r} from {f.distribution}: {f.error}")
        if verbose:
            lines.append(f.traceback)
    return "\n".join(lines).rstrip()


def main(argv: Optional[Sequence[str]] = None, prog: str = "radio plugins") -> int:
    p = OneLineParser(prog=prog, description="List registered radio-distill plugins (teachers, students, "
                                "adaptors, losses, datasets) and, with --verbose, their arguments.")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these components (e.g. dinov2)")
    p.add_argument("--kind", choices=KINDS, help="only this kind of component")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show each factory's arguments (type, default, help) and tracebacks of plugins that failed")
    args = p.parse_args(argv)
    reg = get_registry()
    unknown = [n for n in args.names if not any(c.name == n for c in reg.components(args.kind))]
    if unknown:
        print(f"error: no registered {args.kind or 'component'} named {', '.join(map(repr, unknown))}", file=sys.stderr)
        return 2
    print(format_table(args.kind, args.verbose, args.names))
    return 1 if reg.failures or reg.conflicts or reg.warnings else 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m radio_core.plugins"))
