"""Token-length limits: a sample longer than the model's context is refused, or skipped and named.

Every command that feeds samples to a model (train, cache-teacher, analyze, generate) measures each sample's tokens
as its collator builds them (images included) against a limit, by default the model's ``max_position_embeddings``,
and either refuses the first overlong row with the count of all such rows (``refuse``) or leaves them out and
reports them (``skip``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from drivekd.data.schema import Sample
from drivekd.errors import DataError

Overlong = Literal["refuse", "skip"]


@dataclass
class LengthReport:
    """The limit applied (None: the model declares none and none was given) and the rows skipped with their
    token counts."""

    limit: int | None
    mode: Overlong
    skipped: list[tuple[str, int]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "max_length": self.limit,
            "overlong": self.mode,
            "overlong_skipped": [{"id": sample_id, "tokens": tokens} for sample_id, tokens in self.skipped],
        }

    def summary(self) -> str | None:
        """One line naming the skipped rows, or None when none was."""
        if not self.skipped:
            return None
        shown = ", ".join(f"{sample_id} ({tokens} tokens)" for sample_id, tokens in self.skipped[:10])
        more = f" and {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""
        return f"skipped {len(self.skipped)} rows over the limit of {self.limit} tokens: {shown}{more}"


def model_limit(text_config: Any) -> int | None:
    """The positions a model's text decoder supports (``max_position_embeddings``), None when it declares none."""
    return getattr(text_config, "max_position_embeddings", None)


def limit_lengths(
    samples: Sequence[Sample],
    length: Callable[[Sample], int],
    limit: int | None,
    mode: Overlong,
    *,
    source: str,
    setting: str,
    skip: str,
    extra: int = 0,
    extra_what: str = "",
) -> tuple[list[Sample], LengthReport]:
    """The samples within ``limit`` tokens (``length(sample) + extra``) and the report of those left out.

    ``mode="refuse"`` raises :class:`DataError` on the first overlong row of ``source`` (counting all of them);
    ``setting`` and ``skip`` name the option that sets the limit and the one that skips (for the hint);
    ``extra_what`` says what ``extra`` tokens are (e.g. the tokens to generate).
    """
    report = LengthReport(limit, mode)
    if limit is None:
        return list(samples), report
    kept: list[Sample] = []
    for sample in samples:
        tokens = length(sample) + extra
        if tokens <= limit:
            kept.append(sample)
        else:
            report.skipped.append((sample.id, tokens))
    if report.skipped and mode == "refuse":
        sample_id, tokens = report.skipped[0]
        including = f" (including {extra} {extra_what})" if extra else ""
        others = f"; {len(report.skipped)} rows in all are over it" if len(report.skipped) > 1 else ""
        raise DataError(
            source,
            sample_id,
            None,
            f"{tokens} tokens long{including}, over the limit of {limit} ({setting}){others}",
            hint=f"shorten it, raise {setting} if the model supports more, or pass {skip} to skip and list such rows",
        )
    return kept, report
