"""The `dinotron` command line. Each subcommand lives with the code it drives and is added here.

What a command returns (a JSON line, a report) goes to stdout; messages go to stderr through the
`dinotron` logger (`dinotron.train.log`). Exit status: 0 done (a run stopped by SIGTERM / SIGINT too, after
saving a checkpoint and logging the command that resumes it); 1 a diverged run, bad samples found by check-shards,
a demo that learnt too little; 2 a user error (`dinotron.train.errors.USER_ERRORS`: one line on stderr naming the
problem, no traceback; `--log-level DEBUG` adds it). Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import runpy
import shlex
import sys
from contextlib import contextmanager
from importlib import resources
from importlib.metadata import version
from pathlib import Path

from dinotron import configs

log = logging.getLogger("dinotron.train.cli")  # not __name__, which is "__main__" under python -m


DEMO_MIN_GAIN = 10.0  # k-NN top-1 points the demo's training must gain over random init


def _resume_command(args) -> str:
    """The command line that was run, with --resume (and without --overwrite): what continues a stopped run."""
    argv = [a for a in args.argv if a != "--overwrite"]
    if "--resume" not in argv:
        at = argv.index(args.command) + 1 if args.command in argv else len(argv)
        argv.insert(at, "--resume")
    return shlex.join(["dinotron", *argv])


def _run_config(args):
    """(Config, checkpoint path) of --checkpoint or of the latest checkpoint in --run, with key=value overrides."""
    from dinotron.train import checkpoint as ckpt
    from dinotron.train.config import apply_overrides, from_dict
    from dinotron.train.errors import CheckpointNotFound

    if args.checkpoint:
        path = Path(args.checkpoint)
    else:
        if not Path(args.run).is_dir():
            raise CheckpointNotFound(f"--run {args.run}: no such folder")
        path = ckpt.latest_checkpoint(args.run)
        if path is None:
            raise CheckpointNotFound(f"--run {args.run}: no complete checkpoint (checkpoint-<step>/, meta.pt) in it")
    return from_dict(apply_overrides(ckpt.load_meta(path)["config"], getattr(args, "overrides", []))), path


def _load_model(cfg, path: Path, random_init: bool = False):
    """DinoV2 of `cfg` with the weights of checkpoint `path` (none with random_init), on the GPU where there is one."""
    import torch

    from dinotron.train import checkpoint as ckpt
    from dinotron.train.model import DinoV2

    model = DinoV2(cfg)
    if not random_init:  # DCP gathers the shards of any number of ranks into this process
        ckpt.load_sharded(path, {"model": model.state_dict()})
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def _add_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint folder (checkpoint-<step>)")
    src.add_argument("--run", help="a training output_dir: its latest checkpoint is used")


@contextmanager
def _config_file(args):
    """The path of --config, else of --preset's shipped YAML (a real file, importlib.resources.as_file), else None."""
    if args.config is not None or args.preset is None:
        yield args.config
        return
    from dinotron.train.errors import UserError

    try:
        preset = configs.preset_file(args.preset)
    except ValueError as e:
        raise UserError(f"--preset: {e}") from e
    with resources.as_file(preset) as path:
        yield path


def _add_config_source(p: argparse.ArgumentParser, preset: str | None, what: str) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help=f"a YAML config file; default: {what}")
    src.add_argument("--preset", default=preset, metavar="NAME",
                     help="a config shipped with dinotron, by name (`dinotron presets` lists them)")


def cmd_train(args) -> int:
    from dinotron.train.config import load_config
    from dinotron.train.errors import UserError
    from dinotron.train.loop import Trainer, TrainingDiverged

    if args.allow_config_change and not args.resume:
        raise UserError("--allow-config-change applies to --resume only")
    with _config_file(args) as path:
        cfg = load_config(path, args.overrides)
    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite, allow_config_change=args.allow_config_change)
    try:
        result = trainer.fit()
    except TrainingDiverged as e:
        log.error(f"dinotron train: {e}")
        return 1
    if trainer.step < trainer.end_step:  # stopped by a signal, checkpoint saved
        log.info(f"resume with: {_resume_command(args)}")
    print(json.dumps({k: v for k, v in result.items() if k in ("step", "loss", "knn_top1", "knn_top5")}))
    return 0


