"""dinotron.train: DINOv2 meta-architecture, schedules, training loop, checkpoints, evaluation and CLI.

It and dinotron.pipeline (which imports this file first) need the `train` extra. Without it, importing either raises
ImportError in one line naming the missing modules and `pip install 'dinotron[train]'`; the check only looks the
modules up (importlib.util.find_spec), so it imports none of them. DALI and Numba are not looked up here: the DALI
loaders import them when built and raise DaliNotInstalledError where they are missing.
"""
from importlib.util import find_spec

# The import names of the `train` extra's packages that dinotron.train and dinotron.pipeline import.
_TRAIN_EXTRA = ("torchvision", "timm", "braceexpand", "safetensors", "PIL", "tqdm", "yaml")
_missing = [name for name in _TRAIN_EXTRA if find_spec(name) is None]
if _missing:
    raise ImportError(f"dinotron.train and dinotron.pipeline need the `train` extra ({', '.join(_missing)} not "
                      "installed): pip install 'dinotron[train]'")
