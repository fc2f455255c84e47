"""The `dinotron` command line: user errors, resume with a changed config, stale temporaries, a stopped demo, presets.

Oracles: the documented contract (docs/training.md, README's Troubleshooting). A user error exits 2 with exactly one
line on stderr that names the problem and no traceback, before the model is built (a `DinoV2` that fails the test if
constructed); a bug keeps its traceback. Resume: the key lists of `checkpoint.config_changes` as documented (STATE_KEYS
never, FREE_KEYS freely, every other key only with --allow-config-change). A demo stopped by SIGTERM exits 0 with
the command that resumes it, and that command finishes the run (its metrics: every step once). Presets: the YAML files
in configs/ (a preset is its file, named with '_' written '-'; its summary the opening comment's first sentence).
"""
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from dinotron import configs
from dinotron.train import checkpoint as ckpt
from dinotron.train import cli, demo, loop
from dinotron.train.config import Config, load_config, to_dict
from helpers import DALI_INSTALLED, TINY, MemoryLoader, requires_dali

ROOT = Path(__file__).resolve().parent.parent


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the trainer builds a model: user errors must stop before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the error was found")

    monkeypatch.setattr(loop, "DinoV2", refuse)


def empty_tar(path: Path) -> Path:
    with tarfile.open(path, "w"):
        pass
    return path


# ---- user errors: one line, exit 2 ----------------------------------------------------------------

TRAIN_ERRORS = {  # id: (overrides, the message's words); {t} is tmp_path, {shard} a labelled shard of 10 images
    "missing": (["data.train_shards=[{t}/train-000000.tar]"], "data.train_shards: shard not found: {t}/train-000000"),
    "missing-pattern": (["data.train_shards={t}/train-{{000000..000003}}.tar"], "(4 of 4 shards missing)"),
    "unmatched-glob": (["data.train_shards={t}/nothing-*.tar"], "no shard matches"),
    "empty-list": (["data.train_shards=[]"], "data.train_shards is empty"),
    "empty-tar": (["data.train_shards=[{t}/empty.tar]"], "{t}/empty.tar: no samples (empty tar)"),
    "no-full-batch": (["data.train_shards=[{shard}]", "data.loader=torchvision"],
                      "10 samples over 1 ranks make no full batch of 64"),
    "device-without-cuda": (["data.device=gpu", "data.train_shards=[{shard}]"], "data.device=gpu needs a CUDA GPU"),
    "knn-half": (["data.loader=torchvision", "data.batch_size_per_gpu=2", "data.train_shards=[{shard}]",
                  "evaluation.knn_train_shards=[{shard}]"], "both evaluation.knn_train_shards and"),
    "knn-unlabelled": (["data.loader=torchvision", "data.batch_size_per_gpu=2", "data.train_shards=[{shard}]",
                        "evaluation.knn_train_shards=[{flat}]", "evaluation.knn_val_shards=[{shard}]"],
                       "evaluation.knn_train_shards: the shards hold no labels"),
}


@pytest.mark.parametrize("overrides,message", TRAIN_ERRORS.values(), ids=TRAIN_ERRORS.keys())
def test_train_user_errors_are_one_line_before_the_model(tmp_path, capsys, no_model, overrides, message):
    if "gpu" in message and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    empty_tar(tmp_path / "empty.tar")
    names = {"t": tmp_path, "shard": "", "flat": ""}
    if any("{shard}" in a for a in overrides):
        names["shard"] = write_labelled_shard(tmp_path)
        names["flat"] = write_labelled_shard(tmp_path, labelled=False)
    args = [a.format(**names) for a in overrides]
    code = cli.main(["train", *TINY, f"train.output_dir={tmp_path / 'run'}", "train.progress=false", *args])
    assert code == 2
    err = one_error_line(capsys)
    assert err.startswith("ERROR: dinotron train: ") and message.format(t=tmp_path) in err, err
    assert not (tmp_path / "run" / "config.yaml").exists(), "nothing written"


