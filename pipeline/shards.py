"""WebDataset shards: brace patterns, DALI index files, the sample table, writing and checking shards.

A shard is a plain (uncompressed) tar whose members `<key>.<ext>` group into samples by key
(webdataset's convention: the extension is everything after the first dot of the basename). An image
is the first of `IMAGE_EXTS` present; `<key>.cls` holds the integer label as ASCII. Each shard can
have a DALI index file beside it (`train-000000.tar` -> `train-000000.idx`, format v1.2 as written by
DALI's `wds2idx`), which the loaders read instead of scanning the tar.

The loaders' SampleTable reads one number per shard when built, its sample count (from make-shards'
manifest.json where it still matches the file's size and mtime, else the index file's first line), and
a shard's index only when one of its samples is read, keeping the last MAX_CACHED_SHARDS of them. Built
over S shards of N samples it holds O(S) (paths, counts, cumulative starts), not O(N): ~115 bytes a
shard, plus ~70 bytes a sample of each cached index.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import mmap
import os
import random
import re
import tarfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
SOURCE_EXTS = {"." + e for e in IMAGE_EXTS} | {".gif", ".ppm", ".pgm"}
LABEL_EXT = "cls"
INDEX_VERSION = "v1.2"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dinotron-shards-1"
CLASSES = "classes.json"  # make-shards' class map, {class name: id}, beside the shards

log = logging.getLogger(__name__)


class ShardError(ValueError):
    """Bad shard data: the message names the shard and, where there is one, the sample key."""


# ----------------------------------------------------------------------------------------------
# Shard lists


def expand_shards(shards) -> list[str]:
    """Brace patterns (`train-{000000..001281}.tar`, `{a,b}.tar`), globs or lists of them -> paths.

    Raises ValueError for an empty list and FileNotFoundError naming the first missing path, before
    any reading starts.
    """
    from braceexpand import braceexpand

    if isinstance(shards, (str, os.PathLike)):
        shards = [shards]
    paths: list[str] = []
    for spec in shards:
        spec = os.fspath(spec)
        for path in braceexpand(spec):
            if any(c in path for c in "*?[") and not os.path.exists(path):
                matches = sorted(str(p) for p in Path(path).parent.glob(Path(path).name))
                if not matches:
                    raise FileNotFoundError(f"no shard matches {path!r}")
                paths.extend(matches)
            else:
                paths.append(path)
    if not paths:
        raise ValueError("the shard list is empty: give shard paths or brace patterns like "
                         "'train-{000000..000099}.tar'")
    for path in paths:
        if "://" in path or path.startswith("pipe:"):
            raise ValueError(f"shard {path!r}: only local (or mounted) files are supported, not URLs")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" ({len(missing)} of {len(paths)} shards missing)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more}")
    return paths


def index_path(shard: str) -> str:
    """The DALI index file of a shard: `x.tar` -> `x.idx`."""
    return shard[:-4] + ".idx" if shard.endswith(".tar") else shard + ".idx"


# ----------------------------------------------------------------------------------------------
# Members and index files


def split_name(name: str) -> tuple[str, str]:
    """`dir/abc.seg.jpg` -> (`dir/abc`, `seg.jpg`), as webdataset and DALI's wds2idx group members."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def scan_tar(shard: str) -> list[list[tuple[str, int, int, str]]]:
    """Samples of a tar by reading its headers: [[(ext, data offset, size, member name), ...], ...].

    tarfile ends its member list silently at the first header it cannot read past the first one (a bad checksum,
    a header overwritten with zeros), so a corrupted tar would read as a short one. Here whatever follows the last
    member must be the end-of-archive zero blocks: ShardError naming the shard, the byte offset and the member
    number otherwise, and where the file ends inside a member (a truncated tar).
    """
    size = os.path.getsize(shard)
    try:
        with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            samples, last, members, previous = [], None, 0, None
            for member in tar:
                members, previous = members + 1, member.name
                if member.offset_data + member.size > size:
                    raise ShardError(f"{shard}: truncated tar: member {members} ({member.name!r}, header at byte "
                                     f"{member.offset}) needs {member.offset_data + member.size} bytes, the file has "
                                     f"{size}")
                if not member.isreg():
                    continue
                key, ext = split_name(member.name)
                if not ext or not key or key.endswith("/") or Path(key).name.startswith("."):
                    continue
                if key != last:
                    samples.append([])
                    last = key
                samples[-1].append((ext, member.offset_data, member.size, member.name))
            problem = _tail_problem(f, tar.offset, size)
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"{shard}: not a readable uncompressed tar ({e})") from e
    if problem:
        after = f"after member {members} ({previous!r})" if previous else "before any member"
        raise ShardError(f"{shard}: corrupt tar: {problem}, {after}; the members from there on are unreadable "
                         "(rewrite the shard)")
    return samples


