"""python -m radio_core.data pack FOLDER OUT [--shard-size 1000] | index SHARDS"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..utils import real_path


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m radio_core.data") -> int:
    """python -m radio_core.data pack FOLDER OUT [--shard-size 1000] | index SHARDS"""
    import sys

    from . import shards

    from ..utils import OneLineParser

    p = OneLineParser(prog=prog, description="Data tools.")
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="pack an image folder into webdataset tar shards plus their index")
    pk.add_argument("folder")
    pk.add_argument("out", help="output folder (must not hold shards yet)")
    pk.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    pk.add_argument("--shard-bytes", type=float, default=3e9, help="start a new shard past this many bytes")
    pk.add_argument("--shuffle-seed", type=int, default=0, help="seed of the file order shuffle (default 0)")
    pk.add_argument("--no-shuffle", action="store_true", help="keep the sorted file order")
    ix = sub.add_parser("index", help="write per-shard index files, shard_table.npz and manifest.json for existing "
                        "shards (made by other tools)")
    ix.add_argument("shards", help="directory or brace pattern, e.g. '/data/{000000..000099}.tar'")
    args = p.parse_args(argv)
    try:
        if args.command == "pack":
            m = shards.pack_folder(args.folder, args.out, args.shard_size, args.shard_bytes,
                                   None if args.no_shuffle else args.shuffle_seed)
            where = Path(args.out) / shards.MANIFEST
            rate = m["count"] / max(m["seconds"], 1e-9)
            print(f"packed {m['count']} images from {m['source']} into {len(m['shards'])} shard(s), "
                  f"{m['bytes'] / 1e6:.1f} MB ({m['image_bytes'] / 1e6:.1f} MB of images) in {m['seconds']:.1f} s "
                  f"({rate:.0f} images/s); manifest: {where}")
            if m["unreadable"]:
                print(f"skipped {len(m['unreadable'])} unreadable file(s), e.g. {m['unreadable'][0]}")
            if m["skipped_links"]:
                print(f"skipped {len(m['skipped_links'])} symlink(s) leading out of {args.folder} (never followed), "
                      f"e.g. {m['skipped_links'][0]}")
            print(f"use it with: data.source.name=webdataset data.source.args.shards={real_path(args.out)}")
        else:
            m = shards.index_shards(args.shards)
            print(f"indexed {m['count']} images in {len(m['shards'])} shard(s), {m['bytes'] / 1e6:.1f} MB")
    except (OSError, ValueError) as exc:  # missing folder, existing shards, unreadable tar
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