def write_labelled_shard(tmp_path: Path, labelled: bool = True) -> str:
    """One shard of 10 texture images of 16 px, one per class (labelled), or the same images without labels."""
    from dinotron.pipeline import write_shards

    name = "labelled" if labelled else "flat"
    demo.write_texture_folder(tmp_path / "images", n_per_class=1, size=16, seed=0)
    src = tmp_path / "images"
    if not labelled:  # a flat folder: make-shards writes no .cls
        src = tmp_path / "flat-images"
        src.mkdir()
        for i, image in enumerate(sorted((tmp_path / "images").rglob("*.jpg"))):
            (src / f"{i}.jpg").write_bytes(image.read_bytes())
    write_shards(src, tmp_path / name, shard_size=100, prefix="s", progress=False)
    return str(tmp_path / name / "s-000000.tar")


def test_knn_shards_are_checked_before_the_model(tmp_path, capsys, no_model, monkeypatch):
    monkeypatch.setattr(loop, "build_train_loader", lambda cfg, rank, world: MemoryLoader())
    shard = write_labelled_shard(tmp_path)
    code = cli.main(["train", *TINY, f"train.output_dir={tmp_path / 'run'}", "data.train_shards=[x]",
                     f"evaluation.knn_train_shards=[{shard}]", f"evaluation.knn_val_shards=[{tmp_path}/val.tar]"])
    assert code == 2
    assert "evaluation.knn_val_shards: shard not found: " in one_error_line(capsys)


@pytest.mark.parametrize("argv,message", [
    (["eval-knn", "--run", "{t}/nowhere"], "dinotron eval-knn: --run {t}/nowhere: no such folder"),
    (["export", "--run", "{t}", "--out", "{t}/x"], "dinotron export: --run {t}: no complete checkpoint"),
    (["export", "--checkpoint", "{t}/checkpoint-00000001", "--out", "{t}/x"], "not a complete checkpoint (no meta.pt)"),
    (["make-shards", "{t}/no-images", "{t}/out"], "dinotron make-shards: source folder not found"),
    (["check-shards", "{t}/none-{{000000..000001}}.tar"], "dinotron check-shards: "),
    (["demo", "--config", "{t}/missing.yaml", "--out", "{t}/demo"], "dinotron demo: config file not found"),
    (["train", "--allow-config-change"], "--allow-config-change applies to --resume only"),
    (["train", "--preset", "vits14"], "dinotron train: --preset: unknown preset 'vits14'; the presets are demo, "),
    (["presets", "--show", "demo.yaml"], "dinotron presets: --show: unknown preset 'demo.yaml'; the presets are "),
])
def test_commands_report_user_errors_in_one_line(tmp_path, capsys, argv, message):
    code = cli.main([a.format(t=tmp_path) for a in argv])
    assert code == 2
    assert message.format(t=tmp_path) in one_error_line(capsys)


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Only the user-error types become one line: anything else propagates (the interpreter prints it)."""
    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(loop, "build_train_loader", bug)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["train", *TINY, f"train.output_dir={tmp_path}", "data.train_shards=[x]"])


@pytest.mark.parametrize("loader", [
    "torchvision",
    pytest.param("dali", marks=requires_dali),  # a loader whose __init__ raised must not print from __del__
])
def test_the_module_entry_point_exits_2_with_one_line(tmp_path, loader):
    """Through `python -m dinotron.train.cli` (as torchrun runs it), a fresh interpreter: exit status 2, one line
    (with its level, through the dinotron logger), no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "dinotron.train.cli", "train", *TINY, f"train.output_dir={tmp_path}",
         f"data.train_shards=[{tmp_path}/train-000000.tar]", f"data.loader={loader}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"ERROR: dinotron train: data.train_shards: shard not found: "
                                        f"{tmp_path}/train-000000.tar"]


# ---- resume with a changed config -----------------------------------------------------------------

@pytest.fixture
def memory_loader(monkeypatch):
    monkeypatch.setattr(loop, "build_train_loader", lambda cfg, rank, world: MemoryLoader())


RUN = ["data.train_shards=[x]", "data.batch_size_per_gpu=4", "train.epoch_length=4", "optim.epochs=2",
       "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1", "train.checkpoint_every=2",
       "train.progress=false"]


def train(tmp_path, *args):
    """cli.main of `dinotron train` on the tiny model and the in-memory loader (4 steps an epoch, 2 epochs)."""
    return cli.main(["train", *[a for a in args if a.startswith("--")], *TINY, f"train.output_dir={tmp_path}", *RUN,
                     *[a for a in args if not a.startswith("--")]])


def metric_steps(out_dir):
    """The training steps logged in metrics.jsonl (not the k-NN records)."""
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [m["step"] for m in lines if "loss" in m]