def _tail_problem(f, end: int, size: int) -> str | None:
    """None where the bytes of `f` from `end` (where tarfile stopped reading headers) to `size` are all zero, else
    what is there: an unreadable header, or data after an all-zero block (a header zeroed, or tars concatenated)."""
    f.seek(end)
    block = f.read(tarfile.BLOCKSIZE)
    if block.strip(b"\0"):
        try:
            tarfile.TarInfo.frombuf(block.ljust(tarfile.BLOCKSIZE, b"\0"), tarfile.ENCODING, "surrogateescape")
            reason = "not a tar header"
        except tarfile.HeaderError as e:
            reason = str(e)
        return f"unreadable member header at byte {end} ({reason})"
    pos = end + len(block)
    while pos < size:
        chunk = f.read(1 << 20)
        if not chunk:
            break
        nonzero = len(chunk) - len(chunk.lstrip(b"\0"))
        if nonzero < len(chunk):
            return (f"data at byte {pos + nonzero} after an all-zero block at byte {end} (a member header overwritten "
                    "with zeros, or tars concatenated)")
        pos += len(chunk)
    return None


def write_index(shard: str, samples=None) -> str:
    """Write the DALI index file (v1.2) of `shard`; returns its path."""
    samples = scan_tar(shard) if samples is None else samples
    if not samples:
        raise ShardError(f"{shard}: no samples (empty tar)")
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for components in samples:
        for c in components:
            if any(ch.isspace() for ch in c[3]):
                raise ShardError(f"{shard}: member {c[3]!r} has whitespace in its name; DALI index files cannot "
                                 "hold it")
        lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in components))
    path = index_path(shard)
    tmp = path + f".tmp{os.getpid()}"
    Path(tmp).write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def read_index(shard: str):
    """Samples from the shard's DALI index file, or None when it is absent or does not fit the shard."""
    path = index_path(shard)
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or int(head[1]) != len(lines) - 1:
        return None
    size = os.path.getsize(shard)
    samples = []
    for line in lines[1:]:
        tok = line.split()
        if not tok or len(tok) % 4:
            return None
        comps = [(tok[i], int(tok[i + 1]), int(tok[i + 2]), tok[i + 3]) for i in range(0, len(tok), 4)]
        if any(off + n > size for _, off, n, _ in comps):
            return None
        samples.append(comps)
    return samples


# ----------------------------------------------------------------------------------------------
# The sample table the loaders read from

# Shards a table keeps the index of, as SampleReader keeps 256 shards open: ~18 MB of index text at 1,000 samples a
# shard. Under a global shuffle nearly every sample misses (a batch of 256 touches ~256 shards), so misses are made
# cheap (one file read and a newline search, ~25 us for 1,000 samples) rather than rare.
MAX_CACHED_SHARDS = 256
# Where a shard's count came from (SampleTable.sources holds the position), named when its index later disagrees.
COUNT_SOURCES = ("manifest.json", "index file", "tar scan")
_FROM_MANIFEST, _FROM_INDEX, _FROM_TAR = range(3)


def _manifest_shards(directory: str, seen: dict) -> dict[str, tuple[dict, bool]]:
    """{shard file name: (its entry, labelled)} of `directory`/manifest.json ({} without one), cached in `seen`."""
    if directory not in seen:
        shards = {}
        try:
            manifest = json.loads(Path(directory or ".", MANIFEST).read_text())
            if manifest.get("format") == MANIFEST_FORMAT:
                for entry in manifest["prefixes"].values():
                    shards.update({s["path"]: (s, bool(entry["labelled"])) for s in entry["shards"]})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # absent, not JSON, or not ours
            shards = {}
        seen[directory] = shards
    return seen[directory]


def _index_count(shard: str) -> int | None:
    """The sample count on the first line of the shard's index file; None when it is absent or not v1.2."""
    try:
        with open(index_path(shard), "rb") as f:
            head = f.readline(64).split()
    except OSError:
        return None
    if len(head) != 2 or head[0] != INDEX_VERSION.encode() or not head[1].isdigit():
        return None
    return int(head[1])


