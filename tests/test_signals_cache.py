"""The teacher-signal cache: cached signals and losses equal a live teacher's, bad caches are clear errors.

A tiny teacher is run on synthetic samples of different lengths; caches are written with batches of 3 and read
with batches of 2 in another order, for left and right padding. A live teacher's maps depend on the batch they
are computed in by float32 rounding (measured: up to 2e-9 between batches), so cached signals are compared
exactly with the teacher's output at write time, and within 1e-6 with a live teacher on the read batch.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import typer
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from drivekd.data.collate import Batch, VLMCollator
from drivekd.data.roles import TVIndex
from drivekd.data.schema import Sample, read_jsonl, write_jsonl
from drivekd.data.synthetic import generate_split
from drivekd.errors import CacheError, DataError
from drivekd.losses import full_attention_mse, text_to_vision_mse_blocks
from drivekd.models.pair import ModelPair, build_tiny_pair
from drivekd.signals import CachedTeacher, LiveTeacher, SignalNeeds, TeacherSignals, write_cache
from drivekd.signals import cli as signals_cli
from drivekd.signals.cache import INDEX_NAME, config_sha256
from drivekd.signals.cli import cache_teacher_cmd, estimate_full_bytes, parse_layer_spec

FAMILY = "qwen2_5_vl"
NEEDS = SignalNeeds(tv_layers=frozenset({0, 4}), full_layers=frozenset({0, 3}))  # layer 0 both ways
WRITE_ORDER = [[0, 1, 2], [3, 4]]  # batch_size 3
READ_ORDER = [[4, 1], [0, 3], [2]]  # batches of 2, another order and other partners
LIVE_TOLERANCE = 1e-6
HALF_EPS, HALF_TINY = 2.0**-11, 2.0**-24  # fp16 round-to-nearest: relative half-ulp, subnormal spacing


class RecordingTeacher(LiveTeacher):
    """A live teacher that keeps what it returned, as the reference of what the cache must reproduce."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.seen: list[tuple[Batch, TeacherSignals]] = []

    def signals(self, batch: Batch, index: TVIndex, needs: SignalNeeds) -> TeacherSignals:
        out = super().signals(batch, index, needs)
        self.seen.append((batch, out))
        return out


@dataclass
class Written:
    """Caches written for one padding side, the teacher's output at write time and a live teacher on read batches."""

    side: str
    pair: ModelPair
    root: Path
    samples: list[Sample]
    collator: VLMCollator
    caches: dict[torch.dtype, Path]
    reports: dict
    at_write: dict[str, dict[str, torch.Tensor]]  # sample id -> "tv/k" | "full/k" -> its valid part, float32
    write_batches: list[tuple[Batch, TeacherSignals]]
    read_batches: list[tuple[Batch, TeacherSignals]]

    def read(self, batch: Batch, dtype: torch.dtype = torch.float32) -> TeacherSignals:
        return CachedTeacher(self.caches[dtype]).signals(batch, _index(batch), NEEDS)


def _index(batch: Batch) -> TVIndex:
    return TVIndex.from_masks(batch.roles.text, batch.roles.vision)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, list[Sample]]:
    """Four single-view samples of different lengths and one six-camera sample."""
    root = tmp_path_factory.mktemp("synth")
    samples = list(read_jsonl(generate_split(root, n_scenes=1, seed=0).path))
    single = [s for s in samples if len(s.images) == 1][:4]
    multi = [s for s in samples if len(s.images) == 6][:1]
    return root, single + multi


@pytest.fixture(scope="module")
def write(synth, tmp_path_factory) -> Callable[[str], Written]:
    """Caches for a padding side, written once per module."""
    made: dict[str, Written] = {}

    def get(side: str) -> Written:
        if side not in made:
            made[side] = _write(side, *synth, tmp_path_factory.mktemp(f"cache-{side}"))
        return made[side]

    return get


@pytest.fixture(scope="module", params=["left", "right"])
def written(request, write) -> Written:
    return write(request.param)


