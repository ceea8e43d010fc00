"""Write synthetic Drive-KD splits: images under ``images/<split>/`` and ``<split>.jsonl`` of :class:`Sample`
rows.

Each scene draws from its own ``random.Random`` keyed by domain, split, seed and index, so a run is
byte-identical for a given seed, splits never share a scene stream, and any scene can be regenerated alone. A
driving scene is rendered once and asked every question type once per view setting; a describe scene (the same
world, the base student's pretraining task) is rendered alike and asked for its descriptions.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

from drivekd.data.cameras import CAMERAS
from drivekd.data.schema import TASK_TO_CAPABILITY, ImageRef, Sample, write_jsonl
from drivekd.data.synthetic.describe import ask_describe
from drivekd.data.synthetic.questions import QA, QUESTION_TYPES, SceneViews, ask_driving, ask_general
from drivekd.data.synthetic.render import View, mark, render_shapes, render_views
from drivekd.data.synthetic.scene import Scene, sample_scene, sample_shapes
from drivekd.data.tags import parse_tags

Views = Literal["single", "multi", "both"]
Domain = Literal["driving", "general", "describe"]
DOMAINS: tuple[Domain, ...] = ("driving", "general", "describe")
# Domains of driving scenes: rendered alike, asked their own questions (describe: the base student's pretraining).
SCENE_ASKERS: dict[str, Callable[[Scene, SceneViews, random.Random], list[QA]]] = {
    "driving": ask_driving,
    "describe": ask_describe,
}
SCENE_PREFIX = {"driving": "synth", "describe": "describe"}
ImageFormat = Literal["png", "jpg"]
DEFAULT_SIZE = (224, 112)  # the demo teacher's size: 8 x 4 vision tokens of 28 x 28 pixels per camera
SPLIT_SHARES = {"train": 0.8, "val": 0.1, "test": 0.1}


@dataclass
class SplitSummary:
    """What :func:`generate_split` wrote."""

    split: str
    path: Path  # the JSONL file
    scenes: int = 0
    images: int = 0
    samples: int = 0
    by_question_type: Counter[str] = field(default_factory=Counter)
    by_capability: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)
    by_views: Counter[str] = field(default_factory=Counter)

    def count(self, sample: Sample) -> None:
        self.samples += 1
        self.by_question_type[sample.meta["question_type"]] += 1
        self.by_capability[sample.capability] += 1
        self.by_kind[sample.kind] += 1
        self.by_views[sample.meta["views"]] += 1


def _scene_rng(domain: str, split: str, seed: int, index: int) -> random.Random:
    return random.Random(f"drivekd-synthetic:{domain}:{split}:{seed}:{index}")


def _save(image: Image.Image, out_dir: Path, rel: Path) -> str:
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if rel.suffix == ".png":
        image.save(path, format="PNG", compress_level=6)
    else:
        image.save(path, format="JPEG", quality=90)
    return rel.as_posix()


def _sample(qa: QA, sample_id: str, images: list[ImageRef], scene_id: str, domain: str, views: str) -> Sample:
    task = QUESTION_TYPES[qa.question_type] if domain == "driving" else "perception"
    return Sample(
        id=sample_id,
        images=images,
        question=qa.question,
        answer=qa.answer,
        rationale=qa.rationale or None,
        capability=TASK_TO_CAPABILITY[task],
        task=task,
        kind=qa.kind,
        options=qa.options,
        objects=qa.objects,
        scene_id=scene_id,
        frame_id="0",
        meta={"domain": domain, "views": views, "question_type": qa.question_type, "gt": qa.gt},
    )


def _marked_refs(
    qa: QA,
    rendered: Mapping[str, View],
    refs: dict[str, ImageRef],
    folder: Path,
    out_dir: Path,
    ext: str,
    summary: SplitSummary,
) -> dict[str, ImageRef]:
    """``refs`` with each camera that a tag of the question names replaced by a copy that frames the tagged object
    (:func:`~drivekd.data.synthetic.render.mark`); a copy is written once per camera and object set."""
    named: dict[str, set[str]] = {}
    for tag in parse_tags(qa.question):
        view = rendered[tag.camera]
        oid = next(o for o, p in view.placements.items() if (p.x, p.y) == (tag.x, tag.y))
        named.setdefault(tag.camera, set()).add(oid)
    out = dict(refs)
    for camera, ids in named.items():
        oids = sorted(ids)
        rel = folder / f"{camera}-{'-'.join(oids)}.{ext}"
        if not (out_dir / rel).exists():
            image = rendered[camera].image
            for oid in oids:
                image = mark(image, rendered[camera].placements[oid])
            _save(image, out_dir, rel)
            summary.images += 1
        out[camera] = ImageRef(camera=camera, path=rel.as_posix())
    return out


def _driving(
    out_dir: Path,
    split: str,
    seed: int,
    index: int,
    views: Views,
    size: tuple[int, int],
    ext: str,
    summary: SplitSummary,
    domain: str = "driving",
    mark_objects: bool = True,
) -> Iterator[Sample]:
    """A driving scene rendered into the views and asked ``domain``'s questions once per view setting; with
    ``mark_objects`` a question that names an object by its tag sees that object framed."""
    rng = _scene_rng(domain, split, seed, index)
    scene_id = f"{SCENE_PREFIX[domain]}-{split}-{seed}-{index:06d}"
    scene = sample_scene(rng, scene_id)
    rendered = render_views(scene, ("CAM_FRONT",) if views == "single" else CAMERAS, size)
    folder = Path("images") / split / (f"{index:06d}" if domain == "driving" else f"{domain}-{index:06d}")
    refs = {
        v.camera: ImageRef(camera=v.camera, path=_save(v.image, out_dir, folder / f"{v.camera}.{ext}"))
        for v in rendered
    }
    summary.images += len(refs)
    by_camera = {v.camera: v for v in rendered}
    for setting in ("single", "multi") if views == "both" else (views,):
        cams = ("CAM_FRONT",) if setting == "single" else CAMERAS
        seen = SceneViews.of(setting, [v for v in rendered if v.camera in cams])
        for k, qa in enumerate(SCENE_ASKERS[domain](scene, seen, rng)):
            shown = _marked_refs(qa, by_camera, refs, folder, out_dir, ext, summary) if mark_objects else refs
            images = [shown[c] for c in cams]
            yield _sample(qa, f"{scene_id}-{setting}-{k:02d}", images, scene_id, domain, setting)


def _general(
    out_dir: Path, split: str, seed: int, index: int, size: tuple[int, int], ext: str, summary: SplitSummary
) -> Iterator[Sample]:
    rng = _scene_rng("general", split, seed, index)
    scene_id = f"general-{split}-{seed}-{index:06d}"
    scene = sample_shapes(rng, scene_id)
    rel = _save(render_shapes(scene, size), out_dir, Path("images") / split / f"general-{index:06d}.{ext}")
    summary.images += 1
    images = [ImageRef(camera="CAM_FRONT", path=rel)]
    for k, qa in enumerate(ask_general(scene, rng)):
        yield _sample(qa, f"{scene_id}-{k:02d}", images, scene_id, "general", "single")


def generate_split(
    out_dir: str | Path,
    *,
    n_scenes: int,
    seed: int,
    views: Views = "both",
    image_size: tuple[int, int] = DEFAULT_SIZE,
    split: str = "train",
    domain: Domain = "driving",
    image_format: ImageFormat = "png",
    mark_objects: bool = True,
) -> SplitSummary:
    """Generate ``n_scenes`` scenes into ``out_dir/images/<split>/`` and ``out_dir/<split>.jsonl``.

    ``views`` picks the CAM_FRONT-only setting, the six-camera setting, or both from the same rendering.
    The general domain (plain coloured shapes, ``meta["domain"] == "general"``) ignores ``views``; the describe
    domain renders driving scenes as the driving domain does and asks for open-ended descriptions of them
    (:mod:`~drivekd.data.synthetic.describe`; a scene stream of its own for any seed and split). With
    ``mark_objects`` (the default: the demo teacher's data) a question that names an object by its ``<cK,CAM,x,y>``
    tag shows that camera with the object framed in white, as visual prompting does. Image paths
    are relative to ``out_dir``, the folder :func:`~drivekd.data.schema.read_jsonl` resolves them against.
    """
    if n_scenes < 0:
        raise ValueError(f"n_scenes must be >= 0, got {n_scenes}")
    if views not in ("single", "multi", "both"):
        raise ValueError(f"views must be 'single', 'multi' or 'both', got {views!r}")
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    out_dir = Path(out_dir)
    summary = SplitSummary(split, out_dir / f"{split}.jsonl")
    ext = "jpg" if image_format == "jpg" else "png"

    def samples() -> Iterator[Sample]:
        for index in range(n_scenes):
            summary.scenes += 1
            if domain == "general":
                scene_samples = _general(out_dir, split, seed, index, image_size, ext, summary)
            else:
                scene_samples = _driving(
                    out_dir, split, seed, index, views, image_size, ext, summary, domain, mark_objects
                )
            for sample in scene_samples:
                summary.count(sample)
                yield sample

    write_jsonl(samples(), summary.path)
    return summary


def generate_dataset(
    out_dir: str | Path,
    *,
    n_scenes: Mapping[str, int] | int,
    seed: int,
    views: Views = "both",
    image_size: tuple[int, int] = DEFAULT_SIZE,
    domain: Domain = "driving",
    image_format: ImageFormat = "png",
    mark_objects: bool = True,
) -> dict[str, SplitSummary]:
    """Generate several splits (an int is shared 80/10/10 over train/val/test).

    Every split uses ``seed``; the split name in each scene's random stream keeps the splits' scenes disjoint.
    """
    if isinstance(n_scenes, int):
        val = test = round(n_scenes * SPLIT_SHARES["val"])
        n_scenes = {"train": n_scenes - val - test, "val": val, "test": test}
    return {
        split: generate_split(
            out_dir,
            n_scenes=n,
            seed=seed,
            views=views,
            image_size=image_size,
            split=split,
            domain=domain,
            image_format=image_format,
            mark_objects=mark_objects,
        )
        for split, n in n_scenes.items()
    }
