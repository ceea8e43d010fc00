"""Teacher-signal cache: one teacher pass writes each sample's attention signals to safetensors shards, and
:class:`CachedTeacher` replays them as a :class:`~drivekd.signals.types.TeacherSource`, so training from the
cache gives the losses of a live teacher (eqs. 11-16) without the teacher in memory.

A cache folder holds ``shard-00000.safetensors``, ... and ``index.json``. Per sample only its valid part is
stored, so a cache is independent of how samples were batched and padded:

* ``"{sample_id}/tv/{layer}"``: the (rows_b, V_b) text-to-vision block (eq. 12) of each tv layer, rows_b being
  the sample's valid :class:`~drivekd.data.roles.TVIndex` rows (text queries at or after its first vision token,
  in order) and V_b its vision keys in order;
* ``"{sample_id}/full/{layer}"``: the (L_b, L_b) head-mean map (eq. 10) of each full layer over its non-padding
  tokens. Full maps are L_b^2 values per layer and sample: they are optional because they dominate the size.

Layers are 0-based decoder indices (paper layer l is index l - 1), as in :class:`SignalNeeds`. ``index.json``
records the format version, the teacher (name, sha256 of ``model.config.to_json_string()``), the storage dtype,
the layers per kind, each shard's file, sha256 and byte size, and each sample's shard, byte size and token
fingerprint: the sha256 of its non-padding input ids and of its vision/text role masks, with their counts. The
fingerprint ties the cache to the tokenizer, processor (image size, tiling), chat template and data that made it;
a batch that tokenises a sample differently is refused instead of being given misplaced signals.

Shards are written to temporary files and renamed, and the index is written last (also via a rename), so an
interrupted write never leaves a folder that looks like a complete cache.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from transformers import PreTrainedModel

from drivekd.data.collate import Batch, VLMCollator
from drivekd.data.roles import TVIndex, TVRows
from drivekd.data.schema import Sample
from drivekd.errors import CacheError, DataError
from drivekd.fileio import write_atomically
from drivekd.models.families import family_of
from drivekd.signals.live import LiveTeacher
from drivekd.signals.types import SignalNeeds, TeacherSignals

FORMAT = "drivekd-teacher-cache"
VERSION = 1
INDEX_NAME = "index.json"
KINDS = ("tv", "full")
_SHARD_FILE = re.compile(r"shard-\d{5}\.safetensors(\.tmp)?")  # with the temporary files
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_REBUILD = "rebuild the cache with `drivekd cache-teacher`"


class Fingerprint(BaseModel):
    """What identifies a sample's token sequence: counts (for readable errors) and sha256 digests."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tokens: int
    vision: int
    text: int
    input_ids_sha256: str
    roles_sha256: str

    @classmethod
    def of(cls, batch: Batch, row: int) -> Fingerprint:
        """Fingerprint of sample ``row`` of ``batch`` over its non-padding tokens (either padding side)."""
        valid = ~batch.roles.padding[row]
        ids = batch.inputs["input_ids"][row][valid].to(device="cpu", dtype=torch.int64)
        vision = batch.roles.vision[row][valid].cpu()
        text = batch.roles.text[row][valid].cpu()
        roles = torch.stack([vision, text]).to(torch.uint8)
        return cls(
            tokens=int(valid.sum()),
            vision=int(vision.sum()),
            text=int(text.sum()),
            input_ids_sha256=hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest(),
            roles_sha256=hashlib.sha256(roles.numpy().tobytes()).hexdigest(),
        )

    def differences(self, batch: Fingerprint) -> list[str]:
        """How ``batch`` differs from this (cached) fingerprint, in words; empty when they match."""
        names = {"tokens": "tokens", "vision": "vision tokens", "text": "text tokens"}
        diffs = [
            f"{getattr(self, key)} {name} cached vs {getattr(batch, key)} in the batch"
            for key, name in names.items()
            if getattr(self, key) != getattr(batch, key)
        ]
        if self.input_ids_sha256 != batch.input_ids_sha256:
            diffs.append("different token ids")
        if self.roles_sha256 != batch.roles_sha256:
            diffs.append("different vision/text token positions")
        return diffs


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    sha256: str
    bytes: int
    samples: int


class SampleEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shard: str
    bytes: int  # tensor data bytes of the sample (all kinds)
    bytes_by_kind: dict[str, int]
    fingerprint: Fingerprint


class TeacherInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    config_sha256: str
    family: str
    num_layers: int


class CacheIndex(BaseModel):
    """The contents of ``index.json``."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["drivekd-teacher-cache"]
    version: int
    teacher: TeacherInfo
    dtype: str
    layers: dict[str, list[int]]  # kind -> 0-based decoder indices
    tv_rows: TVRows = "text"  # the text queries of the tv blocks (TVIndex.of_roles)
    shards: list[ShardEntry]
    samples: dict[str, SampleEntry]


@dataclass(frozen=True)
class CacheReport:
    """Sizes of a written cache. Per-sample and per-kind figures count tensor data bytes; ``shard_bytes`` is the
    size of the shard files on disk (tensor data plus safetensors headers)."""

    path: Path
    samples: int
    shards: int
    dtype: str
    layers: dict[str, list[int]]
    shard_bytes: int
    index_bytes: int
    bytes_by_kind: dict[str, int]
    bytes_per_sample_mean: float
    bytes_per_sample_max: int

    @property
    def bytes_total(self) -> int:
        """Everything the cache occupies on disk: shards and index."""
        return self.shard_bytes + self.index_bytes


def config_sha256(model: PreTrainedModel) -> str:
    """sha256 of the teacher's config as transformers serialises it (recorded in the index)."""
    return hashlib.sha256(model.config.to_json_string().encode()).hexdigest()


def write_cache(
    teacher: LiveTeacher | PreTrainedModel,
    samples: Iterable[Sample],
    collator: VLMCollator,
    out_dir: Path | str,
    *,
    needs: SignalNeeds,
    batch_size: int,
    teacher_name: str,
    dtype: torch.dtype = torch.float16,
    shard_samples: int = 256,
    max_shard_bytes: int = 1 << 30,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    tv_rows: TVRows = "text",
) -> CacheReport:
    """Run the teacher once over ``samples`` and write their ``needs`` (tv and full layers) to ``out_dir``.

    A shard is closed after ``shard_samples`` samples or once its tensors reach ``max_shard_bytes`` (full maps
    are large, and a shard is assembled in memory). An existing cache is replaced only with ``overwrite``; its
    index is removed first so that an interrupted rewrite leaves no index. ``progress`` is called with the number
    of samples of each finished batch. ``tv_rows`` picks the text queries of the tv blocks (``TVIndex.of_roles``;
    ``non_image`` for ``distill.normalisation=reference``).
    """
    _check_write_args(needs, batch_size, shard_samples, dtype)
    live = teacher if isinstance(teacher, LiveTeacher) else LiveTeacher(teacher)
    folder = Path(out_dir)
    index_path = folder / INDEX_NAME
    if index_path.exists():
        if not overwrite:
            raise CacheError(
                f"{folder} already holds a teacher cache: pass overwrite=True (--overwrite) to replace it, or "
                "write to another folder"
            )
        index_path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(folder, shard_samples, max_shard_bytes)
    device = next(live.model.parameters()).device
    seen: set[str] = set()
    for chunk in _chunks(samples, batch_size):
        for sample in chunk:
            if sample.id in seen:
                raise DataError(
                    "<samples>",
                    sample.id,
                    "id",
                    "duplicate sample id: the cache is keyed by sample id",
                    hint="give every sample a unique id",
                )
            seen.add(sample.id)
        batch = collator(chunk).to(device)
        index = TVIndex.of_roles(batch.roles, tv_rows)
        signals = live.signals(batch, index, needs)
        for row, sample_id in enumerate(batch.sample_ids):
            writer.add(sample_id, _sample_tensors(signals, batch, row, dtype), Fingerprint.of(batch, row))
        if progress is not None:
            progress(len(chunk))
    writer.flush()
    if not writer.samples:
        raise ValueError("no samples to cache")
    for stale in folder.iterdir():  # shards of an earlier cache, or left by a killed write
        if _SHARD_FILE.fullmatch(stale.name) and stale.name not in writer.files:
            stale.unlink()
    family = family_of(live.model)
    cache_index = CacheIndex(
        format=FORMAT,
        version=VERSION,
        teacher=TeacherInfo(
            name=teacher_name,
            config_sha256=config_sha256(live.model),
            family=family.name,
            num_layers=len(family.decoder_layers(live.model)),
        ),
        dtype=str(dtype).removeprefix("torch."),
        layers={"tv": sorted(needs.tv_layers), "full": sorted(needs.full_layers)},
        tv_rows=tv_rows,
        shards=writer.shards,
        samples=writer.samples,
    )
    write_atomically(index_path, lambda tmp: tmp.write_text(cache_index.model_dump_json(indent=1)))
    return _report(folder, cache_index)


