"""The `dinotron` command line. Each subcommand lives with the code it drives and is added here.

What a command returns (a JSON line, a report) goes to stdout; messages go to stderr through the
`dinotron` logger (`dinotron.train.log`). A user error exits with status 2, a diverged run with 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import runpy
import sys
from importlib.metadata import version
from pathlib import Path

log = logging.getLogger(__name__)


def _load_run(args):
    """(Config, DinoV2 with weights) from --checkpoint or the latest checkpoint of --run."""
    import torch

    from dinotron.train import checkpoint as ckpt
    from dinotron.train.config import apply_overrides, from_dict
    from dinotron.train.model import DinoV2

    path = Path(args.checkpoint) if args.checkpoint else ckpt.latest_checkpoint(args.run)
    if path is None:
        raise SystemExit(f"dinotron: no checkpoint in {args.run}")
    cfg = from_dict(apply_overrides(ckpt.load_meta(path)["config"], getattr(args, "overrides", [])))
    model = DinoV2(cfg)
    if not getattr(args, "random_init", False):  # DCP gathers the shards of any number of ranks into this process
        ckpt.load_sharded(path, {"model": model.state_dict()})
    return cfg, model.to("cuda" if torch.cuda.is_available() else "cpu"), path


def _add_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint folder (checkpoint-<step>)")
    src.add_argument("--run", help="a training output_dir: its latest checkpoint is used")


def cmd_train(args) -> int:
    from dinotron.train.config import load_config
    from dinotron.train.loop import OutputDirInUse, Trainer, TrainingDiverged

    cfg = load_config(args.config, args.overrides)
    try:
        result = Trainer(cfg, resume=args.resume, overwrite=args.overwrite).fit()
    except OutputDirInUse as e:
        log.error(f"dinotron train: {e}")
        return 2
    except TrainingDiverged as e:
        log.error(f"dinotron train: {e}")
        return 1
    print(json.dumps({k: v for k, v in result.items() if k in ("step", "loss", "knn_top1", "knn_top5")}))
    return 0


def cmd_eval_knn(args) -> int:
    from dinotron.train.loop import evaluate_knn

    cfg, model, path = _load_run(args)
    ev = cfg.evaluation
    ev.knn_train_shards = args.train_shards or ev.knn_train_shards
    ev.knn_val_shards = args.val_shards or ev.knn_val_shards
    ev.k, ev.temperature = args.k, args.temperature
    if not ev.knn_train_shards or not ev.knn_val_shards:
        raise SystemExit("dinotron eval-knn: give --train-shards and --val-shards (or set evaluation.knn_*_shards)")
    result = evaluate_knn(model, cfg, next(model.parameters()).device)
    print(json.dumps({"checkpoint": str(path), "random_init": args.random_init, **result}))
    return 0


def cmd_export(args) -> int:
    from dinotron.train.export import export_backbone

    cfg, model, path = _load_run(args)
    out = export_backbone(model, cfg, args.out)
    log.info(f"exported the teacher backbone of {path} to {out} "
             f"(timm.create_model('local-dir:{out}', pretrained=True))")
    return 0


def cmd_bench(args) -> int:
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        script = root / "benchmarks" / f"bench_{args.name}.py"
        if script.is_file():
            sys.argv = [str(script), *args.args]
            sys.path.insert(0, str(script.parent))
            runpy.run_path(str(script), run_name="__main__")
            return 0
    raise SystemExit(f"dinotron bench: benchmarks/bench_{args.name}.py not found; run from a dinotron checkout")


def cmd_demo(args) -> int:
    from dinotron.train.demo import run_demo

    result = run_demo(args.config, args.out, args.overrides)
    gap = result["knn_top1_trained"] - result["knn_top1_random_init"]
    if gap < 10:
        log.error(f"[demo] the trained teacher beats random init by only {gap:.1f} k-NN points (expected >= 10)")
    print(json.dumps(result))
    return 0 if gap >= 10 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinotron", description="DINOv2 training, fast from the disk to the loss.")
    parser.add_argument("--version", action="version", version=f"dinotron {version('dinotron')}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="messages shown on stderr (default INFO)")
    parser.add_argument("--log-all-ranks", action="store_true", help="show every rank's messages, not rank 0's only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("make-shards",
                       help="ImageFolder tree or flat folder -> WebDataset shards + DALI index + manifest.json")
    p.add_argument("src", help="class sub-folders (labelled) or a flat folder of images (no labels)")
    p.add_argument("out", help="output folder")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--prefix", default="train", help="shard names: PREFIX-000000.tar, ...")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    p.set_defaults(func=cmd_make_shards)

    p = sub.add_parser("check-shards",
                       help="report bad samples of any WebDataset shards, write missing DALI index files")
    p.add_argument("pattern", nargs="+", help="shard paths or brace patterns, e.g. 'out/train-{000000..000099}.tar'")
    p.add_argument("--no-decode", action="store_true", help="check structure only, do not decode every image")
    p.set_defaults(func=cmd_check_shards)
    p = sub.add_parser("train", help="train DINOv2 from a YAML config with key=value overrides")
    p.add_argument("--config", help="YAML config (configs/*.yaml); defaults are dinov2's ViT-S/14 recipe")
    run = p.add_mutually_exclusive_group()  # without either, a train.output_dir holding checkpoints is refused
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.output_dir")
    run.add_argument("--overwrite", action="store_true",
                     help="delete the checkpoints, metrics.jsonl and tensorboard/ in train.output_dir, start afresh")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval-knn", help="weighted k-NN accuracy of a checkpoint's teacher on labelled shards")
    _add_source(p)
    p.add_argument("--train-shards", nargs="+", help="memory bank shards (default: evaluation.knn_train_shards)")
    p.add_argument("--val-shards", nargs="+", help="query shards (default: evaluation.knn_val_shards)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--random-init", action="store_true", help="the same architecture with random weights (baseline)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_eval_knn)

    p = sub.add_parser("export", help="teacher backbone -> safetensors + timm config.json")
    _add_source(p)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="generate textures, shard, train a small ViT on CPU, compare k-NN with random init")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--out", default="runs/demo", help="output folder (replaced)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="run benchmarks/bench_NAME.py from a checkout")
    p.add_argument("name", help="losses, koleo, attention or pipeline")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.set_defaults(func=cmd_bench)
    return parser


def cmd_make_shards(args) -> int:
    from dinotron.pipeline import write_shards

    try:
        m = write_shards(args.src, args.out, shard_size=args.shard_size, prefix=args.prefix, workers=args.workers)
    except (OSError, ValueError) as e:
        log.error(f"dinotron make-shards: {e}")
        return 2
    print(f"wrote {m['num_samples']} samples in {len(m['shards'])} shards: {Path(args.out) / m['pattern']}"
          f" ({len(m['classes'] or [])} classes); skipped {len(m['skipped'])} undecodable files")
    for s in m["skipped"]:
        log.warning(f"skipped {s['path']}: {s['reason']}")
    return 0


def cmd_check_shards(args) -> int:
    from dinotron.pipeline import check_shards

    try:
        r = check_shards(args.pattern, decode=not args.no_decode)
    except (OSError, ValueError) as e:
        log.error(f"dinotron check-shards: {e}")
        return 2
    for bad in r["bad"]:
        where = f"{bad['shard']}" + (f" sample {bad['key']!r}" if bad["key"] else "")
        print(f"BAD {where}: {bad['problem']}")
    for path in r["indexes_written"]:
        log.info(f"wrote index {path}")
    print(f"{r['shards']} shards, {r['samples']} samples ({'labelled' if r['labelled'] else 'unlabelled'}), "
          f"{len(r['bad'])} bad")
    return 1 if r["bad"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    from dinotron.train.config import ConfigError
    from dinotron.train.log import setup_logging

    setup_logging(level=args.log_level, all_ranks=args.log_all_ranks)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        log.error(f"dinotron {args.command}: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