class _IndexLines:
    """A shard's index file, held as its text and line ends; lines[j] parses sample j's line when asked:
    [(ext, offset, size, member name), ...], or None where the line is malformed or points past the end of the tar."""

    def __init__(self, data: bytes, shard_bytes: int):
        self.data = data if data.endswith(b"\n") else data + b"\n"
        self.ends = np.flatnonzero(np.frombuffer(self.data, np.uint8) == ord("\n"))  # ends[0] closes the header
        self.shard_bytes = shard_bytes

    @classmethod
    def read(cls, shard: str) -> _IndexLines | None:
        """The shard's index, or None where read_index would return None: absent, not v1.2, a count that is not its
        line count, or (checked on the last line only; the others when read) a sample past the end of the tar."""
        try:
            with open(index_path(shard), "rb") as f:
                lines = cls(f.read(), os.path.getsize(shard))
        except OSError:
            return None
        head = lines.data[:lines.ends[0]].split()
        if len(head) != 2 or head[0] != INDEX_VERSION.encode() or not head[1].isdigit() or int(head[1]) != len(lines):
            return None
        return lines if len(lines) and lines[len(lines) - 1] is not None else None

    def __len__(self) -> int:
        return len(self.ends) - 1

    def __getitem__(self, j: int) -> list[tuple[str, int, int, str]] | None:
        tok = self.data[self.ends[j] + 1:self.ends[j + 1]].split()
        if not tok or len(tok) % 4:
            return None
        try:
            comps = [(tok[k].decode(), int(tok[k + 1]), int(tok[k + 2]), tok[k + 3].decode())
                     for k in range(0, len(tok), 4)]
        except ValueError:  # not a number, or not UTF-8
            return None
        return None if any(off + n > self.shard_bytes for _, off, n, _ in comps) else comps


