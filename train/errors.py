"""User errors: the exceptions the `dinotron` command reports as one line on stderr with exit status 2.

A user error is a problem in what the user gave (a config key, a shard list, a run folder, a resume that would
change the run) whose message names it and the fix; anything else is a bug and keeps its traceback. The command
line catches exactly `USER_ERRORS` (`dinotron --log-level DEBUG` adds the traceback to the line).

- `UserError` and its subclasses here: `OutputDirInUse`, `DataError`, `ConfigChanged`, `CheckpointNotFound`;
- `ConfigError` (`train/config.py`): an unknown key or a value of the wrong type;
- `ShardError` (`pipeline/shards.py`): bad shard data, naming the shard and sample;
- `DaliNotInstalledError` (`pipeline/dali_loader.py`): `data.loader=dali` without NVIDIA DALI.
"""
from __future__ import annotations

from dinotron.pipeline import DaliNotInstalledError, ShardError
from dinotron.train.config import ConfigError


class UserError(Exception):
    """Base of this project's user errors; the message names what to change."""


class OutputDirInUse(UserError, ValueError):
    """train.output_dir holds an earlier run's checkpoints and neither resume nor overwrite was asked for."""


class DataError(UserError, ValueError):
    """data.* or evaluation.knn_*_shards name shards that cannot be read: missing, empty, unreadable, unlabelled
    for k-NN, too few for one batch; or data.device=gpu without a GPU. Raised before the model is built."""


class ConfigChanged(UserError, ValueError):
    """--resume with a config whose training keys differ from the checkpoint's (`checkpoint.config_changes`)."""


class CheckpointNotFound(UserError, FileNotFoundError):
    """No complete checkpoint where one was named (--run, --checkpoint)."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ConfigError, ShardError, DaliNotInstalledError)
