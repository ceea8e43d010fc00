"""nuScenes camera names, in the order the six surround views are shown to a model."""

from __future__ import annotations

CAMERAS: tuple[str, ...] = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_FRONT_LEFT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
)
# Human-readable names used in prompts ("CAM_FRONT" -> "front").
CAMERA_LABELS: dict[str, str] = {cam: cam.removeprefix("CAM_").lower().replace("_", "-") for cam in CAMERAS}


def check_camera(name: str) -> str:
    """Return the canonical camera name; the DriveBench spelling ``CAM.FRONT`` is accepted too."""
    canonical = name.replace(".", "_").upper()
    if canonical not in CAMERAS:
        raise ValueError(f"unknown camera {name!r}; expected one of {', '.join(CAMERAS)}")
    return canonical