def _evaluate(args, evaluate) -> int:
    """eval-knn / eval-linear: the checkpoint's config with the labelled shards of the command line, checked before
    the model is loaded; prints evaluate(model, cfg, device) as one JSON line."""
    from dinotron.train.errors import DataError
    from dinotron.train.loop import check_data_device, check_knn_shards

    cfg, path = _run_config(args)
    ev = cfg.evaluation
    ev.knn_train_shards = args.train_shards or ev.knn_train_shards
    ev.knn_val_shards = args.val_shards or ev.knn_val_shards
    if not ev.knn_train_shards or not ev.knn_val_shards:
        raise DataError("give --train-shards and --val-shards (or set evaluation.knn_*_shards)")
    check_data_device(cfg)  # the checkpoint's data.device; data.device=cpu overrides it
    check_knn_shards("--train-shards", ev.knn_train_shards)
    check_knn_shards("--val-shards", ev.knn_val_shards)
    model = _load_model(cfg, path, args.random_init)
    result = evaluate(model, cfg, next(model.parameters()).device)
    print(json.dumps({"checkpoint": str(path), "random_init": args.random_init, **result}))
    return 0


def cmd_eval_knn(args) -> int:
    from dinotron.train.loop import evaluate_knn

    args.overrides += [f"evaluation.k={args.k}", f"evaluation.temperature={args.temperature}"]
    return _evaluate(args, evaluate_knn)


def cmd_eval_linear(args) -> int:
    from dinotron.train.linear import evaluate_linear

    return _evaluate(args, evaluate_linear)


def cmd_export(args) -> int:
    from dinotron.train.export import export_backbone

    cfg, path = _run_config(args)
    out = export_backbone(_load_model(cfg, path), cfg, args.out)
    log.info(f"exported the teacher backbone of {path} to {out} "
             f"(timm.create_model('local-dir:{out}', pretrained=True))")
    return 0


def cmd_bench(args) -> int:
    """Runs benchmarks/bench_NAME.py of the checkout in the working folder, or of the editable install's. The
    benchmarks are not in the wheel: they are scripts that import their folder's common.py (bench_step.py also the
    tests' helpers.py) and write their results into the checkout's benchmarks/results/."""
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        script = root / "benchmarks" / f"bench_{args.name}.py"
        if script.is_file():
            sys.argv = [str(script), *args.args]
            sys.path.insert(0, str(script.parent))
            runpy.run_path(str(script), run_name="__main__")
            return 0
    from dinotron.train.errors import UserError

    raise UserError(f"benchmarks/bench_{args.name}.py not found: the benchmarks are scripts in a dinotron checkout, "
                    "not in the installed package; run this from a clone (pip install -e '.[bench]')")


def cmd_presets(args) -> int:
    if args.show is not None:
        from dinotron.train.errors import UserError

        try:
            print(configs.preset_file(args.show).read_text(), end="")
        except ValueError as e:
            raise UserError(f"--show: {e}") from e
        return 0
    found = configs.presets()
    width = max(map(len, found))
    for name, file in found.items():
        print(f"{name:<{width}}  {configs.summary(file.read_text())}")
    return 0


