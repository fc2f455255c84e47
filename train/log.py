"""The `dinotron` logger: every message of the package goes through it, shown on rank 0 by default.

Modules log to `logging.getLogger(__name__)` (`dinotron.kernels.*`, `dinotron.pipeline.*`,
`dinotron.train.*`, all children of `dinotron`), so a library user configures them like any other
logger. The command line calls `setup_logging()`, which adds one handler to `dinotron`: it writes
through `tqdm.write` (a progress bar is not torn by a message), prints INFO as plain lines and
WARNING and above with their level, and passes records of ranks other than 0 only at ERROR and above
unless `all_ranks=True`. What a command returns (JSON, reports) goes to stdout with print; messages to
stderr through this logger.
"""
from __future__ import annotations

import logging
import os
import sys

from tqdm import tqdm

LOGGER_NAME = "dinotron"


def current_rank() -> int:
    """torch.distributed's rank once initialised, else the launcher's RANK / SLURM_PROCID, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


class _RankFilter(logging.Filter):
    def __init__(self, all_ranks: bool):
        super().__init__()
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = current_rank()
        return self.all_ranks or record.rank == 0 or record.levelno >= logging.ERROR


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname}: {text}"
        return f"[rank {record.rank}] {text}" if record.rank else text


class _TqdmHandler(logging.Handler):
    """Writes to the current sys.stderr through tqdm.write, above any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(*, level: int | str = logging.INFO, all_ranks: bool = False) -> logging.Logger:
    """Installs (or replaces) the `dinotron` handler and returns the logger; idempotent."""
    logger = logging.getLogger(LOGGER_NAME)
    for h in [h for h in logger.handlers if isinstance(h, _TqdmHandler)]:
        logger.removeHandler(h)
    handler = _TqdmHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    handler.addFilter(_RankFilter(all_ranks))
    logger.addHandler(handler)
    logger.setLevel(level)
    return logger