class SampleTable:
    """The samples of a shard list, in shard order: a count per shard up front, a shard's index when first needed.

    Global sample i is sample j of shard s, where starts[s] <= i < starts[s + 1] = starts[s] + counts[s]; sources[s]
    says where counts[s] came from (a position in COUNT_SOURCES). Built by `from_shards`; picklable (without its
    cache). Memory: O(S) for S shards, plus at most `max_cached_shards` indexes (~70 bytes a sample). A sample's
    line is parsed each time it is read: ~5 us from a cached index, ~25 us more on a miss (1,000-sample shards).
    """

    def __init__(self, shards: list[str], counts: np.ndarray, sources: np.ndarray,
                 max_cached_shards: int = MAX_CACHED_SHARDS):
        if max_cached_shards < 1:
            raise ValueError(f"max_cached_shards must be >= 1, got {max_cached_shards}")
        self.shards, self.counts, self.sources = shards, counts, sources
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (S + 1,)
        self.max_cached_shards = max_cached_shards
        self.labelled = False  # set by from_shards: whether samples carry a .cls label (all of them, or none)
        self._cache: OrderedDict[int, _IndexLines | list] = OrderedDict()
        self._lock = threading.Lock()  # the cache is shared by the background feeder's threads

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _cache=OrderedDict(), _lock=threading.Lock())

    def __len__(self) -> int:
        return int(self.starts[-1])

    @classmethod
    def from_shards(cls, shards, max_cached_shards: int = MAX_CACHED_SHARDS) -> SampleTable:
        """The table of `shards` (paths or patterns), reading one count per shard: from the manifest.json beside it
        when its entry matches the file's size and modification time (a copy that kept neither, or a shard written
        since, falls back), else from the first line of its index file, else (no usable index) from a scan of the
        tar's headers. `labelled` comes from the manifest, else from the first shard, whose every sample is checked
        here; other shards' samples are checked when read (an image, and a label where others have one).
        """
        paths = expand_shards(shards)
        counts, sources = np.zeros(len(paths), np.int64), np.zeros(len(paths), np.uint8)
        labelled = np.full(len(paths), -1, np.int8)  # from the manifest: 1 / 0, or -1 where it does not say
        manifests, scanned = {}, {}
        for s, path in enumerate(paths):
            entry, has_labels = _manifest_shards(os.path.dirname(path), manifests).get(os.path.basename(path),
                                                                                      (None, False))
            n, stat = None, os.stat(path)
            fits = entry and (entry.get("bytes"), entry.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns)
            if fits and isinstance(entry.get("count"), int):
                n, sources[s], labelled[s] = entry["count"], _FROM_MANIFEST, has_labels
            if n is None:
                n, sources[s] = _index_count(path), _FROM_INDEX
            if n is None:
                samples, sources[s] = scan_tar(path), _FROM_TAR
                n = len(samples)
                if len(scanned) < max_cached_shards:
                    scanned[s] = samples
            if n < 1:
                raise ShardError(f"{path}: no samples (empty tar)")
            counts[s] = n
        if scanned:
            log.debug("%d of %d shards have no usable index file (.idx): their tars were scanned (`dinotron "
                      "check-shards` writes the index files)", int((sources == _FROM_TAR).sum()), len(paths))
        table = cls(paths, counts, sources, max_cached_shards)
        table._cache.update(scanned)
        if labelled[0] >= 0:
            table.labelled = bool(labelled[0])
        else:
            table.labelled = any(ext == LABEL_EXT for ext, *_ in table._components(0, 0))
            table._check_shard(0)
        for s in np.flatnonzero((labelled >= 0) & (labelled != table.labelled)):
            table._check_shard(int(s))  # raises, naming its first sample, unless the manifest was wrong
        return table

    def locate(self, i: int) -> tuple[int, int]:
        """(shard number s, sample number j within it) of sample i."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} is out of range: the shards hold {len(self)} samples")
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return s, i - int(self.starts[s])

    def sample(self, i: int) -> tuple[int, int, int, int, int]:
        """(shard number, image offset, image size, label offset, label size) of sample i; label offset -1 where the
        shards are unlabelled. ShardError naming the sample where it has no image or breaks `labelled`."""
        s, j = self.locate(i)
        return (s, *self._checked_sample(s, j))

    def key(self, i: int) -> str:
        s, j = self.locate(i)
        return split_name(self._components(s, j)[0][3])[0]

    def where(self, i: int) -> str:
        return f"shard {self.shards[self.locate(i)[0]]}, sample {self.key(i)!r}"

    def cached_shards(self) -> list[int]:
        """Shard numbers whose index is held, least recently used first."""
        return list(self._cache)

    def _checked_sample(self, s: int, j: int) -> tuple[int, int, int, int]:
        comps = self._components(s, j)
        by_ext = {ext: (off, n) for ext, off, n, _ in comps}
        image = next((by_ext[e] for e in IMAGE_EXTS if e in by_ext), None)
        if image is None:
            raise ShardError(f"shard {self.shards[s]}, sample {split_name(comps[0][3])[0]!r}: no image component "
                             f"(one of .{', .'.join(IMAGE_EXTS)}); has {sorted(by_ext)}")
        label = by_ext.get(LABEL_EXT, (-1, 0))
        if (label[0] >= 0) != self.labelled:
            raise ShardError(f"shard {self.shards[s]}, sample {split_name(comps[0][3])[0]!r}: labels (.cls) are on "
                             "some samples but not all")
        return image[0], image[1], label[0], label[1]

    def _check_shard(self, s: int) -> None:
        for j in range(int(self.counts[s])):
            self._checked_sample(s, j)

    def _components(self, s: int, j: int) -> list[tuple[str, int, int, str]]:
        """Sample j of shard s as [(ext, offset, size, member name), ...], loading the shard's index on a miss.
        Thread-safe: the index is read outside the lock, so threads missing different shards read them at once."""
        with self._lock:
            samples = self._cache.get(s)
            if samples is not None:
                self._cache.move_to_end(s)
        if samples is None:
            samples = _IndexLines.read(self.shards[s])
            samples = self._store(s, self._counted(s, scan_tar(self.shards[s]) if samples is None else samples))
        comps = samples[j]
        if comps is None:  # a line read_index would reject, which makes its callers read the tar: so do we
            samples = self._store(s, self._counted(s, scan_tar(self.shards[s])), replace=True)
            comps = samples[j]
        return comps

    def _store(self, s: int, samples, replace: bool = False):
        with self._lock:
            if s in self._cache and not replace:  # another thread read it meanwhile
                self._cache.move_to_end(s)
                return self._cache[s]
            if s not in self._cache and len(self._cache) >= self.max_cached_shards:
                self._cache.popitem(last=False)
            self._cache[s] = samples
            return samples

    def _counted(self, s: int, samples):
        if len(samples) != self.counts[s]:
            raise ShardError(f"{self.shards[s]}: has {len(samples)} samples, but its {COUNT_SOURCES[self.sources[s]]} "
                             f"gave {self.counts[s]} when the loader was built: the manifest.json or index file is "
                             "stale, or the shard changed since (rewrite them with make-shards, or delete the .idx and "
                             "run check-shards)")
        return samples


class SampleReader:
    """Reads image bytes (zero-copy views of memory-mapped shards) and labels of a SampleTable; picklable."""

    def __init__(self, table: SampleTable, max_open: int = 256, sequential: bool = False):
        self.table = table
        self.max_open = max_open
        self.sequential = sequential  # whole shards are read in order: ask the kernel to read each ahead when mapped
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"table": self.table, "max_open": self.max_open, "sequential": self.sequential}

    def __setstate__(self, state):
        self.__init__(state["table"], state["max_open"], state.get("sequential", False))

    def _map(self, s: int) -> np.ndarray:
        with self._lock:
            m = self._maps.get(s)
            if m is None:
                if len(self._maps) >= self.max_open:  # unmapped once the last view of it is gone
                    self._maps.popitem(last=False)
                with open(self.table.shards[s], "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                if self.sequential and hasattr(mmap, "MADV_WILLNEED"):  # start reading the whole shard now
                    mm.madvise(mmap.MADV_SEQUENTIAL)
                    mm.madvise(mmap.MADV_WILLNEED)
                m = self._maps[s] = np.frombuffer(mm, np.uint8)
            else:
                self._maps.move_to_end(s)
            return m

    def _read(self, s: int, off: int, size: int, i: int) -> np.ndarray:
        data = self._map(s)[off:off + size]
        if len(data) != size:
            raise ShardError(f"{self.table.where(i)}: truncated shard (has {len(data)} of {size} bytes)")
        return data

    def image(self, i: int) -> np.ndarray:
        """The encoded image of sample i: a read-only uint8 view."""
        s, off, size, _, _ = self.table.sample(i)
        return self._read(s, off, size, i)

    def label(self, i: int) -> int:
        s, _, _, off, size = self.table.sample(i)
        raw = self._read(s, off, size, i).tobytes()
        try:
            return int(raw.decode().strip())
        except ValueError as e:
            raise ShardError(f"{self.table.where(i)}: .cls is not an integer ({raw[:20]!r})") from e

    def labels(self, ids) -> np.ndarray | None:
        if not self.table.labelled:
            return None
        return np.array([self.label(int(i)) for i in ids], np.int64)


def image_size(data) -> tuple[int, int] | None:
    """(height, width) from a JPEG's SOF header without decoding; None if not a baseline/progressive JPEG."""
    data = memoryview(data).cast("B")
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos, n = 2, len(data)
    while pos + 9 < n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h = (data[pos + 5] << 8) | data[pos + 6]
            w = (data[pos + 7] << 8) | data[pos + 8]
            return (h, w) if h and w else None
        pos += 2 + length
    return None


