"""Opening a sample's images safely: paths confined to the image root, files fully decoded with a pixel limit.

A data file is input from elsewhere: a path such as ``../../etc/passwd``, an absolute path, or a symlink out of the
image root would make every reader open files the data set does not hold, so a path must resolve (symlinks
followed) inside the root unless the user opts out (``--allow-outside-root``). An image is decoded in full, so a
truncated file fails where it is read rather than inside a model's processor, and one whose header declares more
than :data:`MAX_IMAGE_PIXELS` pixels (a decompression bomb) is refused before it is decoded.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

# Far above any camera frame (nuScenes: 1600 x 900 = 1.44 MP), far below what would exhaust memory when decoded.
MAX_IMAGE_PIXELS = 64_000_000
OUTSIDE_ROOT_HINT = (
    "keep image paths inside the image root, or pass --allow-outside-root if you trust the file"
)


class ImageFileError(ValueError):
    """An image path or file that cannot be used; the message says why (the caller adds file, row and field)."""


def confine(root: Path, stored: str, *, allow_outside_root: bool = False) -> Path:
    """The path of image ``stored`` under ``root``; outside ``root`` (after following symlinks) is an error unless
    ``allow_outside_root``. An absolute ``stored`` path is taken as it is, and so is outside unless under ``root``."""
    path = root / stored
    if allow_outside_root:
        return path
    real, real_root = path.resolve(), root.resolve()
    if not real.is_relative_to(real_root):
        raise ImageFileError(f"image path {stored!r} resolves to {real}, outside the image root {real_root}")
    return path


def open_image(path: Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image at ``path`` decoded in full as RGB; missing, empty, truncated, non-image and oversized files
    raise :class:`ImageFileError` saying which."""
    if not path.is_file():
        raise ImageFileError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise ImageFileError(f"image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageFileError(
                    f"image {path} declares {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels} (a decompression bomb or not a camera frame)"
                )
            return image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise ImageFileError(f"image {path} is too large to decode safely: {err}") from None
    except Image.UnidentifiedImageError:
        raise ImageFileError(f"not an image file PIL can read: {path}") from None
    except OSError as err:  # truncated or corrupt data
        raise ImageFileError(f"cannot decode image {path}: {err}") from None
