"""Shared fixtures: small on-disk images and samples, and the shared DriveLM sample when present."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from drivekd.data.schema import Sample

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "drivelm-sample"


@pytest.fixture(scope="session")
def shared_drivelm() -> Path:
    """The real DriveLM sample beside the checkout (read-only; never copied into the repo)."""
    if not (SHARED / "test_eval.json").is_file():
        pytest.skip("../shared/data/drivelm-sample is not present")
    return SHARED


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    Image.effect_noise((112, 63), 60).convert("RGB").save(folder / "noise.png")
    Image.new("RGB", (112, 63), (90, 120, 160)).save(folder / "plain.png")
    return folder


@pytest.fixture(scope="session")
def samples() -> list[Sample]:
    """A single-view MCQ with a rationale and a two-view open question of a different length."""
    return [
        Sample(
            id="single",
            images=[{"camera": "CAM_FRONT", "path": "noise.png"}],
            question="What is the moving status of object <c1,CAM_FRONT,0.5000,0.5000>? A. Going ahead. B. Stopped.",
            answer="B",
            rationale="Its brake lights are on.",
            capability="perception",
            task="perception",
            kind="mcq",
            options={"A": "Going ahead.", "B": "Stopped."},
        ),
        Sample(
            id="multi",
            images=[
                {"camera": "CAM_BACK", "path": "plain.png"},
                {"camera": "CAM_FRONT", "path": "noise.png"},
            ],
            question="In this scenario, what are safe actions to take for the ego vehicle?",
            answer="keep going at the same speed",
            capability="planning",
            task="planning",
            kind="open",
        ),
    ]