def decoded_size(data, where: str) -> tuple[int, int]:
    """(height, width) of an encoded image (JPEG header fast path, else PIL); ShardError naming `where` if
    unreadable."""
    size = image_size(data)
    if size is not None:
        return size
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.height, im.width
    except Exception as e:
        raise ShardError(f"{where}: undecodable image ({type(e).__name__}: {e})") from e


# The pixel limit of both loaders: PIL raises DecompressionBombError above 2 x Image.MAX_IMAGE_PIXELS (2 x 89,478,485),
# so the torchvision loader could not decode a larger image anyway; DALI would (a 13,500 x 13,500 JPEG, 182 Mpx, takes
# 547 MB as RGB). Checked from the header, before decoding, by the reading code both loaders share.
MAX_IMAGE_PIXELS = 2 * 89_478_485


def inspect_image(data, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[tuple[int, int] | None, str | None]:
    """((height, width), None) for an encoded image that may be decoded, else (size or None, why not), from its header
    alone: not an image format PIL knows, over `max_pixels` pixels, or a JPEG without its end-of-image marker (cut
    short). A JPEG's size comes from its SOF header, another format's from PIL's lazy open (no decoding). Costs one
    copy of the bytes (which reads them from disk, for the background feeder) and a search of them for the marker."""
    raw = bytes(data)
    size = image_size(raw)
    if size is None:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(raw)) as im:
                size = im.height, im.width
        except Image.DecompressionBombError as e:
            return None, f"image too large ({e})"
        except Exception as e:
            return None, f"undecodable image ({_reason(e)})"
    h, w = size
    if h * w > max_pixels:
        return size, f"image too large ({h} x {w} = {h * w:,} pixels, over max_image_pixels={max_pixels:,})"
    if raw[:2] == b"\xff\xd8" and raw.rfind(b"\xff\xd9") < 2:
        return size, "undecodable image (truncated JPEG: no end-of-image marker)"
    return size, None


