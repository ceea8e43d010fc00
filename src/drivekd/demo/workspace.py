"""The demo's output folder: where each result lives, and the rule for reusing a folder.

A new or empty folder is claimed by writing ``demo.json`` (the settings, the teacher's checksum, the DriveLM
folder). A folder that already has a ``demo.json`` with the same content is resumed: finished stages are reused
(generated data, completed training runs, score files, deployment and pre-study results), unfinished ones are
redone, and the report is rebuilt from what is on disk. Anything else is refused with a message saying why, so a
rerun never overwrites results made with other settings and never writes into an unrelated folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivekd.demo.methods import Method
from drivekd.errors import DriveKDError
from drivekd.fileio import write_text_atomically

MARKER = "demo.json"


class WorkspaceError(DriveKDError):
    """``--out`` cannot be used (a file, a non-demo folder, or a demo made with other settings)."""


def write_json(path: Path, value: Any) -> Path:
    """Write JSON whole (temporary file, then rename), so a crash never leaves half a file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(value, indent=1))
    return path


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def drivelm(self) -> Path:
        """The DriveLM sample converted to Drive-KD JSONL (image paths relative to the sample's own folder)."""
        return self.root / "data" / "drivelm.jsonl"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def prestudy(self) -> Path:
        return self.root / "prestudy"

    @property
    def deployment(self) -> Path:
        return self.root / "deployment.json"

    def split(self, name: str) -> Path:
        return self.data / f"{name}.jsonl"

    def run_dir(self, method: Method, seed: int) -> Path:
        return self.root / "runs" / method.slug / f"seed-{seed}"

    def eval_dir(self, method: Method, seed: int | None, split: str = "test") -> Path:
        """Predictions and scores of one model; the teacher has no seed."""
        folder = self.root / "eval" / split / method.slug
        return folder if seed is None else folder / f"seed-{seed}"

    def claim(self, settings: dict[str, Any]) -> bool:
        """Make ``root`` this demo's folder; True when an earlier run with the same settings is resumed."""
        if self.root.exists() and not self.root.is_dir():
            raise WorkspaceError(
                f"--out {self.root} is a file; give a folder (new, empty, or an earlier demo's)"
            )
        marker = self.root / MARKER
        if marker.is_file():
            try:
                earlier = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                raise WorkspaceError(f"{marker} is unreadable ({err}); use another --out") from None
            if earlier != settings:
                changed = sorted(k for k in set(earlier) | set(settings) if earlier.get(k) != settings.get(k))
                raise WorkspaceError(
                    f"{self.root} holds a demo made with other settings (differs in: {', '.join(changed)}); "
                    "its results are kept: use another --out, or rerun with the same options to resume it"
                )
            return True
        if self.root.is_dir() and any(self.root.iterdir()):
            raise WorkspaceError(
                f"{self.root} is not empty and is not a demo folder (no {MARKER}); "
                "choose a new or empty folder so nothing in it is overwritten"
            )
        write_json(marker, settings)
        return False