@pytest.fixture(scope="module")
def right(write) -> Written:
    """For checks that do not depend on the padding side."""
    return write("right")


def _write(side: str, root: Path, samples: list[Sample], folder: Path) -> Written:
    pair = build_tiny_pair(FAMILY)
    collator = pair.collators(root, padding_side=side)[0]
    caches, reports, recorded = {}, {}, {}
    ordered = [samples[i] for batch in WRITE_ORDER for i in batch]
    for dtype in (torch.float32, torch.float16):
        teacher = RecordingTeacher(pair.teacher)
        caches[dtype] = folder / str(dtype)
        reports[dtype] = write_cache(
            teacher,
            ordered,
            collator,
            caches[dtype],
            needs=NEEDS,
            batch_size=3,
            teacher_name="tiny",
            dtype=dtype,
        )
        recorded[dtype] = teacher.seen
    at_write = {}
    for batch, signals in recorded[torch.float32]:
        assert batch.roles.padding.any(), "write batches must be padded"
        for row, sample_id in enumerate(batch.sample_ids):
            at_write[sample_id] = _valid_parts(batch, signals, row)
    live = LiveTeacher(pair.teacher)
    read_batches = []
    for order in READ_ORDER:
        batch = collator([samples[i] for i in order])
        read_batches.append((batch, live.signals(batch, _index(batch), NEEDS)))
    return Written(
        side, pair, root, samples, collator, caches, reports, at_write, recorded[torch.float32], read_batches
    )


def _valid_parts(batch: Batch, signals: TeacherSignals, row: int) -> dict[str, torch.Tensor]:
    """A sample's signals without padding: tv rows/keys by the index's valid flags, full maps by non-padding."""
    index = signals.index
    query_rows = index.query_valid[row].nonzero().squeeze(1)
    key_cols = index.key_valid[row].nonzero().squeeze(1)
    tokens = (~batch.roles.padding[row]).nonzero().squeeze(1)
    parts = {f"tv/{k}": m[row][query_rows][:, key_cols] for k, m in signals.tv.items()}
    parts |= {f"full/{k}": m[row][tokens][:, tokens] for k, m in signals.full.items()}
    return {name: t.clone() for name, t in parts.items()}


def _assert_placed_exactly(written: Written, batch: Batch, cached: TeacherSignals, cast: torch.dtype) -> None:
    """Each sample's cached part equals the write-time one (rounded to ``cast``); everything else is zero."""
    for row, sample_id in enumerate(batch.sample_ids):
        expected = {name: t.to(cast).float() for name, t in written.at_write[sample_id].items()}
        assert _valid_parts(batch, cached, row).keys() == expected.keys()
        for name, part in _valid_parts(batch, cached, row).items():
            assert torch.equal(part, expected[name]), f"{written.side} {sample_id} {name}"
    pairs = cached.index.pair_mask
    valid = batch.roles.valid
    outside_full = ~(valid.unsqueeze(2) & valid.unsqueeze(1))
    for block in cached.tv.values():
        assert block.dtype == torch.float32 and not block[~pairs].any()
    for full in cached.full.values():
        assert full.dtype == torch.float32 and not full[outside_full].any()


def _assert_close_to_live(
    cached: TeacherSignals, live: TeacherSignals, valid: torch.Tensor, half: bool
) -> None:
    """Cached vs live on the same batch: whole tv blocks, and the non-padding query rows of full maps (the rows
    every loss reads; a live teacher's padding rows hold whatever SDPA gives them)."""
    pairs = [(cached.tv[k], live.tv[k]) for k in NEEDS.tv_layers]
    pairs += [(cached.full[k][valid], live.full[k][valid]) for k in NEEDS.full_layers]
    for mine, theirs in pairs:
        assert mine.shape == theirs.shape
        bound = LIVE_TOLERANCE + ((HALF_EPS * theirs.abs() + HALF_TINY) if half else 0)
        assert ((mine - theirs).abs() <= bound).all()


