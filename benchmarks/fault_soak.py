"""Fault soak: SIGKILL a short CPU training run at random points, resume it, and compare with an uninterrupted run.

    python benchmarks/fault_soak.py                      # 50 trials, seed 0, tiny shards: ~3-5 min on 2 CPU cores
    python benchmarks/fault_soak.py --trials 100 --seed 7 --data memory --work /tmp/soak

The run: the tiny ViT of the tests (32 px global / 16 px local crops, 2 blocks of width 32) for STEPS = 10 steps of
4 images on one process (train.parallel=none), a checkpoint every 2 steps, the last 2 kept (so pruning runs too), fp32
on the CPU with one thread. Data: 20 texture JPEGs written with the pipeline's shard writer into 3 shards and read by
TorchvisionMultiCropLoader in the trainer's process (5 batches per epoch: the run crosses an epoch end; with
--loader-workers N in N DataLoader worker processes), or with --data memory batches drawn from (epoch, position) in
memory.

Each trial runs the trainer (`Trainer(cfg, resume=True).fit()`) in a child process and kills it with SIGKILL, once or
twice (each later run resuming the folder the kill left), then resumes it once more to the end. A seeded RNG draws
every fault:
  step   inside a training step s: at the k-th nn.Linear call of the forward (k random), at the k-th gradient hook
         of the backward, or right after the optimiser step (weights updated, teacher and step count not)
  save   inside the checkpoint write of step s, at one of the points of checkpoint.save_checkpoint: before DCP
         writes, after DCP's shard files but before its .metadata, after rank-0.pt, after meta.pt (the temporary
         folder is then complete but not renamed), right after the rename to checkpoint-<s>, or while pruning (the
         oldest checkpoint renamed to .discard.tmp, not yet deleted)
  timer  the parent kills the child after a random delay, uniform over the first 90% of the uninterrupted run's
         measured time (for the steps left); where it landed (which step or which point of which save) is read
         from what the child last recorded. One that fires after the run ended is recorded as missed.

The child records, in memory shared with the parent, where it is (phase and step) and the step of the last
checkpoint whose rename completed: the commit point of save_checkpoint, so the checkpoint every resume must take.
Every trial passes when
  - each resume starts at that committed step (0, from scratch, when none was committed) and loads a folder with a
    final name (`checkpoint-<step>`), never a `.checkpoint-<step>.tmp` left by a kill (recorded when one holds a
    meta.pt), and the folder scan agrees with the commit record;
  - the final model (student, teacher, centres) and optimiser state equal those of an uninterrupted run bit for bit
    (same process set-up, same thread count, same ops in the same order: a resume that restores everything leaves no
    difference to tolerate), and every loss the killed and resumed runs logged equals the uninterrupted run's loss at
    that step.

Children start from a forkserver that has imported torch and dinotron once (importing them costs ~9 s per process
on a loaded 2-core machine, a trial up to 3 processes); they are still separate processes, killed with a real
SIGKILL. `--start-method spawn` starts each one from scratch instead.

Writes benchmarks/results/<cpu>/fault_soak.json: a row per trial (its faults, where each hit, the steps resumed
from, pass, wall time as `ms`), each trial's full record under "trials" and a summary under "summary". Exits 1
where a trial failed; `--work DIR` keeps the failed trials' folders (error.txt holds a child's traceback).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# tests/helpers.py: the tests' tiny ViT (TINY) and in-memory loader (MemoryLoader), imported where used
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

STEPS = 10
CHECKPOINT_EVERY = 2
KEEP_LAST = 2
BATCH = 4
CHECKPOINTS = list(range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY))

STEP_POINTS = ("forward", "backward", "optimizer")
SAVE_POINTS = ("dcp", "dcp_metadata", "rank_state", "meta", "renamed", "prune")
PHASES = ("init", "loop", "step:forward", "step:backward", "step:optimizer", "save:start", "save:dcp",
          "save:dcp_metadata", "save:rank_state", "save:meta", "save:renamed", "save:prune", "save:done", "done")
# Slots of the shared int64 array a child writes and the parent reads (after the child is dead, too).
STARTED, PHASE, STEP, COMMITTED, RESUMED, LOADED, LINEAR_CALLS, GRAD_HOOKS, FIT_MS = range(9)
_FINAL = re.compile(r"^checkpoint-(\d{8})$")


# ---- the child: one training process ------------------------------------------------------------------------------

def run_config(out: Path, data: dict | None, *overrides: str):
    """The soak's training config: tiny model, STEPS steps, a checkpoint every CHECKPOINT_EVERY, KEEP_LAST kept.
    data: None (in-memory batches, MemoryLoader) or {"shards": paths, "workers": DataLoader workers (0: read in
    this process)} for TorchvisionMultiCropLoader."""
    from dinotron.train.config import load_config
    from helpers import TINY

    data = ([f"data.train_shards={data['shards']}", "data.loader=torchvision", "data.device=cpu",
             f"data.num_threads={data['workers']}"] if data else ["data.train_shards=[memory]"])
    return load_config(None, TINY + data + [
        f"train.output_dir={out}", "train.epoch_length=4", "optim.epochs=3", "optim.warmup_epochs=1",
        "teacher.warmup_teacher_temp_epochs=1", f"data.batch_size_per_gpu={BATCH}", f"train.max_steps={STEPS}",
        f"train.checkpoint_every={CHECKPOINT_EVERY}", f"train.keep_last={KEEP_LAST}", "train.progress=false",
        "train.parallel=none", *overrides,
    ])


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _instrument(trainer, shared, fault: dict | None) -> None:
    """Record the phase in `shared` at every point below and SIGKILL this process at `fault`'s point, if any:
    {"kind": "step", "point": "forward"|"backward"|"optimizer", "step": s, "nth": k} (s: the step's number once
    done, 1-based) or {"kind": "save", "point": one of SAVE_POINTS, "step": s}."""
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from dinotron.train import checkpoint as ckpt

    def at(phase: str, step: int) -> None:
        shared[PHASE], shared[STEP] = PHASES.index(phase), step
        kind, _, point = phase.partition(":")
        if fault and fault["kind"] == kind and fault["point"] == point and fault["step"] == step:
            if kind != "step" or point == "optimizer" or counts[point] == fault["nth"]:
                _kill_self()

    counts = {"forward": 0, "backward": 0}
    real_step = trainer.train_step

    def train_step(*batches):
        counts.update(forward=0, backward=0)
        at("step:forward", trainer.step + 1)
        out = real_step(*batches)
        shared[LINEAR_CALLS], shared[GRAD_HOOKS] = counts["forward"], counts["backward"]
        at("loop", trainer.step)
        return out

    def linear_called(module, args):
        counts["forward"] += 1
        at("step:forward", trainer.step + 1)

    def grad_hook(grad):
        counts["backward"] += 1
        at("step:backward", trainer.step + 1)

    trainer.train_step = train_step
    for m in trainer.model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_pre_hook(linear_called)
    for p in trainer.model.student.parameters():
        if p.requires_grad:
            p.register_hook(grad_hook)
    real_optimizer_step = trainer.optimizer.step

    def optimizer_step(*args, **kwargs):
        out = real_optimizer_step(*args, **kwargs)
        at("step:optimizer", trainer.step + 1)
        return out

    trainer.optimizer.step = optimizer_step

    # save_checkpoint and what it calls, looked up on their modules at call time
    real_save, real_dcp_save, real_finish = ckpt.save_checkpoint, dcp.save, FileSystemWriter.finish
    real_write, real_replace = ckpt._write, os.replace
    saving = {"step": -1}

    def save_checkpoint(directory, step, **kwargs):
        saving["step"] = step
        at("save:start", step)
        path = real_save(directory, step, **kwargs)
        at("save:done", step)
        at("loop", step)
        return path

    def dcp_save(*args, **kwargs):
        at("save:dcp", saving["step"])
        return real_dcp_save(*args, **kwargs)

    def finish(self, *args, **kwargs):
        at("save:dcp_metadata", saving["step"])
        return real_finish(self, *args, **kwargs)

    def write(path, obj):
        real_write(path, obj)
        at("save:meta" if Path(path).name == ckpt.META else "save:rank_state", saving["step"])

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        name = os.path.basename(os.fspath(dst))
        if _FINAL.match(name):
            shared[COMMITTED] = int(_FINAL.match(name).group(1))
            at("save:renamed", saving["step"])
        elif name.endswith(".discard.tmp"):
            at("save:prune", saving["step"])

    ckpt.save_checkpoint, dcp.save, FileSystemWriter.finish = save_checkpoint, dcp_save, finish
    ckpt._write, os.replace = write, replace


def child(job: dict, shared) -> None:
    """One training process: Trainer(resume=True).fit() in job["out"], instrumented (and killed) per job["fault"];
    where it is not killed, the final state goes to job["final"]. An error is written to job["out"]/error.txt."""
    import logging

    import torch
    from tqdm import tqdm

    from dinotron.train import checkpoint as ckpt
    from dinotron.train import loop

    try:
        torch.set_num_threads(1)
        # tqdm's default lock is a multiprocessing semaphore, which a SIGKILLed child leaves to the resource tracker
        # (a "leaked semaphore" warning per kill); this process writes no progress bar
        tqdm.set_lock(threading.RLock())
        logging.getLogger("dinotron").setLevel(logging.WARNING)
        if not job["data"]:
            from helpers import MemoryLoader

            loop.build_train_loader = lambda cfg, rank, world: MemoryLoader(cfg.data.batch_size_per_gpu, n_batches=5)
        real_load = ckpt.load_sharded

        def load_sharded(path, state):
            shared[LOADED] = 1 if _FINAL.match(Path(path).name) else -1
            return real_load(path, state)

        ckpt.load_sharded = load_sharded
        trainer = loop.Trainer(run_config(Path(job["out"]), job["data"]), resume=True)
        shared[RESUMED] = trainer.step
        _instrument(trainer, shared, job["fault"])
        shared[STARTED] = 1
        tic = time.perf_counter()
        trainer.fit()
        shared[FIT_MS] = round(1e3 * (time.perf_counter() - tic))
        shared[PHASE] = PHASES.index("done")
        if job.get("final"):
            torch.save({"step": trainer.step, "model": trainer.model.state_dict(),
                        "optimizer": trainer.optimizer.state_dict()}, job["final"])
    except BaseException:
        Path(job["out"], "error.txt").write_text(traceback.format_exc())
        raise


# ---- the parent: trials ---------------------------------------------------------------------------------------------

def context(start_method: str):
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["torch", "dinotron.train.loop", "dinotron.pipeline", __name__])
    return ctx


def _run_child(ctx, job: dict, committed: int, delay: float | None = None, timeout: float = 300) -> dict:
    """Run `child(job)` to its end or its kill (at job["fault"], or after `delay` seconds of training); returns
    what it recorded: {"exitcode", "killed", "phase", "step", "committed", "resumed", "loaded", "error", ...}."""
    shared = ctx.RawArray("q", 9)
    shared[COMMITTED], shared[RESUMED] = committed, -1
    proc = ctx.Process(target=child, args=(job, shared))  # not daemonic: DataLoader workers are its children
    proc.start()
    if delay is not None:
        while not shared[STARTED] and proc.is_alive():
            time.sleep(0.005)
        time.sleep(delay)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout)
    if proc.is_alive():  # hung: a failure, and no process left behind
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    error = Path(job["out"], "error.txt")
    return {"exitcode": proc.exitcode, "killed": proc.exitcode == -signal.SIGKILL, "phase": PHASES[shared[PHASE]],
            "step": shared[STEP], "committed": shared[COMMITTED], "resumed": shared[RESUMED],
            "loaded": shared[LOADED], "linear_calls": shared[LINEAR_CALLS], "grad_hooks": shared[GRAD_HOOKS],
            "fit_s": shared[FIT_MS] / 1e3, "error": error.read_text().strip().splitlines()[-1] if error.exists()
            else None}


def scan(out: Path) -> dict:
    """What a kill left in `out`, read without dinotron: steps of the complete checkpoints (final name and a
    meta.pt), and the temporary folders (and whether each holds a meta.pt)."""
    complete, tmp = [], {}
    for p in sorted(out.iterdir()) if out.is_dir() else []:
        if (m := _FINAL.match(p.name)) and (p / "meta.pt").is_file():
            complete.append(int(m.group(1)))
        elif p.name.startswith(".") and p.name.endswith(".tmp"):
            tmp[p.name] = (p / "meta.pt").is_file()
    return {"complete": sorted(complete), "tmp": tmp}


def losses(out: Path) -> tuple[dict[int, list[float]], int]:
    """{step: [loss of every line logging it]} from metrics.jsonl, and the number of lines that do not parse."""
    found, bad = {}, 0
    for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if "loss" in record:
            found.setdefault(record["step"], []).append(record["loss"])
    return found, bad


def compare_states(a: dict, b: dict) -> float:
    """Largest |difference| over every tensor of two final states (model and optimiser), inf where the keys or
    shapes differ; 0.0 means bitwise equal."""
    import torch

    def tensors(obj, prefix=""):
        if isinstance(obj, torch.Tensor):
            yield prefix, obj
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                yield from tensors(obj[k], f"{prefix}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from tensors(v, f"{prefix}/{i}")

    ta, tb = dict(tensors(a)), dict(tensors(b))
    if ta.keys() != tb.keys() or a.get("step") != b.get("step"):
        return math.inf
    largest = 0.0
    for k, x in ta.items():
        y = tb[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            return math.inf
        if not torch.equal(x, y):
            largest = max(largest, (x.double() - y.double()).abs().max().nan_to_num(math.inf).item() or math.inf)
    return largest


def plan_fault(rng: random.Random, start: int, kinds: tuple[str, ...]) -> dict | None:
    """A fault for a run that starts at step `start`: kind from `kinds`, its point and target step; None where the
    run has nothing left to kill."""
    saves = [s for s in CHECKPOINTS if s > start]
    pruning = [s for s in saves if s > CHECKPOINT_EVERY * KEEP_LAST]  # a KEEP_LAST + 1-th checkpoint prunes one
    kinds = tuple(k for k in kinds if k != "save" or saves)
    if start >= STEPS or not kinds:
        return None
    kind = rng.choice(kinds)
    if kind == "step":
        return {"kind": "step", "point": rng.choice(STEP_POINTS), "step": rng.randint(start + 1, STEPS),
                "fraction": rng.random()}
    if kind == "save":
        point = rng.choice(SAVE_POINTS if pruning else SAVE_POINTS[:-1])
        return {"kind": "save", "point": point, "step": rng.choice(pruning if point == "prune" else saves)}
    return {"kind": "timer", "fraction": rng.random()}


def reference(ctx, work: Path, data: dict | None) -> dict:
    """The uninterrupted run (the oracle): its final state, losses, duration and per-step call counts."""
    out = work / "reference"
    result = _run_child(ctx, {"out": str(out), "data": data, "fault": None, "final": str(work / "reference.pt")},
                        committed=0)
    if result["exitcode"] != 0:
        raise RuntimeError(f"the uninterrupted run failed: {result['error']}")
    import torch

    result["state"] = torch.load(work / "reference.pt", weights_only=False)
    result["losses"], _ = losses(out)
    return result


def run_trial(ctx, work: Path, data: dict | None, ref: dict, faults_to_run: list[dict | Callable]) -> dict:
    """One trial in work/: a killed run per entry of `faults_to_run`, each resuming the folder the last one left,
    then one resumed to the end. An entry is a fault (as plan_fault returns) or a function of the step the run
    starts from returning one (or None: no more faults). Returns the trial's record; record["pass"] says whether
    every check held (module docstring)."""
    import torch

    out = work / "run"
    tic = time.perf_counter()
    committed, faults, problems = 0, [], []
    for entry in faults_to_run:
        fault = entry(committed) if callable(entry) else entry
        if fault is None:
            break
        fault = dict(fault)
        job = {"out": str(out), "data": data, "fault": None, "final": None}
        delay = None
        if fault["kind"] == "timer":  # over the first 90% of the run's expected time, so that most kills land
            delay = 0.9 * fault["fraction"] * ref["fit_s"] * (STEPS - committed) / STEPS
        else:
            job["fault"] = fault
            if fault["kind"] == "step" and fault["point"] != "optimizer":
                calls = ref["linear_calls" if fault["point"] == "forward" else "grad_hooks"]
                fault["nth"] = 1 + int(fault.pop("fraction") * calls)
            fault.pop("fraction", None)
        result = _run_child(ctx, job, committed, delay)
        left = scan(out)
        record = {**fault, "hit": f"{result['phase']}@{result['step']}" if result["killed"] else None,
                  "resumed_from": result["resumed"], "expected_from": committed, "loaded_final_name":
                  result["loaded"] >= 0, "committed_at_kill": result["committed"], "complete_left": left["complete"],
                  "tmp_left": left["tmp"]}
        if fault["kind"] == "timer":
            record["delay_s"] = round(delay, 3)
        faults.append(record)
        problems += check_resume(record, result)
        if not result["killed"] and result["exitcode"] != 0:
            problems.append(f"the run failed: exit code {result['exitcode']}, {result['error']}")
            break
        # a timer that fired after the run ended (the machine ran faster than the reference did) is a miss, no
        # failure: the next run resumes from wherever that one ended
        if max(left["complete"], default=0) != result["committed"]:
            problems.append(f"the folder's complete checkpoints {left['complete']} disagree with the commit record "
                            f"{result['committed']}")
        committed = result["committed"]
    final = _run_child(ctx, {"out": str(out), "data": data, "fault": None, "final": str(work / "final.pt")},
                       committed)
    problems += check_resume({"resumed_from": final["resumed"], "expected_from": committed,
                               "loaded_final_name": final["loaded"] >= 0}, final)
    difference = math.inf
    if final["exitcode"] == 0:
        difference = compare_states(torch.load(work / "final.pt", weights_only=False), ref["state"])
    else:
        problems.append(f"the final resume failed: exit code {final['exitcode']}, {final['error']}")
    if difference != 0:
        problems.append(f"final state differs from the uninterrupted run: largest |difference| {difference:.3g}")
    logged, bad_lines = losses(out)
    wrong = sorted(s for s, values in logged.items() if any(v != ref["losses"].get(s, [None])[0] for v in values))
    if wrong or set(logged) != set(ref["losses"]):
        problems.append(f"logged losses differ from the uninterrupted run's at steps {wrong} (logged steps "
                        f"{sorted(logged)})")
    return {"faults": faults, "final_resumed_from": final["resumed"], "final_expected_from": committed,
            "final_step": STEPS if final["exitcode"] == 0 else None, "max_abs_difference": difference,
            "duplicate_logged_steps": sum(len(v) - 1 for v in logged.values()), "bad_metric_lines": bad_lines,
            "seconds": round(time.perf_counter() - tic, 2), "problems": problems, "pass": not problems}


def check_resume(record: dict, result: dict) -> list[str]:
    problems = []
    if result["resumed"] != record["expected_from"]:
        problems.append(f"resumed from step {result['resumed']}, the last complete checkpoint is step "
                        f"{record['expected_from']}")
    if not record["loaded_final_name"] or (result["loaded"] == 1) != (record["expected_from"] > 0):
        problems.append(f"loaded a checkpoint folder without a final name, or none where one was complete "
                        f"(loaded flag {result['loaded']}, expected step {record['expected_from']})")
    return problems


def make_shards(root: Path) -> list[str]:
    """20 texture JPEGs of 40 px in 3 shards (8, 8, 4) written by the pipeline's shard writer."""
    from dinotron.pipeline import write_shards
    from dinotron.train.demo import write_texture_folder

    write_texture_folder(root / "images", n_per_class=2, size=40, seed=0)
    write_shards(root / "images", root / "shards", shard_size=8, prefix="train", workers=1, progress=False)
    return sorted(str(p) for p in (root / "shards").glob("train-*.tar"))