class CachedTeacher:
    """Teacher signals read from a cache written by :func:`write_cache`; needs no model.

    ``signals`` returns tensors of ``dtype`` on the batch's device, laid out as a live teacher lays them out:
    tv blocks zero-padded to (B, Tq, Vk) by ``index``, full maps placed at each sample's non-padding positions of
    (B, L, L) (zero elsewhere; padding entries are masked out of every loss). ``map_location`` is where shard
    tensors are loaded. Each shard's sha256 is checked when it is first opened.
    """

    def __init__(
        self,
        cache_dir: Path | str,
        *,
        map_location: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.folder = Path(cache_dir)
        self.index = _read_index(self.folder)
        self.map_location = str(map_location)
        self.dtype = dtype
        self.tv_layers = frozenset(self.index.layers.get("tv", []))
        self.full_layers = frozenset(self.index.layers.get("full", []))
        self._shard_entries = {shard.file: shard for shard in self.index.shards}
        self._verified: set[str] = set()  # shard files whose size and checksum passed

    def __len__(self) -> int:
        return len(self.index.samples)

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self.index.samples

    @property
    def num_layers(self) -> int:
        """Decoder depth N of the teacher that wrote the cache (for paper-layer numbering)."""
        return self.index.teacher.num_layers

    def report(self) -> CacheReport:
        return _report(self.folder, self.index)

    def verify(self) -> None:
        """Check every shard's checksum now instead of on first use."""
        for shard in self.index.shards:
            self._verify(shard.file)

    def signals(self, batch: Batch, index: TVIndex, needs: SignalNeeds) -> TeacherSignals:
        entries = [self._entry(sample_id) for sample_id in batch.sample_ids]
        self._check_fingerprints(batch, entries)
        if needs.tv_layers:
            self._check_index(batch, index)
        tv = {k: self._tv(k, batch, index, entries) for k in sorted(needs.tv_layers & self.tv_layers)}
        full = _LazyMaps(
            needs.full_layers & self.full_layers,
            lambda k: self._full(k, batch, entries),
            keep=needs.full_group,
        )
        signals = TeacherSignals(index, tv, full)
        try:
            signals.check(needs)
        except KeyError as err:
            raise CacheError(
                f"cache {self.folder} cannot serve this batch: {err.args[0]}. It holds attention signals only, tv "
                f"layers {sorted(self.tv_layers)} and full layers {sorted(self.full_layers)} (0-based decoder "
                f"indices); {_REBUILD} and the layers you need (--layers), or use a live teacher"
            ) from None
        return signals

    def _entry(self, sample_id: str) -> SampleEntry:
        try:
            return self.index.samples[sample_id]
        except KeyError:
            raise CacheError(
                f"sample {sample_id!r} is not in cache {self.folder} ({len(self)} samples from teacher "
                f"{self.index.teacher.name!r}): cache the data set you train on"
            ) from None

    def _check_fingerprints(self, batch: Batch, entries: Sequence[SampleEntry]) -> None:
        for row, (sample_id, entry) in enumerate(zip(batch.sample_ids, entries, strict=True)):
            diffs = entry.fingerprint.differences(Fingerprint.of(batch, row))
            if diffs:
                raise CacheError(
                    f"sample {sample_id!r} does not match cache {self.folder}: {'; '.join(diffs)}. The tokenizer, "
                    "processor (image size, tiling), chat template, system prompt or the sample changed since the "
                    f"cache was written: {_REBUILD} using the collator you train with"
                )

    def _check_index(self, batch: Batch, index: TVIndex) -> None:
        """The cached blocks follow ``TVIndex.of_roles`` of the batch's roles with the cache's ``tv_rows``; ``index``
        must lay them out so."""
        rows = self.index.tv_rows
        expected = TVIndex.of_roles(batch.roles, rows)
        same = all(
            mine.shape == theirs.shape and torch.equal(mine.to(theirs.device), theirs)
            for mine, theirs in (
                (index.query_valid, expected.query_valid),
                (index.key_valid, expected.key_valid),
                (index.query_index * index.query_valid, expected.query_index * expected.query_valid),
                (index.key_index * index.key_valid, expected.key_index * expected.key_valid),
            )
        )
        if not same:
            raise CacheError(
                f"the TVIndex passed for this batch is not TVIndex.of_roles(batch.roles, {rows!r}), the layout of "
                f"the cached text-to-vision blocks of {self.folder} (tv_rows={rows!r}: queries at or after the first "
                "vision token, vision keys in order). Train with the distill.normalisation the cache was written "
                "for, or rewrite the cache with drivekd cache-teacher --tv-rows"
            )

    def _tv(self, layer: int, batch: Batch, index: TVIndex, entries: Sequence[SampleEntry]) -> torch.Tensor:
        device = index.query_index.device
        out = torch.zeros(*index.query_valid.shape, index.key_valid.shape[1], dtype=self.dtype, device=device)
        for row, (sample_id, entry) in enumerate(zip(batch.sample_ids, entries, strict=True)):
            block = self._tensor(entry, sample_id, f"tv/{layer}", device)
            shape = (int(index.query_valid[row].sum()), int(index.key_valid[row].sum()))
            self._check_shape(sample_id, f"tv/{layer}", block, shape)
            out[row, : shape[0], : shape[1]] = block
        return out

    def _full(self, layer: int, batch: Batch, entries: Sequence[SampleEntry]) -> torch.Tensor:
        padding = batch.roles.padding
        out = torch.zeros(*padding.shape, padding.shape[1], dtype=self.dtype, device=padding.device)
        for row, (sample_id, entry) in enumerate(zip(batch.sample_ids, entries, strict=True)):
            # A row is padded on one side, so its real tokens are one run: a slice, not an index grid (index_put
            # over L x L positions took 40% of a multi-teacher step on CPU).
            positions = (~padding[row]).nonzero().squeeze(1)
            start, n = (int(positions[0]), len(positions)) if len(positions) else (0, 0)
            if n and int(positions[-1]) - start + 1 != n:
                raise CacheError(
                    f"sample {sample_id!r} has padding between its tokens; collate it padded on one side"
                )
            block = self._tensor(entry, sample_id, f"full/{layer}", padding.device)
            self._check_shape(sample_id, f"full/{layer}", block, (n, n))
            out[row, start : start + n, start : start + n] = block
        return out

    def _check_shape(self, sample_id: str, name: str, block: torch.Tensor, shape: tuple[int, int]) -> None:
        if tuple(block.shape) != shape:
            raise CacheError(
                f"cached {name} of sample {sample_id!r} is {tuple(block.shape)} but the batch needs {shape}: "
                f"the cache is inconsistent with its fingerprints; {_REBUILD}"
            )

    def _tensor(self, entry: SampleEntry, sample_id: str, name: str, device: torch.device) -> torch.Tensor:
        try:
            with safe_open(self._verify(entry.shard), framework="pt", device=self.map_location) as shard:
                tensor = shard.get_tensor(f"{sample_id}/{name}")
        except SafetensorError:
            raise CacheError(
                f"shard {self.folder / entry.shard} has no tensor {sample_id}/{name} although the index lists "
                f"sample {sample_id!r} there: {_REBUILD}"
            ) from None
        return tensor.to(device=device, dtype=self.dtype)

    def _verify(self, file: str) -> Path:
        """The shard's path, its size and checksum checked on first use.

        Shards are opened per read and closed: a handle kept open would keep every page read through its memory
        map in this process's resident memory, so that a run over a large cache would hold much of it."""
        path = self.folder / file
        if file in self._verified:
            return path
        entry = self._shard_entries[file]
        if not path.is_file():
            raise CacheError(f"shard {path} listed in {self.folder / INDEX_NAME} is missing: {_REBUILD}")
        size = path.stat().st_size
        if size != entry.bytes:
            raise CacheError(f"corrupt shard {path}: {size} bytes, expected {entry.bytes}; {_REBUILD}")
        digest = _file_sha256(path)
        if digest != entry.sha256:
            raise CacheError(
                f"corrupt shard {path}: checksum sha256 {digest} expected {entry.sha256}; the file changed after "
                f"the cache was written: {_REBUILD}"
            )
        self._verified.add(file)
        return path


class _LazyMaps(Mapping[int, torch.Tensor]):
    """Full maps of a batch by teacher layer, read from the shard when asked for; the ``keep`` most recently used
    stay read.

    A (B, L, L) map per teacher layer is the largest signal; read lazily, a training step holds only the group a
    layer's target is built from, not every layer's map for the whole step. Keeping one group's worth (the largest
    group, ``SignalNeeds.full_group``) lets the next student layer's sliding group reuse the maps it shares with
    this one, so each map is read once per batch.
    """

    def __init__(self, layers: Iterable[int], load: Callable[[int], torch.Tensor], keep: int = 1) -> None:
        self._layers = frozenset(layers)
        self._load = load
        self._keep = max(1, keep)
        self._recent: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self._layers:
            raise KeyError(layer)
        if layer in self._recent:
            self._recent.move_to_end(layer)
            return self._recent[layer]
        self._recent[layer] = self._load(layer)
        if len(self._recent) > self._keep:
            self._recent.popitem(last=False)
        return self._recent[layer]

    def __contains__(self, layer: object) -> bool:  # Mapping's default reads the map
        return layer in self._layers

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._layers))

    def __len__(self) -> int:
        return len(self._layers)