def test_cached_signals_equal_the_teacher_float32(written):
    for batch, live in written.write_batches:  # read in the batches they were written in: bitwise equal
        cached = written.read(batch)
        _assert_placed_exactly(written, batch, cached, torch.float32)
        for k in NEEDS.tv_layers:
            assert torch.equal(cached.tv[k], live.tv[k])
        for k in NEEDS.full_layers:
            assert torch.equal(cached.full[k][batch.roles.valid], live.full[k][batch.roles.valid])
    for batch, live in written.read_batches:  # other partners, order and padding
        assert batch.roles.padding.any() or len(batch.sample_ids) == 1
        cached = written.read(batch)
        _assert_placed_exactly(written, batch, cached, torch.float32)
        _assert_close_to_live(cached, live, batch.roles.valid, half=False)
    # The cache does not depend on the padding side it was written with.
    opposite = written.pair.collators(
        written.root, padding_side="right" if written.side == "left" else "left"
    )[0]
    for order in READ_ORDER:
        batch = opposite([written.samples[i] for i in order])
        _assert_placed_exactly(written, batch, written.read(batch), torch.float32)


def test_cached_signals_equal_the_teacher_float16(written):
    for batch, live in written.read_batches:
        cached = written.read(batch, torch.float16)
        _assert_placed_exactly(written, batch, cached, torch.float16)
        _assert_close_to_live(cached, live, batch.roles.valid, half=True)
    assert not all(  # the fp16 cache is really rounded
        torch.equal(t, t.half().float()) for parts in written.at_write.values() for t in parts.values()
    )


def _losses(batch: Batch, student: dict[str, torch.Tensor], teacher: TeacherSignals) -> list[torch.Tensor]:
    index, valid = _index(batch), batch.roles.valid
    losses = [
        text_to_vision_mse_blocks(student[f"tv/{k}"], teacher.tv[k], index) for k in sorted(NEEDS.tv_layers)
    ]
    losses += [
        full_attention_mse(student[f"full/{k}"], teacher.full[k], valid) for k in sorted(NEEDS.full_layers)
    ]
    return losses


