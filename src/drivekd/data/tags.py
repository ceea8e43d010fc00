"""Object tags ``<cK,CAM,x,y>``: parsing, formatting and pixel -> normalised conversion.

DriveLM writes pixel centres in 1600x900 nuScenes frames (``<c1,CAM_BACK,1088.3,497.5>``); DriveBench and Drive-KD use
the same tag with x, y divided by the image width and height, rounded to 4 decimals. A DriveLM challenge submission
needs pixels again (its matcher works in pixels), hence :func:`pixel_tags_in_text`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, field_validator

from drivekd.data.cameras import check_camera

NUSCENES_SIZE = (1600, 900)
TAG_RE = re.compile(r"<(c\d+),([A-Za-z_.]+),\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?)>")
# Anything that looks like an attempt at a tag, to catch malformed ones the strict pattern misses: also one that is
# never closed (cut off at the end of the text or before the next tag).
LOOSE_TAG_RE = re.compile(r"<c\d+,[^<>]*(?:>|(?=<)|$)")


class ObjectTag(BaseModel):
    """One referenced object: its id (``c1``), camera and normalised centre in [0, 1]."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    camera: str
    x: float
    y: float

    @field_validator("camera")
    @classmethod
    def _known_camera(cls, value: str) -> str:
        return check_camera(value)

    @field_validator("x", "y")
    @classmethod
    def _normalised(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"coordinate {value} is not normalised to [0, 1]")
        return value

    def __str__(self) -> str:
        return f"<{self.id},{self.camera},{self.x:.4f},{self.y:.4f}>"


def parse_tags(text: str, *, pixel_size: tuple[int, int] | None = None) -> list[ObjectTag]:
    """All tags in ``text``; with ``pixel_size`` the coordinates are pixels and get normalised.

    Raises ``ValueError`` on a malformed tag, an unknown camera or an out-of-range coordinate.
    """
    strict = list(TAG_RE.finditer(text))
    loose = LOOSE_TAG_RE.findall(text)
    if len(loose) != len(strict):
        bad = [t for t in loose if not TAG_RE.fullmatch(t)]
        raise ValueError(f"malformed object tag {bad[0] if bad else loose!r}; expected <cK,CAM_NAME,x,y>")
    tags: dict[str, ObjectTag] = {}
    for m in strict:
        x, y = float(m.group(3)), float(m.group(4))
        if pixel_size is not None:
            x, y = round(x / pixel_size[0], 4), round(y / pixel_size[1], 4)
        tag = ObjectTag(id=m.group(1), camera=m.group(2), x=x, y=y)
        tags.setdefault(str(tag), tag)
    return list(tags.values())


def rewrite_tags(text: str, convert: Callable[[re.Match[str]], str]) -> str:
    """Replace every tag in ``text`` by ``convert(match)``."""
    return TAG_RE.sub(convert, text)


def normalise_tags_in_text(text: str, pixel_size: tuple[int, int] = NUSCENES_SIZE) -> str:
    """Rewrite pixel tags in ``text`` as normalised tags (DriveLM -> DriveBench convention)."""

    def convert(m: re.Match[str]) -> str:
        x, y = float(m.group(3)) / pixel_size[0], float(m.group(4)) / pixel_size[1]
        return str(ObjectTag(id=m.group(1), camera=m.group(2), x=round(x, 4), y=round(y, 4)))

    return rewrite_tags(text, convert)


def pixel_tags_in_text(text: str, pixel_size: tuple[int, int] = NUSCENES_SIZE) -> str:
    """Rewrite normalised tags in ``text`` as pixel tags with one decimal (Drive-KD -> DriveLM convention).

    Model answers are rewritten as they are: a coordinate is scaled without a range check.
    """

    def convert(m: re.Match[str]) -> str:
        x, y = float(m.group(3)) * pixel_size[0], float(m.group(4)) * pixel_size[1]
        return f"<{m.group(1)},{m.group(2)},{x:.1f},{y:.1f}>"

    return rewrite_tags(text, convert)