def test_resume_refuses_a_changed_schedule_unless_allowed(tmp_path, memory_loader, capsys, caplog):
    assert train(tmp_path, "train.max_steps=2") == 0
    capsys.readouterr()
    changed = ["optim.base_lr=0.001", "teacher.momentum_teacher=0.99", "train.max_steps=4"]
    assert train(tmp_path, "--resume", *changed) == 2
    err = one_error_line(capsys)
    assert "would change the run's training: optim.base_lr: 0.004 -> 0.001; teacher.momentum_teacher: 0.992 -> 0.99" \
        in err and "--allow-config-change" in err, err
    assert "max_steps" not in err, "train.max_steps is free to change"
    assert metric_steps(tmp_path) == [1, 2], "nothing was trained"

    caplog.set_level(logging.INFO, logger="dinotron")
    assert train(tmp_path, "--resume", "--allow-config-change", *changed) == 0
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("--allow-config-change: resuming") and "optim.base_lr: 0.004 -> 0.001" in m
               for m in logged), logged
    assert any("train.max_steps: 2 -> 4" in m for m in logged), "free changes are logged"
    assert metric_steps(tmp_path) == [1, 2, 3, 4]
    saved = ckpt.load_meta(ckpt.latest_checkpoint(tmp_path))["config"]
    assert saved["optim"]["base_lr"] == 0.001, "the checkpoint's meta stores the config it ran with"


@pytest.mark.parametrize("overrides,allow,message", [
    (["data.batch_size_per_gpu=8"], False, "global batch (data.batch_size_per_gpu x ranks x train.grad_accum_steps): "
                                           "4 -> 8"),
    (["data.augment.n_local=4", "dino.koleo_loss_weight=0.0"], False, "data.augment.n_local: 2 -> 4"),
    (["dino.head.n_prototypes=32"], True, "its weights have other shapes (dino.head.n_prototypes: 64 -> 32)"),
])
def test_resume_refuses_changes_that_matter(tmp_path, memory_loader, capsys, overrides, allow, message):
    assert train(tmp_path, "train.max_steps=2") == 0
    capsys.readouterr()
    assert train(tmp_path, "--resume", *(["--allow-config-change"] if allow else []), *overrides) == 2
    assert message in one_error_line(capsys)


def test_resume_allows_free_changes_and_the_same_global_batch(tmp_path, memory_loader, capsys):
    assert train(tmp_path, "train.max_steps=2") == 0
    free = ["train.max_steps=3", "train.log_every=1", "train.keep_last=5", "data.num_threads=1",
            "evaluation.period_steps=7", "data.loader=torchvision", "data.batch_size_per_gpu=2",
            "train.grad_accum_steps=2", "model.attention=dinotron"]
    assert train(tmp_path, "--resume", *free) == 0, capsys.readouterr().err
    assert metric_steps(tmp_path) == [1, 2, 3]


@pytest.mark.parametrize("key,kind", [
    ("optim.base_lr", "training"), ("optim.weight_decay_end", "training"), ("teacher.teacher_temp", "training"),
    ("dino.loss_weight", "training"), ("ibot.loss_weight", "training"), ("dino.koleo_loss_weight", "training"),
    ("ibot.mask_ratio_min_max", "training"), ("model.drop_path_rate", "training"), ("train.seed", "training"),
    ("train.epoch_length", "training"), ("data.augment.global_scale", "training"), ("model.pack_crops", "training"),
    ("model.arch", "state"), ("model.timm_kwargs.embed_dim", "state"), ("dino.head.hidden_dim", "state"),
    ("ibot.separate_head", "state"), ("train.output_dir", "free"), ("train.max_steps", "free"),
    ("train.checkpoint_every", "free"), ("evaluation.knn_val_shards", "free"), ("data.train_shards", "free"),
    ("train.parallel", "free"), ("train.precision", "free"), ("fsdp.reduce_dtype", "free"),
])
def test_config_changes_sorts_keys_as_documented(key, kind):
    saved, current = to_dict(Config()), to_dict(Config())
    *sections, leaf = key.split(".")
    node = current
    for part in sections:
        node = node[part]
    node[leaf] = ["changed"]
    changes = ckpt.config_changes(saved, 2, current, 2)
    assert [k for k, v in changes.items() if v] == [kind], changes
    assert any(line.startswith(f"{key}: ") and line.endswith("-> ['changed']") for line in changes[kind]), changes