def _student_near(live: TeacherSignals, seed: int) -> dict[str, torch.Tensor]:
    """A student close to the teacher, so that the losses are sensitive to any teacher error."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"tv/{k}": m for k, m in live.tv.items()} | {f"full/{k}": m for k, m in live.full.items()}
    return {name: m * (1 + 0.05 * torch.randn(m.shape, generator=generator)) for name, m in tensors.items()}


def test_losses_from_the_cache_equal_those_from_the_live_teacher(written):
    for seed, (batch, live) in enumerate(written.write_batches):
        student = _student_near(live, seed)
        for mine, theirs in zip(
            _losses(batch, student, written.read(batch)), _losses(batch, student, live), strict=True
        ):
            assert mine.item() > 0 and mine.item() == theirs.item()
    for seed, (batch, live) in enumerate(written.read_batches):
        student = _student_near(live, seed)
        reference = _losses(batch, student, live)
        for dtype, rel in ((torch.float32, 1e-5), (torch.float16, 1e-2)):
            for mine, theirs in zip(
                _losses(batch, student, written.read(batch, dtype)), reference, strict=True
            ):
                assert mine.item() == pytest.approx(theirs.item(), rel=rel)


def test_reader_never_touches_a_model(written, monkeypatch):
    batch, _ = written.read_batches[0]
    expected = written.read(batch)

    def refuse(*args, **kwargs):
        raise AssertionError("the cache reader ran or loaded a model")

    monkeypatch.setattr(torch.nn.Module, "__call__", refuse)
    monkeypatch.setattr("transformers.PreTrainedModel.from_pretrained", refuse)
    cached = CachedTeacher(written.caches[torch.float32])
    cached.verify()
    signals = cached.signals(batch, _index(batch), NEEDS)
    assert all(torch.equal(signals.tv[k], expected.tv[k]) for k in NEEDS.tv_layers)
    assert all(torch.equal(signals.full[k], expected.full[k]) for k in NEEDS.full_layers)


def test_sliding_groups_read_each_full_map_once_per_batch(written, monkeypatch):
    """Targets of sliding teacher-layer groups ask for the same maps again; a membership test reads nothing and
    the maps of the last group (SignalNeeds.full_group) stay read, so each map is read once per batch and equals a
    fresh read."""
    batch, _ = written.read_batches[0]
    layers = sorted(NEEDS.full_layers)
    groups = [layers[:1], layers, layers[1:], layers]  # groups of one and two sliding over the cached layers
    fresh = written.read(batch).full
    expected = {k: fresh[k] for k in layers}  # read before counting starts
    reads: list[str] = []
    original = CachedTeacher._tensor

    def counted(self, entry, sample_id, name, device):
        reads.append(name)
        return original(self, entry, sample_id, name, device)

    monkeypatch.setattr(CachedTeacher, "_tensor", counted)
    needs = SignalNeeds(full_layers=NEEDS.full_layers, full_group=2)
    full = CachedTeacher(written.caches[torch.float32]).signals(batch, _index(batch), needs).full
    assert all(k in full for k in layers) and -1 not in full and not reads
    for group in groups:
        for k in group:
            assert torch.equal(full[k], expected[k])
    assert sorted(reads) == sorted(f"full/{k}" for k in layers for _ in batch.sample_ids), reads


def _tensor_data_bytes(shard: Path) -> int:
    """A safetensors file is an 8-byte little-endian header length, the JSON header, then the tensor data."""
    raw = shard.read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[:8], "little")


def test_size_report_equals_the_bytes_on_disk(written):
    for dtype, report in written.reports.items():
        folder = written.caches[dtype]
        files = sorted(folder.iterdir())
        shards = [f for f in files if f.suffix == ".safetensors"]
        assert [f.name for f in files if f not in shards] == [INDEX_NAME]
        assert report.bytes_total == sum(f.stat().st_size for f in files)
        assert report.shard_bytes == sum(f.stat().st_size for f in shards)
        assert report.index_bytes == (folder / INDEX_NAME).stat().st_size
        assert sum(report.bytes_by_kind.values()) == sum(_tensor_data_bytes(f) for f in shards)
        # What each sample stores, from the write-time valid parts.
        itemsize = dtype.itemsize
        per_sample = {sid: {kind: 0 for kind in ("tv", "full")} for sid in written.at_write}
        for sample_id, parts in written.at_write.items():
            for name, t in parts.items():
                per_sample[sample_id][name.split("/")[0]] += t.numel() * itemsize
        totals = [sum(kinds.values()) for kinds in per_sample.values()]
        assert report.samples == len(written.samples) == len(totals)
        assert report.bytes_by_kind == {
            kind: sum(k[kind] for k in per_sample.values()) for kind in ("tv", "full")
        }
        assert report.bytes_per_sample_mean == pytest.approx(sum(totals) / len(totals))
        assert report.bytes_per_sample_max == max(totals)
        index = json.loads((folder / INDEX_NAME).read_text())
        assert {sid: entry["bytes"] for sid, entry in index["samples"].items()} == dict(
            zip(per_sample, totals, strict=True)
        )
        assert index["dtype"] == str(dtype).removeprefix("torch.")
        assert index["teacher"]["config_sha256"] == config_sha256(written.pair.teacher)
    half, single = written.reports[torch.float16], written.reports[torch.float32]
    assert {k: 2 * v for k, v in half.bytes_by_kind.items()} == single.bytes_by_kind


def _copy(written: Written, tmp_path: Path) -> Path:
    return Path(shutil.copytree(written.caches[torch.float32], tmp_path / "cache"))


def test_corrupt_missing_or_truncated_shard_is_a_clear_error(right, tmp_path):
    batch, _ = right.read_batches[0]
    folder = _copy(right, tmp_path)
    shard = folder / "shard-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x01  # one bit of tensor data
    shard.write_bytes(bytes(raw))
    with pytest.raises(
        CacheError, match=r"corrupt shard .*shard-00000\.safetensors: checksum sha256 \w+ expected"
    ):
        CachedTeacher(folder).signals(batch, _index(batch), NEEDS)
    with pytest.raises(CacheError, match="corrupt shard"):
        CachedTeacher(folder).verify()
    shard.write_bytes(bytes(raw[:-10]))
    with pytest.raises(CacheError, match=r"corrupt shard .*: \d+ bytes, expected \d+"):
        CachedTeacher(folder).verify()
    shard.unlink()
    with pytest.raises(CacheError, match=r"shard-00000\.safetensors listed in .* is missing"):
        CachedTeacher(folder).verify()


def test_mismatched_batch_is_a_clear_error(right, tmp_path):
    cache = CachedTeacher(right.caches[torch.float32])
    samples = right.samples[:2]
    # Another processor image size: other vision-token counts.
    other = build_tiny_pair(FAMILY, image_size=(168, 98))
    collator = VLMCollator(
        other.teacher_processor, other.family.image_token_id(other.teacher), image_root=right.root
    )
    batch = collator(samples)
    with pytest.raises(
        CacheError, match=rf"sample '{samples[0].id}'.*vision tokens cached vs .*rebuild the cache"
    ):
        cache.signals(batch, _index(batch), NEEDS)
    # The same id with another question: other token ids.
    changed = samples[0].model_copy(update={"question": samples[0].question + " Be brief."})
    batch = right.collator([changed])
    with pytest.raises(CacheError, match=rf"sample '{changed.id}'.*different token ids"):
        cache.signals(batch, _index(batch), NEEDS)
    # A sample that was never cached.
    stranger = samples[0].model_copy(update={"id": "never-cached"})
    batch = right.collator([stranger])
    with pytest.raises(CacheError, match="sample 'never-cached' is not in cache"):
        cache.signals(batch, _index(batch), NEEDS)
    # Layers or signals that are not in the cache.
    batch = right.collator(samples)
    for needs, what in (
        (SignalNeeds(tv_layers=frozenset({2})), "tv layer 2"),
        (SignalNeeds(full_layers=frozenset({1})), "full layer 1"),
        (SignalNeeds(hidden_layers=frozenset({1})), "hidden layer 1"),
        (SignalNeeds(logits=True), "logits"),
    ):
        with pytest.raises(CacheError, match=rf"lack {what}.*tv layers \[0, 4\] and full layers \[0, 3\]"):
            cache.signals(batch, _index(batch), needs)
    # An index laid out otherwise than the cached blocks.
    index = TVIndex.from_masks(batch.roles.text, batch.roles.vision, skip_leading=False)
    with pytest.raises(CacheError, match="TVIndex passed for this batch"):
        cache.signals(batch, index, NEEDS)


def test_broken_index_is_a_clear_error(right, tmp_path):
    folder = _copy(right, tmp_path)
    index = json.loads((folder / INDEX_NAME).read_text())
    (folder / INDEX_NAME).write_text(json.dumps(index | {"version": 99}))
    with pytest.raises(CacheError, match="format version 99"):
        CachedTeacher(folder)
    del index["shards"]
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CacheError, match=r"malformed.*shards"):
        CachedTeacher(folder)
    (folder / INDEX_NAME).write_text("{")
    with pytest.raises(CacheError, match="not valid JSON"):
        CachedTeacher(folder)
    with pytest.raises(CacheError, match=r"no index.json"):
        CachedTeacher(tmp_path / "nowhere")


def _interrupted(samples: list[Sample], after: int):
    """The samples, then a failure after ``after`` of them (as if the run was stopped)."""
    yield from samples[:after]
    raise KeyboardInterrupt


def test_interrupted_write_leaves_no_index(right, tmp_path):
    short = right.samples[:3]
    folder = tmp_path / "cache"
    teacher = LiveTeacher(right.pair.teacher)
    args = {"needs": NEEDS, "batch_size": 1, "shard_samples": 1, "teacher_name": "tiny"}
    with pytest.raises(KeyboardInterrupt):
        write_cache(teacher, _interrupted(short, 1), right.collator, folder, **args)
    assert [f.name for f in folder.iterdir()] == [
        "shard-00000.safetensors"
    ]  # a shard, no index, no temp file
    with pytest.raises(CacheError, match=r"no index.json.*interrupted"):
        CachedTeacher(folder)
    # An existing cache is kept unless overwrite is asked for; an interrupted overwrite leaves no index.
    existing = _copy(right, tmp_path / "existing")
    before = sorted((f.name, f.read_bytes()) for f in existing.iterdir())
    with pytest.raises(CacheError, match=r"already holds a teacher cache.*overwrite"):
        write_cache(teacher, short, right.collator, existing, **args)
    assert sorted((f.name, f.read_bytes()) for f in existing.iterdir()) == before
    with pytest.raises(KeyboardInterrupt):
        write_cache(teacher, _interrupted(short, 1), right.collator, existing, overwrite=True, **args)
    assert not (existing / INDEX_NAME).exists() and not list(existing.glob("*.tmp"))
    # A completed overwrite drops the old cache's extra shards and temporary files a killed write left behind.
    (existing / "shard-00009.safetensors.tmp").write_bytes(b"partial")
    report = write_cache(teacher, short[:1], right.collator, existing, overwrite=True, **args)
    assert sorted(f.name for f in existing.iterdir()) == [INDEX_NAME, "shard-00000.safetensors"]
    assert report.samples == 1 and len(CachedTeacher(existing)) == 1


def test_write_refuses_duplicate_ids_and_uncacheable_needs(right, tmp_path):
    teacher = LiveTeacher(right.pair.teacher)
    twice = [right.samples[0], right.samples[0]]
    args = {"batch_size": 2, "teacher_name": "tiny"}
    with pytest.raises(DataError, match="duplicate sample id"):
        write_cache(teacher, twice, right.collator, tmp_path / "a", needs=NEEDS, **args)
    for needs in (SignalNeeds(), SignalNeeds(tv_layers=frozenset({0}), logits=True)):
        with pytest.raises(ValueError, match=r"attention signals|nothing to cache"):
            write_cache(teacher, right.samples, right.collator, tmp_path / "b", needs=needs, **args)
    assert not (tmp_path / "a" / INDEX_NAME).exists()


# --- layer spec -------------------------------------------------------------------------------------------------


def test_layer_spec_examples():
    assert parse_layer_spec("tv:1,pen", 6) == SignalNeeds(tv_layers=frozenset({0, 4}))
    assert parse_layer_spec("tv:1,pen;full:1-pen", 6) == SignalNeeds(frozenset({0, 4}), frozenset(range(5)))
    assert parse_layer_spec(" full: 2 - 3 ; tv:6;", 6) == SignalNeeds(frozenset({5}), frozenset({1, 2}))
    assert parse_layer_spec("tv:pen-24,2", 24) == SignalNeeds(tv_layers=frozenset({1, 22, 23}))
    for bad in ("tv:0", "tv:7", "tv:1.5", "tv:", "tv", "foo:1", "tv:3-1", "", ";", "tv:pen-x", "full:-2"):
        with pytest.raises(ValueError, match="bad layer spec"):
            parse_layer_spec(bad, 6)


@st.composite
def _spec_cases(draw) -> tuple[int, list[tuple[str, int, int, bool]]]:
    n = draw(st.integers(2, 40))
    layer = st.integers(1, n)
    ranges = st.tuples(st.sampled_from(["tv", "full"]), layer, layer, st.booleans()).map(
        lambda t: (t[0], min(t[1], t[2]), max(t[1], t[2]), t[3])
    )
    return n, draw(st.lists(ranges, min_size=1, max_size=6))


@given(_spec_cases())
def test_layer_spec_matches_a_naive_reading(case):
    n, ranges = case

    def token(layer: int, as_pen: bool) -> str:
        return "pen" if as_pen and layer == n - 1 else str(layer)

    spec = ";".join(f"{kind}:{token(a, pen)}-{token(b, pen)}" for kind, a, b, pen in ranges)
    expected: dict[str, set[int]] = {"tv": set(), "full": set()}
    for kind, first, last, _ in ranges:
        expected[kind] |= {paper - 1 for paper in range(first, last + 1)}
    assert parse_layer_spec(spec, n) == SignalNeeds(frozenset(expected["tv"]), frozenset(expected["full"]))


# --- command line -----------------------------------------------------------------------------------------------


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("cache-teacher")(cache_teacher_cmd)
    return app


def test_cache_teacher_command(right, tmp_path):
    runner = CliRunner()
    samples = right.samples[:2]
    data = right.root / "two.jsonl"
    write_jsonl(samples, data)
    out = tmp_path / "cache"
    base = ["cache-teacher", "--teacher", f"tiny:{FAMILY}", "--data", str(data), "--out", str(out)]
    result = runner.invoke(_cli(), [*base, "--batch-size", "2", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "bytes per sample" in result.output and "float32" in result.output
    cache = CachedTeacher(out)
    assert (cache.tv_layers, cache.full_layers) == ({0, 4}, frozenset())  # paper layers 1 and pen = 5
    assert cache.index.teacher.name == f"tiny:{FAMILY}" and len(cache) == 2 and cache.num_layers == 6
    assert cache.report().samples == 2 and samples[0].id in cache
    # The tiny teacher is the fixture's (seed 0), so the command cached the signals a live teacher gives.
    tv_only = SignalNeeds(tv_layers=NEEDS.tv_layers)
    batch = right.collator(samples)
    live = LiveTeacher(right.pair.teacher).signals(batch, _index(batch), tv_only)
    cached = cache.signals(batch, _index(batch), tv_only)
    assert all(torch.equal(cached.tv[k], live.tv[k]) for k in tv_only.tv_layers)

    result = runner.invoke(_cli(), base)
    assert result.exit_code == 2 and "already holds a teacher cache" in result.output
    result = runner.invoke(_cli(), [*base, "--layers", "tv:9"])
    assert result.exit_code == 2 and "bad layer spec" in result.output
    result = runner.invoke(_cli(), [*base, "--teacher", "tiny:nope", "--overwrite"])
    assert result.exit_code == 2 and "unknown model family" in result.output

    # A saved teacher folder, full maps for reasoning (with a size warning), replacing the first cache.
    right.pair.save(tmp_path / "pair")
    result = runner.invoke(
        _cli(),
        [
            *base[:2],
            str(tmp_path / "pair" / "teacher"),
            *base[3:],
            "--full",
            "--overwrite",
            "--batch-size",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "warning" in result.output and "L^2" in result.output
    cache = CachedTeacher(out)
    assert (cache.tv_layers, cache.full_layers) == ({0, 4}, set(range(5)))
    assert cache.index.dtype == "float16" and cache.index.teacher.config_sha256 != ""


def test_full_size_estimate_follows_the_view_mix(tmp_path, monkeypatch):
    """On mixed single/six-view data the estimate is within 10% of the full-map bytes of the written cache, also
    when it measures only 2 samples of each (images, task, kind) group."""
    root = tmp_path / "mixed"
    samples = list(read_jsonl(generate_split(root, n_scenes=3, seed=1, views="both").path))
    views = {len(s.images) for s in samples}
    assert views == {1, 6} and len(samples) == 48  # a mix; groups of up to 7 samples, of which 2 are measured
    pair = build_tiny_pair(FAMILY)
    collator = pair.collators(root, padding_side="right")[0]
    needs = SignalNeeds(tv_layers=frozenset(), full_layers=frozenset({0, 2}))
    monkeypatch.setattr(signals_cli, "SIZE_SAMPLES", 2)
    estimate, lengths = estimate_full_bytes(collator, samples, len(needs.full_layers), torch.float16)
    report = write_cache(
        LiveTeacher(pair.teacher),
        samples,
        collator,
        tmp_path / "cache",
        needs=needs,
        batch_size=4,
        teacher_name="tiny",
        dtype=torch.float16,
    )
    real = report.bytes_by_kind["full"]
    assert abs(estimate - real) / real < 0.10, (estimate, real)
    assert lengths[6] > 1.2 * lengths[1]  # why the first sample alone cannot stand for the set