def check_decodes(data) -> str | None:
    """None if PIL fully decodes `data` (bytes-like), else the reason."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return None
    except Exception as e:
        return _reason(e)


def _reason(e: Exception) -> str:
    from PIL import UnidentifiedImageError

    return "not a recognised image format" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------------
# make-shards


def _list_source(src: Path, class_map: dict[str, int] | None = None
                 ) -> tuple[list[tuple[Path, int]], dict[str, int] | None, list[str]]:
    """([(file, label)], {class name: id} or None, empty class folders) of an ImageFolder tree (class sub-folders;
    ids from `class_map`, else the sorted folder names numbered 0..C-1, empty folders included) or a flat folder
    (label -1, no map). ValueError naming the folders `class_map` does not hold."""
    if not src.exists():
        raise FileNotFoundError(f"source folder not found: {src}")
    if not src.is_dir():
        raise NotADirectoryError(f"source is not a folder: {src}")

    def images(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SOURCE_EXTS)

    flat = images(src)
    folders = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = {c: sorted(p for p in (src / c).rglob("*") if p.is_file() and p.suffix.lower() in SOURCE_EXTS)
                 for c in folders}
    classes = [c for c in folders if per_class[c]]
    empty = [c for c in folders if not per_class[c]]
    if classes and flat:
        raise ValueError(f"{src} mixes images at the top level ({flat[0].name}, ...) with class sub-folders "
                         f"({classes[0]}, ...): use one layout")
    if not classes:
        if not flat:
            raise ValueError(f"no images (.{', .'.join(sorted(e[1:] for e in SOURCE_EXTS))}) in {src}")
        if class_map is not None:
            raise ValueError(f"{src} is a flat folder (no class sub-folders): it takes no class map")
        if empty:
            log.info("%s: flat folder; ignoring %d sub-folders without images (%s)", src, len(empty), _few(empty))
        return [(p, -1) for p in flat], None, []
    if class_map is None:
        class_map = {c: k for k, c in enumerate(folders)}  # empty folders keep their ImageFolder id
    unknown = [c for c in folders if c not in class_map]
    if unknown:
        raise ValueError(f"{src}: {len(unknown)} class folders are not in the class map: {_few(unknown)} (give the "
                         "map of the split that has them, or remove the folders)")
    if empty:
        log.warning("%s: %d class folders hold no images and give no samples: %s", src, len(empty), _few(empty))
    return [(p, class_map[c]) for c in classes for p in per_class[c]], class_map, empty


def _few(names: list[str], n: int = 10) -> str:
    return ", ".join(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")


def read_class_map(path) -> dict[str, int]:
    """{class name: id} from a classes.json (as make-shards writes) or a manifest.json entry's "class_map";
    ValueError naming the file where it is not a mapping of names to distinct non-negative ints."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise FileNotFoundError(f"class map not found: {path} ({e.strerror or e})") from e
    except ValueError as e:
        raise ValueError(f"{path}: not a JSON class map ({e})") from e
    ok = isinstance(data, dict) and all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in data.items())
    if not ok or not data or len(set(data.values())) != len(data):
        raise ValueError(f"{path}: a class map is a JSON object of class names to distinct integer ids >= 0, like "
                         '{"cat": 0, "dog": 1}')
    return data


def _load_for_shard(path: Path) -> tuple[bytes | None, str | None]:
    """(JPEG bytes, None), original bytes when already an RGB/grey JPEG, or (None, reason) if undecodable."""
    from PIL import Image

    try:
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            if im.format == "JPEG" and im.mode in ("RGB", "L"):
                return raw, None
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="JPEG", quality=95)
            return buf.getvalue(), None
    except Exception as e:
        return None, _reason(e)


def _sample_key(rel: Path, used: set[str]) -> str:
    key = re.sub(r"[^A-Za-z0-9_-]", "_", str(rel.with_suffix("")).replace(os.sep, "_"))
    candidate, n = key, 1
    while candidate in used:
        candidate, n = f"{key}_{n}", n + 1
    used.add(candidate)
    return candidate


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # deterministic bytes -> reproducible sha256
    tar.addfile(info, io.BytesIO(data))


