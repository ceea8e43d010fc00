"""``drivekd migrate-checkpoint``: convert checkpoints of the earlier pickled format once, running no code from them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from drivekd.errors import DriveKDError

console = Console(stderr=True, soft_wrap=True)


def migrate_checkpoint_cmd(
    path: Annotated[
        Path,
        typer.Argument(
            help="A checkpoint-N folder holding trainer_state.pt, or a run folder (all such checkpoints)."
        ),
    ],
) -> None:
    """Rewrite old-format checkpoints (trainer_state.pt) as safetensors + JSON with a checksum manifest.

    The pickle is read with torch.load(weights_only=True): tensors, containers and numpy arrays only, no code runs.
    A resume from the converted checkpoint equals one from the old checkpoint.
    """
    from drivekd.training import checkpoint as ckpt

    try:
        if (path / ckpt.OLD_STATE_FILE).is_file():
            todo = [path]
        else:
            todo = [c for c in ckpt.list_checkpoints(path) if (c / ckpt.OLD_STATE_FILE).is_file()]
            if not todo:
                raise ckpt.CheckpointError(
                    f"{path} is neither a checkpoint with {ckpt.OLD_STATE_FILE} nor a run folder holding one: "
                    "nothing to migrate"
                )
        for checkpoint in todo:
            ckpt.migrate(checkpoint)
            console.print(
                f"converted {escape(str(checkpoint))} (safetensors + JSON, {ckpt.MANIFEST} written)"
            )
    except DriveKDError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(code=2) from None
