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
    """Samples of a tar by reading its headers: [[(ext, data offset, size, member name), ...], ...]."""
    try:
        with tarfile.open(shard, "r:") as tar:
            samples, last = [], None
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = split_name(member.name)
                if not ext or not key or key.endswith("/") or Path(key).name.startswith("."):
                    continue
                if key != last:
                    samples.append([])
                    last = key
                samples[-1].append((ext, member.offset_data, member.size, member.name))
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"{shard}: not a readable uncompressed tar ({e})") from e
    return samples


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

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}

    def __setstate__(self, state):
        self.__dict__.update(state, _cache=OrderedDict())

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
        """Sample j of shard s as [(ext, offset, size, member name), ...], loading the shard's index on a miss."""
        samples = self._cache.get(s)
        if samples is None:
            if len(self._cache) >= self.max_cached_shards:
                self._cache.popitem(last=False)
            samples = _IndexLines.read(self.shards[s])
            samples = self._cache[s] = self._counted(s, scan_tar(self.shards[s]) if samples is None else samples)
        else:
            self._cache.move_to_end(s)
        comps = samples[j]
        if comps is None:  # a line read_index would reject, which makes its callers read the tar: so do we
            samples = self._cache[s] = self._counted(s, scan_tar(self.shards[s]))
            comps = samples[j]
        return comps

    def _counted(self, s: int, samples):
        if len(samples) != self.counts[s]:
            raise ShardError(f"{self.shards[s]}: has {len(samples)} samples, but its {COUNT_SOURCES[self.sources[s]]} "
                             f"gave {self.counts[s]} when the loader was built: the manifest.json or index file is "
                             "stale, or the shard changed since (rewrite them with make-shards, or delete the .idx and "
                             "run check-shards)")
        return samples


class SampleReader:
    """Reads image bytes (zero-copy views of memory-mapped shards) and labels of a SampleTable; picklable."""

    def __init__(self, table: SampleTable, max_open: int = 256):
        self.table = table
        self.max_open = max_open
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getstate__(self):
        return {"table": self.table, "max_open": self.max_open}

    def __setstate__(self, state):
        self.__init__(state["table"], state["max_open"])

    def _map(self, s: int) -> np.ndarray:
        m = self._maps.get(s)
        if m is None:
            if len(self._maps) >= self.max_open:  # unmapped once the last view of it is gone
                self._maps.popitem(last=False)
            with open(self.table.shards[s], "rb") as f:
                m = self._maps[s] = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)
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


def _list_source(src: Path) -> tuple[list[tuple[Path, int]], list[str] | None]:
    """[(file, label)] from an ImageFolder tree (class sub-folders) or a flat folder (label -1), and the classes."""
    if not src.exists():
        raise FileNotFoundError(f"source folder not found: {src}")
    if not src.is_dir():
        raise NotADirectoryError(f"source is not a folder: {src}")

    def images(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SOURCE_EXTS)

    flat = images(src)
    classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = {c: sorted(p for p in (src / c).rglob("*") if p.is_file() and p.suffix.lower() in SOURCE_EXTS)
                 for c in classes}
    classes = [c for c in classes if per_class[c]]
    if classes and flat:
        raise ValueError(f"{src} mixes images at the top level ({flat[0].name}, ...) with class sub-folders "
                         f"({classes[0]}, ...): use one layout")
    if classes:
        return [(p, label) for label, c in enumerate(classes) for p in per_class[c]], classes
    if not flat:
        raise ValueError(f"no images (.{', .'.join(sorted(e[1:] for e in SOURCE_EXTS))}) in {src}")
    return [(p, -1) for p in flat], None


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shards(src, out, shard_size: int = 1000, prefix: str = "train", *, shuffle_seed: int | None = 0,
                 workers: int | None = None, progress: bool = True) -> dict:
    """ImageFolder tree or flat folder `src` -> `out/<prefix>-000000.tar` ... + index files + manifest.json.

    Every image is decoded once; JPEGs keep their bytes, other formats are re-encoded (quality 95).
    Undecodable files are skipped and listed with the reason. Samples are shuffled with `shuffle_seed`
    (None keeps the sorted order) so that every shard mixes classes. manifest.json holds one entry
    per prefix (several splits can share `out`); the entry for `prefix` is returned.
    """
    from tqdm import tqdm

    src, out = Path(src), Path(out)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
        raise ValueError(f"prefix must be letters, digits, '_', '-' or '.', got {prefix!r}")
    files, classes = _list_source(src)
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

    shards, skipped, used = [], [], set()
    tar, count = None, 0
    bar = tqdm(total=len(files), desc=f"make-shards {prefix}", unit="img", disable=not progress)
    try:
        for (path, label), (data, reason) in zip(files, loaded, strict=True):
            bar.update()
            if data is None:
                skipped.append({"path": str(path.relative_to(src)), "reason": reason})
                continue
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
        "labelled": classes is not None,
        "classes": classes,
        "shards": shards,
        "skipped": skipped,
    }
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


def _check_one(shard: str, decode: bool) -> tuple[list[dict], int, bool, list[list]]:
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
                reason = check_decodes(f.read(image[1]))
                if reason:
                    bad.append({"shard": shard, "key": key, "problem": f"undecodable image ({reason})"})
    return bad, len(samples), labelled, samples


def check_shards(pattern, *, decode: bool = True, write_missing_index: bool = True, progress: bool = True) -> dict:
    """Scan shards written by anyone (dinotron, webdataset.ShardWriter, plain tar) for bad samples.

    Reports samples without an image, with a non-integer .cls, missing a .cls while others have one,
    or whose image does not decode, each with shard and key; writes missing/stale DALI index files.
    Returns {"shards", "samples", "labelled", "bad": [{"shard", "key", "problem"}], "indexes_written"}.
    """
    from tqdm import tqdm

    paths = expand_shards(pattern)
    report = {"shards": len(paths), "samples": 0, "labelled": False, "bad": [], "indexes_written": []}
    unlabelled: list[tuple[str, str]] = []
    for shard in tqdm(paths, desc="check-shards", unit="shard", disable=not progress):
        try:
            bad, n, labelled, samples = _check_one(shard, decode)
        except ShardError as e:
            report["bad"].append({"shard": shard, "key": None, "problem": str(e)})
            continue
        report["bad"] += bad
        report["samples"] += n
        report["labelled"] |= labelled
        unlabelled += [(shard, split_name(c[0][3])[0]) for c in samples
                       if {x[0] for x in c} & set(IMAGE_EXTS) and all(x[0] != LABEL_EXT for x in c)]
        if write_missing_index and samples and read_index(shard) is None:
            try:
                report["indexes_written"].append(write_index(shard, samples))
            except (ShardError, OSError) as e:
                report["bad"].append({"shard": shard, "key": None, "problem": f"cannot write index: {e}"})
    if report["labelled"]:
        report["bad"] += [{"shard": s, "key": k, "problem": "no .cls label while other samples have one"}
                          for s, k in unlabelled]
    return report