def test_config_changes_compare_the_global_batch_not_its_split():
    saved = to_dict(Config())
    current = to_dict(Config())
    current["data"]["batch_size_per_gpu"] = 32
    assert not ckpt.config_changes(saved, 4, current, 8)["training"], "64 x 4 ranks = 32 x 8 ranks"
    assert ckpt.config_changes(saved, 4, current, 4)["training"] == [f"{ckpt.GLOBAL_BATCH}: 256 -> 128"]


# ---- stale temporaries of an interrupted save -----------------------------------------------------

def test_stale_temporaries_are_removed_at_resume_and_logged(tmp_path, memory_loader, monkeypatch, caplog):
    assert train(tmp_path, "train.max_steps=2") == 0
    real_write = ckpt._write

    def killed(path, obj):  # the save of step 4 dies before its meta.pt: .checkpoint-00000004.tmp stays
        if path.name == ckpt.META and "00000004" in str(path):
            raise KeyboardInterrupt
        real_write(path, obj)

    monkeypatch.setattr(ckpt, "_write", killed)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, "--resume", "train.max_steps=4")
    monkeypatch.setattr(ckpt, "_write", real_write)
    (tmp_path / ".checkpoint-00000002.discard.tmp").mkdir()  # a deletion interrupted between rename and rmtree
    stale = [".checkpoint-00000002.discard.tmp", ".checkpoint-00000004.tmp"]
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == stale

    caplog.set_level(logging.INFO, logger="dinotron")
    trainer = loop.Trainer(load_config(None, [*TINY, f"train.output_dir={tmp_path}", *RUN]), resume=True)
    assert not list(tmp_path.glob(".*.tmp")), "removed at start, before any save"
    assert trainer.step == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("removed 2 temporary folder(s)" in m and ", ".join(stale) in m for m in warnings), warnings


def test_stale_temporaries_go_before_anything_is_written(tmp_path, memory_loader, monkeypatch):
    (tmp_path / ".checkpoint-00000007.tmp").mkdir(parents=True)
    (tmp_path / ".checkpoint-00000007.tmp" / "rank-0.pt").write_bytes(b"partial")
    seen = []
    real = ckpt.remove_stale_temporaries
    monkeypatch.setattr(ckpt, "remove_stale_temporaries",
                        lambda d: seen.append(sorted(p.name for p in Path(d).iterdir())) or real(d))
    assert train(tmp_path, "train.max_steps=1") == 0
    assert seen == [[".checkpoint-00000007.tmp"]], "the folder held nothing else when they were removed"
    assert not (tmp_path / ".checkpoint-00000007.tmp").exists()


# ---- presets: the YAML files of configs/, shipped as dinotron.configs ------------------------------

PRESET_FILES = {p.stem.replace("_", "-"): p for p in sorted((ROOT / "configs").glob("*.yaml"))}


def test_presets_lists_every_config_file_with_its_summary(capsys):
    assert {"demo", "vits14-imagenet", "vitl14-imagenet"} <= set(PRESET_FILES)
    assert cli.main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(PRESET_FILES)
    for line, path in zip(lines, PRESET_FILES.values(), strict=True):
        comment = []  # the file's opening comment, its lines joined
        for text in path.read_text().splitlines():
            if not text.startswith("#"):
                break
            comment.append(text.lstrip("# "))
        summary = line.split(maxsplit=1)[1]
        assert " ".join(comment).startswith(summary.removesuffix("...")), (line, comment)
        assert len(summary) <= configs.SUMMARY_WIDTH


@pytest.mark.parametrize("name", PRESET_FILES)
def test_presets_show_prints_the_file(capsys, name):
    assert cli.main(["presets", "--show", name]) == 0
    assert capsys.readouterr().out == PRESET_FILES[name].read_text()