def soak(trials: int, seed: int, work: Path, data: str = "shards", workers: int = 0, start_method: str = "forkserver",
         kinds: tuple[str, ...] = ("step", "save", "timer"), two_fault_share: float = 0.3,
         log=print) -> tuple[dict, list[dict]]:
    """The uninterrupted run, then `trials` trials in work/ (each in its own folder, removed once it passed).
    Returns (the reference's record, the trials' records)."""
    ctx = context(start_method)
    data = {"shards": make_shards(work / "data"), "workers": workers} if data == "shards" else None
    ref = reference(ctx, work, data)
    log(f"uninterrupted run: {STEPS} steps in {ref['fit_s']:.2f} s, {ref['linear_calls']} nn.Linear calls and "
        f"{ref['grad_hooks']} gradient hooks per step")
    rng = random.Random(seed)
    records = []
    for i in range(trials):
        trial_dir = work / f"trial-{i:03d}"
        n_faults = 2 if rng.random() < two_fault_share else 1
        record = run_trial(ctx, trial_dir, data, ref, [lambda start: plan_fault(rng, start, kinds)] * n_faults)
        records.append(record)
        hits = ", ".join(f["hit"] or "missed" for f in record["faults"])
        resumed = ", ".join(str(f["resumed_from"]) for f in record["faults"][1:]) or "-"
        log(f"trial {i:3d}: {hits}; resumed from {resumed} then {record['final_resumed_from']}: "
            f"{'PASS' if record['pass'] else 'FAIL ' + '; '.join(record['problems'])} ({record['seconds']} s)")
        if record["pass"]:
            shutil.rmtree(trial_dir, ignore_errors=True)
    return ref, records