def cmd_demo(args) -> int:
    from dinotron.train.demo import run_demo

    with _config_file(args) as path:
        result = run_demo(path, args.out, args.overrides, resume=args.resume)
    if result.get("interrupted"):
        log.info(f"[demo] stopped after step {result['steps']} of {result['of_steps']}, checkpoint saved; "
                 f"resume with: {_resume_command(args)}")
        print(json.dumps({**result, "resume": _resume_command(args)}))
        return 0
    gap = result["knn_top1_trained"] - result["knn_top1_random_init"]
    if gap < DEMO_MIN_GAIN:
        log.error(f"[demo] the trained teacher beats random init by only {gap:.1f} k-NN points "
                  f"(expected >= {DEMO_MIN_GAIN:g})")
    print(json.dumps(result))
    return 0 if gap >= DEMO_MIN_GAIN else 1


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
    p.add_argument("--classes", default=None, metavar="PATH",
                   help="class map (classes.json of another split: val gets train's ids); default: the sorted folders")
    p.set_defaults(func=cmd_make_shards)

    p = sub.add_parser("check-shards",
                       help="report bad samples of any WebDataset shards, write missing DALI index files")
    p.add_argument("pattern", nargs="+", help="shard paths or brace patterns, e.g. 'out/train-{000000..000099}.tar'")
    p.add_argument("--no-decode", action="store_true", help="check structure only, do not decode every image")
    p.add_argument("--max-image-pixels", type=int, default=None,
                   help="images over this many pixels are bad (default: data.max_image_pixels' default, PIL's limit)")
    p.set_defaults(func=cmd_check_shards)
    p = sub.add_parser("train", help="train DINOv2 from a YAML config or a preset, with key=value overrides")
    _add_config_source(p, None, "dinov2's ViT-S/14 recipe (the config's defaults)")
    run = p.add_mutually_exclusive_group()  # without either, a train.output_dir holding checkpoints is refused
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.output_dir")
    run.add_argument("--overwrite", action="store_true",
                     help="delete the checkpoints, metrics.jsonl and tensorboard/ in train.output_dir, start afresh")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue even where the config changes training keys of the checkpoint's "
                        "(optim.*, teacher.*, loss weights, global batch, ...); the changes are logged")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_train)

    for name, func, help_ in (
        ("eval-knn", cmd_eval_knn, "weighted k-NN accuracy of a checkpoint's evaluated model on labelled shards"),
        ("eval-linear", cmd_eval_linear, "linear-probe top-1/top-5 (dinov2's eval/linear.py sweep) of a checkpoint's "
                                         "evaluated model on labelled shards; evaluation.linear_* set the sweep"),
    ):
        p = sub.add_parser(name, help=help_)
        _add_source(p)
        p.add_argument("--train-shards", nargs="+", help="labelled train shards (default: evaluation.knn_train_shards)")
        p.add_argument("--val-shards", nargs="+", help="labelled val shards (default: evaluation.knn_val_shards)")
        if name == "eval-knn":
            p.add_argument("--k", type=int, default=20)
            p.add_argument("--temperature", type=float, default=0.07)
        p.add_argument("--random-init", action="store_true", help="the same architecture with random weights")
        p.add_argument("overrides", nargs="*", metavar="key=value")
        p.set_defaults(func=func)

    p = sub.add_parser("export", help="teacher backbone -> safetensors + timm config.json")
    _add_source(p)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="generate textures, shard, train a small ViT on CPU, compare k-NN with random init")
    _add_config_source(p, "demo", "--preset demo")
    p.add_argument("--out", default="runs/demo", help="output folder (replaced, unless --resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue the demo in --out stopped by SIGTERM / SIGINT (from scratch if it has no checkpoint)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="run benchmarks/bench_NAME.py (needs a checkout: not in the installed package)")
    p.add_argument("name", help="NAME of benchmarks/bench_NAME.py: losses, koleo, attention, pipeline, ...")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("presets", help="list the configs shipped with dinotron (train/demo --preset NAME)")
    p.add_argument("--show", metavar="NAME", help="print preset NAME's YAML, a starting file for --config")
    p.set_defaults(func=cmd_presets)
    return parser


def cmd_make_shards(args) -> int:
    from dinotron.pipeline import write_shards
    from dinotron.train.errors import UserError

    try:
        m = write_shards(args.src, args.out, shard_size=args.shard_size, prefix=args.prefix, workers=args.workers,
                         classes=args.classes)
    except (OSError, ValueError) as e:  # write_shards' checks of its source folder and arguments; a full disk
        raise UserError(str(e)) from e
    print(f"wrote {m['num_samples']} samples in {len(m['shards'])} shards: {Path(args.out) / m['pattern']}"
          f" ({len(m['classes'] or [])} classes); skipped {len(m['skipped'])} undecodable files")
    for s in m["skipped"]:
        log.warning(f"skipped {s['path']}: {s['reason']}")
    return 0


def cmd_check_shards(args) -> int:
    from dinotron.pipeline import check_shards
    from dinotron.train.errors import UserError

    try:
        pixels = {} if args.max_image_pixels is None else {"max_image_pixels": args.max_image_pixels}
        r = check_shards(args.pattern, decode=not args.no_decode, **pixels)
    except (OSError, ValueError) as e:  # no shard matches, a missing or unreadable file
        raise UserError(str(e)) from e
    for bad in r["bad"]:
        where = f"{bad['shard']}" + (f" sample {bad['key']!r}" if bad["key"] else "")
        print(f"BAD {where}: {bad['problem']}")
    for path in r["indexes_written"]:
        log.info(f"wrote index {path}")
    print(f"{r['shards']} shards, {r['samples']} samples ({'labelled' if r['labelled'] else 'unlabelled'}), "
          f"{len(r['bad'])} bad")
    return 1 if r["bad"] else 0


def main(argv: list[str] | None = None) -> int:
    """Runs the command line `argv` (default sys.argv[1:]); returns the exit status (see the module docstring)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    args.argv = argv
    from dinotron.train.errors import USER_ERRORS
    from dinotron.train.log import setup_logging

    setup_logging(level=args.log_level, all_ranks=args.log_all_ranks)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        log.debug("the user error's traceback:", exc_info=True)
        log.error(f"dinotron {args.command}: {' '.join(str(e).split())}")  # one line
        return 2


if __name__ == "__main__":
    sys.exit(main())