@pytest.mark.parametrize("command", ["train", "demo"])
def test_preset_loads_the_config_file(monkeypatch, command):
    """`--preset NAME` runs with the config of `--config configs/NAME.yaml`; demo's default is the demo preset."""
    seen = []

    class Stop(Exception):
        pass

    def stop(config, *args, **kwargs):
        """Trainer(cfg, ...) or run_demo(path, out, overrides, ...): records the Config, stops before any work."""
        seen.append(to_dict(config if isinstance(config, Config) else load_config(config, args[1])))
        raise Stop

    monkeypatch.setattr(loop, "Trainer", stop)
    monkeypatch.setattr(demo, "run_demo", stop)
    name = "vits14-imagenet" if command == "train" else "demo"
    argvs = [[command, "--preset", name], [command, "--config", str(PRESET_FILES[name])]]
    if command == "demo":
        argvs.append([command])
    for argv in argvs:
        with pytest.raises(Stop):
            cli.main([*argv, "data.num_threads=1"])
    assert len(seen) == len(argvs) and all(cfg == seen[0] for cfg in seen)
    assert seen[0]["data"]["num_threads"] == 1, "the overrides still apply"


@pytest.mark.parametrize("text,summary", [
    ("# One sentence.\nmodel: {}\n", "One sentence."),
    ("# A sentence over\n# two lines. And a second.\n", "A sentence over two lines."),
    ("# " + "word " * 30 + "end.\n", "word " * 18 + "word..."),
    ("# Title: " + "x" * 40 + ", " + "y" * 80 + ".\n", "Title: " + "x" * 40 + "..."),
    ("model: {}\n# not an opening comment\n", ""),
])
def test_preset_summary(text, summary):
    assert configs.summary(text) == summary


# ---- the demo, stopped by SIGTERM and resumed -----------------------------------------------------

SHORT_DEMO = [  # configs/demo.yaml shrunk: 30 images, 6 steps of 8, a ViT of 1 block
    "model.timm_kwargs={embed_dim: 32, depth: 1, num_heads: 2, patch_size: 8}",
    "dino.head={n_prototypes: 32, bottleneck_dim: 16, hidden_dim: 32, nlayers: 2}",
    "data.batch_size_per_gpu=8", "data.augment.n_local=2", "data.num_threads=1", "train.epoch_length=3",
    "optim.epochs=2", "optim.warmup_epochs=1", "train.checkpoint_every=100", "train.progress=false",
    "evaluation.batch_size=10",
] + ([] if DALI_INSTALLED else ["data.loader=torchvision"])


def test_demo_stopped_by_sigterm_exits_0_and_its_resume_command_finishes_it(tmp_path, monkeypatch, capsys):
    real_demo, real_step = demo.run_demo, loop.Trainer.train_step
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: real_demo(*a, n_train_per_class=3, n_val_per_class=1, **k))
    signalled = []

    def step_then_sigterm(self, *batches):
        out = real_step(self, *batches)
        if self.step == 2 and not signalled:
            signalled.append(self.step)
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(loop.Trainer, "train_step", step_then_sigterm)
    out = tmp_path / "demo"
    argv = ["demo", "--config", str(ROOT / "configs" / "demo.yaml"), "--out", str(out), *SHORT_DEMO]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.splitlines()[-1])
    assert result["interrupted"] is True and (result["steps"], result["of_steps"]) == (4, 6), result
    assert result["checkpoint"].endswith("checkpoint-00000004")
    assert "Traceback" not in captured.err and f"resume with: {result['resume']}" in captured.err
    resume = shlex.split(result["resume"])
    assert resume[:3] == ["dinotron", "demo", "--resume"] and resume[3:] == argv[1:]

    monkeypatch.setattr(cli, "DEMO_MIN_GAIN", -100.0)  # 6 steps on 30 images learn nothing to speak of
    assert cli.main(resume[1:]) == 0
    final = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert final["steps"] == 6 and "knn_top1_trained" in final and Path(final["export"]).is_dir()
    assert final["knn_top1_random_init"] == round(json.loads((out / demo.RANDOM_INIT).read_text())["top1"], 2)
    assert metric_steps(out / "train") == [1, 2, 3, 4, 5, 6], "every step once: the resume continued at 5"
    assert [p.name for p in ckpt.list_checkpoints(out / "train")] == ["checkpoint-00000004", "checkpoint-00000006"]
    # the finished run evaluates from the command line too (its config names the labelled shards)
    assert cli.main(["eval-linear", "--run", str(out / "train"), "evaluation.linear_epochs=1",
                     "evaluation.linear_epoch_length=3", "evaluation.linear_batch_size=8"]) == 0
    linear = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert linear["checkpoint"].endswith("checkpoint-00000006") and 0.0 <= linear["top1"] <= linear["top5"] <= 100.0