class _ShardWriter:
    """Collect per-sample tensors and write them as shards (temporary file, then rename)."""

    def __init__(self, folder: Path, shard_samples: int, max_shard_bytes: int) -> None:
        self.folder = folder
        self.shard_samples = shard_samples
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[ShardEntry] = []
        self.samples: dict[str, SampleEntry] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self._pending: list[tuple[str, dict[str, int], Fingerprint]] = []
        self._bytes = 0

    @property
    def files(self) -> set[str]:
        return {shard.file for shard in self.shards}

    def add(self, sample_id: str, tensors: dict[str, torch.Tensor], fingerprint: Fingerprint) -> None:
        by_kind = {kind: 0 for kind in KINDS}
        for name, tensor in tensors.items():
            by_kind[name.split("/")[0]] += tensor.nbytes
            self._tensors[f"{sample_id}/{name}"] = tensor
        self._pending.append((sample_id, by_kind, fingerprint))
        self._bytes += sum(by_kind.values())
        if len(self._pending) >= self.shard_samples or self._bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        name = f"shard-{len(self.shards):05d}.safetensors"
        path = self.folder / name
        # Serialised in memory and written by Python, so the file gets the usual permissions (umask).
        data = save(self._tensors, metadata={"format": FORMAT, "version": str(VERSION)})
        write_atomically(path, lambda tmp: tmp.write_bytes(data))
        self.shards.append(
            ShardEntry(
                file=name,
                sha256=hashlib.sha256(data).hexdigest(),
                bytes=len(data),
                samples=len(self._pending),
            )
        )
        for sample_id, by_kind, fingerprint in self._pending:
            self.samples[sample_id] = SampleEntry(
                shard=name, bytes=sum(by_kind.values()), bytes_by_kind=by_kind, fingerprint=fingerprint
            )
        self._tensors, self._pending, self._bytes = {}, [], 0


