"""The `dinotron` command line. Each subcommand lives with the code it drives and is added here."""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinotron", description="DINOv2 training, fast from the disk to the loss.")
    parser.add_argument("--version", action="version", version=f"dinotron {version('dinotron')}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("make-shards", help="ImageFolder tree or flat folder -> WebDataset shards + DALI index + manifest.json")
    p.add_argument("src", help="class sub-folders (labelled) or a flat folder of images (no labels)")
    p.add_argument("out", help="output folder")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--prefix", default="train", help="shard names: PREFIX-000000.tar, ...")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    p.set_defaults(func=cmd_make_shards)

    p = sub.add_parser("check-shards", help="report bad samples of any WebDataset shards, write missing DALI index files")
    p.add_argument("pattern", nargs="+", help="shard paths or brace patterns, e.g. 'out/train-{000000..000099}.tar'")
    p.add_argument("--no-decode", action="store_true", help="check structure only, do not decode every image")
    p.set_defaults(func=cmd_check_shards)
    return parser


def cmd_make_shards(args) -> int:
    from dinotron.pipeline import write_shards

    try:
        m = write_shards(args.src, args.out, shard_size=args.shard_size, prefix=args.prefix, workers=args.workers)
    except (OSError, ValueError) as e:
        print(f"dinotron make-shards: {e}", file=sys.stderr)
        return 2
    print(f"wrote {m['num_samples']} samples in {len(m['shards'])} shards: {Path(args.out) / m['pattern']}"
          f" ({len(m['classes'] or [])} classes); skipped {len(m['skipped'])} undecodable files")
    for s in m["skipped"]:
        print(f"  skipped {s['path']}: {s['reason']}")
    return 0


def cmd_check_shards(args) -> int:
    from dinotron.pipeline import check_shards

    try:
        r = check_shards(args.pattern, decode=not args.no_decode)
    except (OSError, ValueError) as e:
        print(f"dinotron check-shards: {e}", file=sys.stderr)
        return 2
    for bad in r["bad"]:
        where = f"{bad['shard']}" + (f" sample {bad['key']!r}" if bad["key"] else "")
        print(f"BAD {where}: {bad['problem']}")
    for path in r["indexes_written"]:
        print(f"wrote index {path}")
    print(f"{r['shards']} shards, {r['samples']} samples ({'labelled' if r['labelled'] else 'unlabelled'}), "
          f"{len(r['bad'])} bad")
    return 1 if r["bad"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