def _class_counts(labels_written: list[int], class_map: dict[str, int]) -> dict[str, int]:
    """{class name: samples written}, 0 for the map's classes this split lacks."""
    per_id = dict.fromkeys(class_map.values(), 0)
    for label in labels_written:
        per_id[label] += 1
    return {name: per_id[k] for name, k in class_map.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shards(src, out, shard_size: int = 1000, prefix: str = "train", *, shuffle_seed: int | None = 0,
                 workers: int | None = None, progress: bool = True, classes=None) -> dict:
    """ImageFolder tree or flat folder `src` -> `out/<prefix>-000000.tar` ... + index files + manifest.json
    (+ `out/classes.json` for a labelled tree).

    Every image is decoded once; JPEGs keep their bytes, other formats are re-encoded (quality 95).
    Undecodable files are skipped and listed with the reason. Samples are shuffled with `shuffle_seed`
    (None keeps the sorted order) so that every shard mixes classes. manifest.json holds one entry
    per prefix (several splits can share `out`); the entry for `prefix` is returned.

    classes: the class map, {name: id} or the path of a classes.json, so that a split gets another's ids (val
    takes train's); a class folder it does not hold is refused (ValueError naming it). Without it the sorted
    folder names are numbered 0..C-1 (empty folders included, as torchvision's ImageFolder numbers them). The map
    is written to `out/classes.json`; one already there that differs is refused, naming the fix. Class folders
    without images are logged and listed in the entry's "empty_classes".
    """
    from tqdm import tqdm

    src, out = Path(src), Path(out)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
        raise ValueError(f"prefix must be letters, digits, '_', '-' or '.', got {prefix!r}")
    if classes is not None and not isinstance(classes, dict):
        classes = read_class_map(classes)
    files, class_map, empty = _list_source(src, classes)
    class_file = out / CLASSES
    if class_map is not None and class_file.exists():
        try:
            held = read_class_map(class_file)
        except ValueError:
            held = None
        if held != class_map:
            raise ValueError(f"{class_file} holds another class map (another split's?): pass --classes {class_file} "
                             "so this split gets its ids, or write to another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".{prefix}-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write shards to {out}: {e.strerror or e}") from e
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(files)

    workers = (os.cpu_count() or 1) if workers is None else workers
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(files) > 64 else None
    paths = [p for p, _ in files]
    loaded = pool.map(_load_for_shard, paths, chunksize=16) if pool else map(_load_for_shard, paths)
    for stale in out.glob(f"{prefix}-*"):
        if re.fullmatch(re.escape(prefix) + r"-\d{6}\.(tar|idx)", stale.name):
            stale.unlink()

    shards, skipped, used, loaded_ok = [], [], set(), []
    tar, count = None, 0
    bar = tqdm(total=len(files), desc=f"make-shards {prefix}", unit="img", disable=not progress)
    try:
        for (path, label), (data, reason) in zip(files, loaded, strict=True):
            bar.update()
            if data is None:
                skipped.append({"path": str(path.relative_to(src)), "reason": reason})
                continue
            loaded_ok.append(label)
            if tar is None:
                shards.append({"path": f"{prefix}-{len(shards):06d}.tar"})
                tar, count = tarfile.open(out / shards[-1]["path"], "w", format=tarfile.USTAR_FORMAT), 0
            key = _sample_key(path.relative_to(src), used)
            _add_member(tar, f"{key}.jpg", data)
            if label >= 0:
                _add_member(tar, f"{key}.{LABEL_EXT}", str(label).encode())
            count += 1
            if count == shard_size:
                tar.close()
                shards[-1]["count"], tar = count, None
        if tar is not None:
            tar.close()
            shards[-1]["count"] = count
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    if not shards:
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
        raise ValueError(f"no decodable image in {src} ({len(skipped)} skipped: {reasons})")
    for s in shards:
        shard_path = out / s["path"]
        s["index"] = Path(write_index(str(shard_path))).name
        stat = shard_path.stat()
        s["bytes"], s["mtime_ns"] = stat.st_size, stat.st_mtime_ns  # the loaders trust "count" while both match
        s["sha256"] = _sha256(shard_path)

    entry = {
        "prefix": prefix,
        "source": str(src.resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "pattern": f"{prefix}-{{000000..{len(shards) - 1:06d}}}.tar",
        "num_samples": sum(s["count"] for s in shards),
        "shard_size": shard_size,
        "labelled": class_map is not None,
        # names by id; "class_map" has the ids themselves (from --classes they need not be 0..C-1)
        "classes": None if class_map is None else sorted(class_map, key=class_map.get),
        "class_map": class_map,
        "class_file": None if class_map is None else CLASSES,
        "class_counts": None if class_map is None else _class_counts(loaded_ok, class_map),
        "empty_classes": empty,
        "shards": shards,
        "skipped": skipped,
    }
    if class_map is not None and not class_file.exists():
        class_file.write_text(json.dumps(class_map, indent=1) + "\n")
    manifest_path = out / MANIFEST
    manifest = {"format": MANIFEST_FORMAT, "prefixes": {}}
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
            if old.get("format") == manifest["format"]:
                manifest = old
        except json.JSONDecodeError:
            pass
    manifest["prefixes"][prefix] = entry
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return entry


# ----------------------------------------------------------------------------------------------
# check-shards


def _check_one(shard: str, decode: bool, max_pixels: int) -> tuple[list[dict], int, bool, list[list]]:
    samples = scan_tar(shard)
    bad, labelled = [], False
    with open(shard, "rb") as f:
        for comps in samples:
            by_ext = {ext: (off, n) for ext, off, n, _ in comps}
            key = split_name(comps[0][3])[0]
            labelled |= LABEL_EXT in by_ext
            image = next((by_ext[e] for e in IMAGE_EXTS if e in by_ext), None)
            if image is None:
                bad.append({"shard": shard, "key": key, "problem": f"no image component (has {sorted(by_ext)})"})
                continue
            if LABEL_EXT in by_ext:
                f.seek(by_ext[LABEL_EXT][0])
                raw = f.read(by_ext[LABEL_EXT][1])
                if not raw.strip().lstrip(b"-").isdigit():
                    bad.append({"shard": shard, "key": key, "problem": f".cls is not an integer ({raw[:20]!r})"})
            if decode:
                f.seek(image[0])
                data = f.read(image[1])
                _, reason = inspect_image(data, max_pixels)
                if reason is None:
                    reason = check_decodes(data)
                    reason = reason and f"undecodable image ({reason})"
                if reason:
                    bad.append({"shard": shard, "key": key, "problem": reason})
    return bad, len(samples), labelled, samples


def check_shards(pattern, *, decode: bool = True, write_missing_index: bool = True, progress: bool = True,
                 max_image_pixels: int = MAX_IMAGE_PIXELS) -> dict:
    """Scan shards written by anyone (dinotron, webdataset.ShardWriter, plain tar) for bad samples.

    Reports samples without an image, with a non-integer .cls, missing a .cls while others have one,
    or whose image does not decode (or is over `max_image_pixels`), each with shard and key; a corrupt tar (a
    member header that does not read, see scan_tar) with shard and byte offset (key None); a sample count that
    differs from the shard's index file or manifest.json entry. Writes missing and stale DALI index files (not for
    a corrupt tar). Returns {"shards", "samples", "labelled", "bad": [{"shard", "key", "problem"}],
    "indexes_written"}.
    """
    from tqdm import tqdm

    paths = expand_shards(pattern)
    report = {"shards": len(paths), "samples": 0, "labelled": False, "bad": [], "indexes_written": []}
    unlabelled: list[tuple[str, str]] = []
    manifests: dict = {}
    for shard in tqdm(paths, desc="check-shards", unit="shard", disable=not progress):
        try:
            bad, n, labelled, samples = _check_one(shard, decode, max_image_pixels)
        except ShardError as e:
            report["bad"].append({"shard": shard, "key": None, "problem": str(e)})
            continue
        report["bad"] += bad
        report["samples"] += n
        report["labelled"] |= labelled
        unlabelled += [(shard, split_name(c[0][3])[0]) for c in samples
                       if {x[0] for x in c} & set(IMAGE_EXTS) and all(x[0] != LABEL_EXT for x in c)]
        entry = _manifest_shards(os.path.dirname(shard), manifests).get(os.path.basename(shard), ({}, False))[0]
        stat = os.stat(shard)
        if (entry.get("bytes"), entry.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns) and entry.get("count") != n:
            report["bad"].append({"shard": shard, "key": None, "problem": f"has {n} samples, its manifest.json entry "
                                  f"says {entry.get('count')}"})
        indexed = _index_count(shard)
        if indexed is not None and indexed != n:
            rewritten = " (rewritten)" if write_missing_index else ""
            report["bad"].append({"shard": shard, "key": None,
                                  "problem": f"has {n} samples, its index file lists {indexed}{rewritten}"})
        if write_missing_index and samples and read_index(shard) != samples:
            try:
                report["indexes_written"].append(write_index(shard, samples))
            except (ShardError, OSError) as e:
                report["bad"].append({"shard": shard, "key": None, "problem": f"cannot write index: {e}"})
    if report["labelled"]:
        report["bad"] += [{"shard": s, "key": k, "problem": "no .cls label while other samples have one"}
                          for s, k in unlabelled]
    return report