def summarise(records: list[dict]) -> dict:
    faults = [f for r in records for f in r["faults"]]
    # every run after a kill: the next fault's run, or the final one
    starts = [(f["resumed_from"], f["expected_from"]) for r in records for f in r["faults"][1:]]
    starts += [(r["final_resumed_from"], r["final_expected_from"]) for r in records if r["faults"]]
    hits = [f["hit"] for f in faults if f["hit"]]
    where = {}
    for h in hits:
        phase = h.split("@")[0]
        where[phase] = where.get(phase, 0) + 1
    return {
        "trials": len(records),
        "passed": sum(r["pass"] for r in records),
        "faults": len(faults),
        "faults_by_kind": {k: sum(f["kind"] == k for f in faults) for k in ("step", "save", "timer")},
        "hits_during_step": sum(h.startswith("step:") for h in hits),
        "hits_during_save": sum(h.startswith("save:") for h in hits),
        "hits_between": sum(h.startswith(("loop", "init", "done")) for h in hits),
        "hits_by_phase": dict(sorted(where.items())),
        "missed": sum(f["hit"] is None for f in faults),
        "resumes_after_a_kill": len(starts),
        "resumes_at_last_complete_checkpoint": sum(resumed == expected for resumed, expected in starts),
        "resumes_with_a_tmp_folder": sum(bool(f["tmp_left"]) for f in faults),
        "resumes_with_a_tmp_folder_holding_meta": sum(any(f["tmp_left"].values()) for f in faults),
        "final_state_bitwise_equal": sum(r["max_abs_difference"] == 0 for r in records),
        "bad_metric_lines": sum(r["bad_metric_lines"] for r in records),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="seeds the RNG that draws every fault")
    parser.add_argument("--data", choices=["shards", "memory"], default="shards")
    parser.add_argument("--loader-workers", type=int, default=0, help="data.num_threads with --data shards")
    parser.add_argument("--start-method", choices=["forkserver", "spawn"], default="forkserver")
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one, removed)")
    args = parser.parse_args()

    from common import save

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="dinotron-fault-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    try:
        ref, records = soak(args.trials, args.seed, work, args.data, args.loader_workers, args.start_method)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    rows = []
    for i, r in enumerate(records):
        hits = "; ".join(f"{f['kind']} missed" if not f["hit"] else f"timer at {f['hit']}" if f["kind"] == "timer"
                         else f["hit"] for f in r["faults"])
        resumed = " -> ".join(str(s) for s in [f["resumed_from"] for f in r["faults"][1:]] + [r["final_resumed_from"]])
        rows.append({"case": f"trial {i:02d}: {hits}; resumed from {resumed}", "impl": "dinotron",
                     "faults": len(r["faults"]), "pass": r["pass"], "ms": round(1e3 * r["seconds"], 1)})
    summary = summarise(records)
    save("fault_soak", rows, "cpu", extra={
        "seed": args.seed, "data": args.data, "loader_workers": args.loader_workers if args.data == "shards" else None,
        "start_method": args.start_method, "steps": STEPS,
        "checkpoint_every": CHECKPOINT_EVERY, "keep_last": KEEP_LAST, "batch_size": BATCH, "threads": 1,
        "reference_fit_s": ref["fit_s"], "wall_s": round(time.perf_counter() - tic, 1),
        "comparison": "final model and optimiser state bitwise equal to the uninterrupted run's; every logged loss "
                      "equal to its loss at that step",
        "note": "ms: wall time of the trial (all its processes), not a speed measurement",
        "summary": summary, "trials": records,
    })
    print(json.dumps(summary, indent=1))
    return 0 if summary["passed"] == summary["trials"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