def _sample_tensors(
    signals: TeacherSignals, batch: Batch, row: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The valid part of sample ``row``'s signals, as fresh contiguous CPU tensors of ``dtype``."""
    index = signals.index
    rows, keys = int(index.query_valid[row].sum()), int(index.key_valid[row].sum())
    positions = (~batch.roles.padding[row]).nonzero().squeeze(1)
    parts = {f"tv/{k}": m[row, :rows, :keys] for k, m in signals.tv.items()}
    parts |= {
        f"full/{k}": m[row].index_select(0, positions).index_select(1, positions)
        for k, m in signals.full.items()
    }
    # A fresh tensor per entry: views of one batch tensor would share storage, which safetensors refuses.
    return {name: torch.empty(t.shape, dtype=dtype).copy_(t) for name, t in parts.items()}


def _check_write_args(needs: SignalNeeds, batch_size: int, shard_samples: int, dtype: torch.dtype) -> None:
    if needs.hidden_layers or needs.logits:
        raise ValueError(
            "the cache stores attention signals (tv and full layers) only, not hidden states or logits"
        )
    if not needs.attention_layers:
        raise ValueError("nothing to cache: needs has no tv or full layers")
    if batch_size < 1 or shard_samples < 1:
        raise ValueError(f"batch_size and shard_samples must be >= 1, got {batch_size} and {shard_samples}")
    if dtype not in _DTYPES.values():
        raise ValueError(f"cache dtype must be one of {', '.join(_DTYPES)}, got {dtype}")


def _chunks(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_index(folder: Path) -> CacheIndex:
    path = folder / INDEX_NAME
    if not path.is_file():
        raise CacheError(
            f"{folder} has no {INDEX_NAME}: it is not a teacher cache, or its write was interrupted; {_REBUILD}"
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(f"{path} is not valid JSON ({err}); {_REBUILD}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CacheError(f"{path} is not a Drive-KD teacher-cache index (format {FORMAT!r}); {_REBUILD}")
    if raw.get("version") != VERSION:
        raise CacheError(
            f"{path} has format version {raw.get('version')!r}, this drivekd reads version {VERSION}; {_REBUILD}"
        )
    try:
        index = CacheIndex.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise CacheError(f"{path} is malformed ({problems}); {_REBUILD}") from None
    if unknown := sorted(set(index.layers) - set(KINDS)):
        raise CacheError(f"{path} lists unknown layer kinds {unknown}; {_REBUILD}")
    files = {shard.file for shard in index.shards}
    if stray := sorted({entry.shard for entry in index.samples.values()} - files):
        raise CacheError(f"{path} places samples in shards it does not list: {stray}; {_REBUILD}")
    return index


def _report(folder: Path, index: CacheIndex) -> CacheReport:
    per_sample = [entry.bytes for entry in index.samples.values()]
    return CacheReport(
        path=folder,
        samples=len(index.samples),
        shards=len(index.shards),
        dtype=index.dtype,
        layers=index.layers,
        shard_bytes=sum((folder / shard.file).stat().st_size for shard in index.shards),
        index_bytes=(folder / INDEX_NAME).stat().st_size,
        bytes_by_kind={
            kind: sum(entry.bytes_by_kind.get(kind, 0) for entry in index.samples.values()) for kind in KINDS
        },
        bytes_per_sample_mean=sum(per_sample) / max(len(per_sample), 1),
        bytes_per_sample_max=max(per_sample, default=0),
    )
