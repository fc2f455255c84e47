"""dinotron.pipeline: WebDataset shards, the DALI multi-crop graph and the torchvision baseline loader.

DALI itself is imported only when a DALI loader is built; where it is missing, building one raises
DaliNotInstalledError unless allow_fallback=True. Every loader's `backend` says what runs. The package needs the
`train` extra: without it, the import of dinotron.train below raises ImportError naming `pip install 'dinotron[train]'`.
"""
import dinotron.train  # noqa: F401  (the `train` extra's check, before the imports that need it)
from dinotron.pipeline.augment import MultiCropConfig
from dinotron.pipeline.dali_loader import (
    DaliNotInstalledError,
    EvalLoader,
    MultiCropLoader,
    build_eval_pipeline,
    build_multicrop_pipeline,
)
from dinotron.pipeline.loader import TooManyBadSamples
from dinotron.pipeline.shards import ShardError, check_shards, expand_shards, read_class_map, write_index, write_shards
from dinotron.pipeline.torchvision_loader import TorchvisionEvalLoader, TorchvisionMultiCropLoader

__all__ = [
    "DaliNotInstalledError",
    "EvalLoader",
    "MultiCropConfig",
    "MultiCropLoader",
    "ShardError",
    "TorchvisionEvalLoader",
    "TooManyBadSamples",
    "TorchvisionMultiCropLoader",
    "build_eval_pipeline",
    "build_multicrop_pipeline",
    "check_shards",
    "expand_shards",
    "read_class_map",
    "write_index",
    "write_shards",
]
