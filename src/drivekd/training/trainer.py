"""The Drive-KD training loop.

One optimizer step = ``grad_accum`` micro-steps. A micro-step is one forward of a batch drawn by the sampler
(``data.sampler``: ``micro_batch`` samples from the whole set, or of every capability); the objective gives the value
of every term on every capability's rows, normalised over the whole window. When a projection method or the
reweighting is on, the exact Gramian of the rows the step needs comes from one vmapped backward
(:class:`GramianEngine`), the method turns it into coefficients, and one ordinary backward of sum_m c_m L_m adds the
micro-step's combined update to ``.grad``: the projection acts per micro-step and the projected updates are summed
over the window (``gradients.grouping``: ``teacher``, one CE anchor and one follower per teacher term, as the
released code; or ``capability``, per-capability anchors and stage 2 across capabilities; docs/gradients.md). The
reweighting takes one step per optimizer step on the window's mean losses and gradient norms. With ``run.fsdp`` the
student is sharded and the Gramian comes from per-row sharded gradients (:mod:`drivekd.training.sharding`).

Public surface (benchmarks and tests use it): :meth:`Trainer.train`, :meth:`Trainer.train_step`,
:meth:`Trainer.next_window`, :meth:`Trainer.accumulate`, :meth:`Trainer.micro_step`, :meth:`Trainer.plan_rows`,
:meth:`Trainer.coefficients`, :meth:`Trainer.forward_terms`, :meth:`Trainer.teacher_signals`.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from torch.distributed.tensor import DTensor
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from drivekd.capture.recorder import AttentionRecorder, use_capture_attention
from drivekd.data.collate import Batch, VLMCollator
from drivekd.data.header import image_root_for
from drivekd.data.lengths import LengthReport, limit_lengths, model_limit
from drivekd.data.roles import TVIndex
from drivekd.data.schema import Sample, read_jsonl
from drivekd.errors import DriveKDError
from drivekd.gradients import LossReweighter
from drivekd.gradients.autogram import GramianEngine
from drivekd.gradients.gramian import ProjectionStats, combine_teacher_weights, combine_weights
from drivekd.gradients.mixing import (
    Combination,
    TeacherCombination,
    atomic_coefficients,
    combination_matrix,
    group_matrix,
    row_norms,
    teacher_matrix,
)
from drivekd.gradients.owners import TokenOwners, owners_of
from drivekd.gradients.reweight import ReferenceReweighter, ReweightStep
from drivekd.losses import HiddenProjector
from drivekd.models.families import FamilyAdapter
from drivekd.signals.types import TeacherSignals
from drivekd.training import checkpoint as ckpt
from drivekd.training import distributed as dist
from drivekd.training import record as run_record
from drivekd.training import sharding
from drivekd.training.checks import check_layouts
from drivekd.training.config import TrainConfig
from drivekd.training.models import Models, build_models
from drivekd.training.objective import Objective, TermValue
from drivekd.training.precision import refuse_low_precision_weights
from drivekd.training.progress import TrainProgress, planned_steps
from drivekd.training.recipes import Recipe, build_recipe, hidden_pairs, resolve_layers
from drivekd.training.sampling import CapabilitySampler, MixedSampler
from drivekd.training.scaling import LossScale
from drivekd.training.terms import logit_positions
from drivekd.training.tracking import Trackers
from drivekd.training.validation import Validation

console = Console(stderr=True, soft_wrap=True)


class TrainingError(DriveKDError):
    """Training cannot go on (too many non-finite steps in a row, say)."""


@dataclass(frozen=True)
class RowPlan:
    """What one micro-step backpropagates for its Gramian: the projection rows of its grouping (none without a
    method), then with reweighting one row per weight group, all as rows over the atomic terms."""

    combination: Combination | TeacherCombination | None  # eq. 17 rows; None for the KL / hidden baselines
    projected: int  # how many leading rows are projection rows (0 without a method)
    group_names: tuple[str, ...]  # reweighting groups, in the order of the trailing rows
    groups: torch.Tensor  # (G, terms): the loss each weight multiplies (as the reweighting mode measures it)
    rows: torch.Tensor | None  # (R, terms); None when no Gramian is needed


@dataclass
class MicroStep:
    """The outcome of one micro-step."""

    terms: list[TermValue]
    nonfinite: bool = False
    stats: ProjectionStats | None = None
    norms: dict[str, float] | None = None  # reweighting groups' gradient norms, from the Gramian
    group_losses: dict[str, float] | None = None  # the losses those norms belong to
    gramian_rows: int | None = None  # rows the Gramian's vmapped backward carried


@dataclass
class TrainResult:
    steps: int
    skipped_steps: int
    output_dir: Path
    checkpoint: Path | None
    log: list[dict[str, Any]] = field(default_factory=list)
    lengths: LengthReport | None = None  # the token limit applied and the overlong rows skipped


class Trainer:
    def __init__(
        self, config: TrainConfig, *, samples: Sequence[Sample] | None = None, models: Models | None = None
    ) -> None:
        self.config = config
        self.output_dir = Path(config.run.output_dir)
        # Before anything loads: another run in output_dir, and which checkpoint (if any) is resumed.
        self.record_changes = run_record.check_output_dir(config)
        self.resume_from, skipped = ckpt.resume_point(self.output_dir, config.run.resume)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.run.seed)
        self.models = models or build_models(config)
        self.device = next(self.models.student.parameters()).device
        self.family: FamilyAdapter = self.models.family
        self.rank, self.world = dist.rank_and_world()  # known once the models joined the process group
        if self.rank == 0:
            for checkpoint, why in skipped:
                console.print(f"[yellow]warning:[/yellow] skipping {escape(str(checkpoint))}: {escape(why)}")
        self._build_objective()
        self._prepare_student()
        self.collate = VLMCollator(
            self.models.processor,
            self.family.image_token_id(self.models.student),
            image_root=image_root_for(config.data.train, config.data.image_root),
            padding_side=config.data.padding_side,
            allow_outside_root=config.data.allow_outside_root,
            answer_order=config.data.answer_order,
        )
        self.samples, self.lengths = self._limit_lengths(
            list(samples) if samples is not None else self._read_data()
        )
        check_layouts(self.models, self.samples, self.collate)
        self.sampler = self._sampler()
        self._build_optimisation()
        self.engine = self._engine()
        self.permutations = torch.Generator().manual_seed(config.run.seed)
        self.row_coefficients: torch.Tensor | None = None  # the last refresh, for refresh_every > 1
        self.step = 0
        self.skipped = 0
        self.nonfinite_streak = 0
        self.log_path = self.output_dir / "log.jsonl"
        self.validation = Validation(self) if config.data.val else None

    # ---- construction ----------------------------------------------------------------------------------------
    def _build_objective(self) -> None:
        config = self.config
        s_depth = len(self.family.decoder_layers(self.models.student))
        t_depth = self.models.teacher_depth or s_depth
        self.layers = resolve_layers(config.layers, s_depth, t_depth)
        pairs = (
            hidden_pairs(config.distill.hidden_layer, s_depth, t_depth)
            if config.distill.recipe == "hidden"
            else []
        )
        self.projectors = self._projectors(len(pairs))
        self.recipe: Recipe = build_recipe(config.distill, self.layers, s_depth, t_depth, self.projectors)
        self.objective = Objective(self.recipe.terms, pooled=config.pooled_window)
        # Pi mixes teachers only in multi-teacher runs (eq. 17); a single-teacher run is CE + w_t L_t.
        self.pi = config.distill.pi if len(self.recipe.teachers) > 1 else torch.eye(3).tolist()

    def _prepare_student(self) -> None:
        config = self.config
        use_capture_attention(self.models.student)
        if config.model.gradient_checkpointing:
            self.models.student.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        # Module hooks and map consumers work during the forward; gradient checkpointing replays layers in backward,
        # which would fire the hooks again and not recompute the maps, so both are off under it.
        self.layer_hooks = not config.model.gradient_checkpointing
        self.sharded = config.run.fsdp
        if self.sharded:
            sharding.shard_student(self.models.student, self.family)
        precision = config.optim.mixed_precision
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.loss_scale = LossScale(precision == "fp16")

    def _sampler(self) -> MixedSampler | CapabilitySampler:
        config = self.config
        if config.data.sampler == "mixed":
            return MixedSampler(
                self.samples,
                per_step=config.data.micro_batch,
                seed=config.run.seed,
                rank=self.rank,
                world=self.world,
            )
        return CapabilitySampler(
            self.samples,
            config.capabilities,
            per_capability=config.data.micro_batch,
            seed=config.run.seed,
            rank=self.rank,
            world=self.world,
        )

    def _build_optimisation(self) -> None:
        config = self.config
        params = [p for p in self.models.student.parameters() if p.requires_grad] + list(
            self.projectors.parameters()
        )
        refuse_low_precision_weights(params, config.optim.allow_low_precision_weights)
        self.optimizer = torch.optim.AdamW(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
        self.total_steps = config.optim.max_steps or math.ceil(
            config.optim.epochs * self.sampler.micro_steps_per_epoch() / config.optim.grad_accum
        )
        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            self.optimizer,
            round(config.optim.warmup_ratio * self.total_steps),
            self.total_steps,
            min_lr_rate=config.optim.min_lr_ratio,
        )
        self.reweighter = self._reweighter()
        self.method = config.gradients.method or "none"

    def _reweighter(self) -> LossReweighter | ReferenceReweighter | None:
        settings = self.config.reweight
        names = self.recipe.names
        if not settings.enabled or len(names) < 2:
            return None
        ratios = {n: settings.ratios.get(n, 1.0) for n in names}
        if settings.mode == "reference":
            return ReferenceReweighter(
                names,
                ratios,
                alpha=settings.alpha,
                lr=settings.lr,
                bounds=settings.bounds,
                min_ce_weight=settings.min_ce_weight,
            )
        return LossReweighter(names, ratios, alpha=settings.alpha, lr=settings.lr, bounds=settings.bounds)

    def _engine(self) -> GramianEngine | sharding.ShardedGramian | None:
        if self.method == "none" and self.reweighter is None:
            return None
        if self.sharded:
            return sharding.ShardedGramian(
                list(self.models.student.parameters()), list(self.projectors.parameters())
            )
        return GramianEngine(
            self.models.student,
            reduce=dist.all_reduce_sum,
            gather=dist.all_gather_cat,
            is_vision=self.family.is_vision_module,
        )

    def _projectors(self, count: int) -> torch.nn.ModuleList:
        if not count:
            return torch.nn.ModuleList()
        widths = (self.family.text_config(self.models.student).hidden_size, self.models.teacher_width)
        dtype = next(self.models.student.parameters()).dtype  # the working precision of the student's weights
        return torch.nn.ModuleList(HiddenProjector(*widths) for _ in range(count)).to(self.device, dtype)

    def _read_data(self) -> list[Sample]:
        if not self.config.data.train:
            raise TrainingError(
                "data.train is empty: give a Drive-KD JSONL file (drivekd data synth/import-...)"
            )
        data = self.config.data
        samples = read_jsonl(
            data.train, image_root=self.collate.image_root, allow_outside_root=data.allow_outside_root
        )
        return [s for s in samples if s.capability in self.config.capabilities]

    def _limit_lengths(self, samples: list[Sample]) -> tuple[list[Sample], LengthReport]:
        """The samples within ``data.max_length`` tokens (default: the shortest context of student and teachers);
        the others refused or, with ``data.overlong=skip``, left out and named."""
        data = self.config.data
        models = [self.models.student, *self.models.teacher_models]
        limits = [n for n in (model_limit(self.family.text_config(m)) for m in models) if n is not None]
        limit = data.max_length or min(limits, default=None)
        kept, report = limit_lengths(
            samples,
            self.collate.token_length,
            limit,
            data.overlong,
            source=data.train or "<samples>",
            setting="data.max_length",
            skip="data.overlong=skip",
        )
        if report.summary() and self.rank == 0:
            console.print(f"[yellow]warning:[/yellow] {escape(report.summary() or '')} (data.overlong=skip)")
        if not kept:
            raise TrainingError(
                f"no sample of {data.train or '<samples>'} is within {limit} tokens (data.max_length)"
            )
        return kept, report

    # ---- one micro-step -------------------------------------------------------------------------------------
    def index_of(self, batch: Batch) -> TVIndex:
        """The batch's text-to-vision index (its text queries set by ``distill.normalisation``)."""
        return TVIndex.of_roles(batch.roles, self.config.distill.tv_rows)

    def teacher_signals(self, batch: Batch, index: TVIndex) -> dict[str, TeacherSignals]:
        """One forward per distinct teacher source, asking for everything the terms it serves need."""
        by_source: dict[int, TeacherSignals] = {}
        out = {}
        for name, source in self.models.sources.items():
            if id(source) not in by_source:
                by_source[id(source)] = source.signals(batch, index, self.objective.needs)
            out[name] = by_source[id(source)]
        return out

    def next_window(self) -> list[Batch]:
        """The collated micro-batches of the next optimizer step (on the training device)."""
        return [
            self.collate(self.sampler.next()).to(self.device) for _ in range(self.config.optim.grad_accum)
        ]

    def window_counts(self, batches: Sequence[Batch]) -> Counter:
        """The window's normalisers, summed over ranks (each rank's terms are partial sums of the global means)."""
        counts = self.objective.window([(b, self.index_of(b)) for b in batches])
        keys = sorted(counts)
        totals = dist.all_reduce_sum(torch.tensor([counts[k] for k in keys], dtype=torch.float64))
        return Counter(dict(zip(keys, (int(v) for v in totals.tolist()), strict=True)))

    def forward_terms(self, batch: Batch, window: Counter, grad: bool = True) -> list[TermValue]:
        """The window-normalised terms of one micro-batch with their graphs (a plain forward with capture);
        ``grad=False`` under ``torch.no_grad`` (validation)."""
        index = self.index_of(batch)
        teacher = self.teacher_signals(batch, index) if self.models.sources else {}
        positions = logit_positions(batch.labels)
        with AttentionRecorder(self.models.student, self.objective.plan, grad=grad) as recorder:
            recorder.start(index if self.objective.plan.tv_layers else None)
            out = self._student_forward(batch, positions)
            captured = recorder.collect()
        return self.objective.values(
            batch,
            index,
            out.logits,
            teacher,
            window,
            captured=captured,
            hidden=out.hidden_states if self.objective.student_hidden else (),
            logit_positions=positions,
        )

    def _student_forward(self, batch: Batch, positions: torch.Tensor) -> Any:
        inputs = dict(
            batch.inputs, logits_to_keep=positions, output_hidden_states=self.objective.student_hidden
        )
        with torch.autocast(
            self.device.type, self.autocast or torch.bfloat16, enabled=self.autocast is not None
        ):
            return self.models.student(**inputs)

    def micro_step(
        self, batch: Batch, window: Counter, refresh: bool, weights: dict[str, float]
    ) -> MicroStep:
        """Forward one micro-batch, combine its terms and add the combined update to ``.grad``."""
        index = self.index_of(batch)
        teacher = self.teacher_signals(batch, index) if self.models.sources else {}
        positions = logit_positions(batch.labels)
        use_engine = self.engine is not None and refresh
        tap = use_engine and isinstance(self.engine, GramianEngine)
        with (
            self.engine.tap(self._owners(batch)) if tap else nullcontext() as tapped,
            AttentionRecorder(self.models.student, self.objective.plan, grad=True) as recorder,
        ):
            # Attention terms built layer by layer as the forward runs (see LayerStream).
            streamed = (
                self.objective.stream(batch, index, teacher)
                if self.layer_hooks and self.objective.attention
                else None
            )
            recorder.start(index if self.objective.plan.tv_layers else None, consumer=streamed)
            out = self._student_forward(batch, positions)
            captured = recorder.collect()
            terms = self.objective.values(
                batch,
                index,
                out.logits,
                teacher,
                window,
                captured=captured,
                streamed=streamed,
                hidden=out.hidden_states if self.objective.student_hidden else (),
                logit_positions=positions,
            )
            local_bad = not all(torch.isfinite(t.value).all() for t in terms)
            if dist.all_reduce_sum(torch.tensor(float(local_bad))).item() > 0:  # every rank skips together
                return MicroStep(terms, nonfinite=True)
            plan = self.plan_rows(terms, weights)
            gramian = (
                self._gramian(terms, tapped, plan.rows) if use_engine and plan.rows is not None else None
            )
            if gramian is not None and not bool(torch.isfinite(gramian).all()):
                return MicroStep(terms, nonfinite=True)  # an fp16 overflow in the vmapped backward
        coefficients, stats = self.coefficients(terms, plan, gramian, weights)
        scale = self.loss_scale.scale
        torch.autograd.backward(sum(scale * c * t.value for c, t in zip(coefficients, terms, strict=True)))
        result = MicroStep(terms, stats=stats)
        if gramian is not None and self.reweighter is not None:
            values = torch.tensor([float(t.value.detach()) for t in terms], dtype=torch.float64)
            result.norms = row_norms(gramian[plan.projected :, plan.projected :], plan.group_names)
            result.group_losses = dict(zip(plan.group_names, (plan.groups @ values).tolist(), strict=True))
        if gramian is not None and tap:
            result.gramian_rows = self.engine.backpropagated_rows
        return result

    def _owners(self, batch: Batch) -> TokenOwners | None:
        """Each batch row's capability, so the engine can split gradients by capability (module taps)."""
        if not self.layer_hooks:
            return None
        order = self.config.capabilities
        rows = [order.index(c) for c in batch.capabilities]
        return owners_of(rows, batch.roles.vision.sum(1), len(order))

    def plan_rows(self, terms: list[TermValue], weights: dict[str, float]) -> RowPlan:
        """The loss combinations whose Gramian this step needs, as rows over the atomic terms.

        First the projection rows of the grouping when a method is on (teacher: the anchor w_ce sum_c CE_c and a
        follower sum_c pi_{c,t} w_t L_t(c) per teacher; capability: c:sup = w_ce CE_c and c:distill =
        sum_t pi_{c,t} w_t L_t(c)), then, with reweighting, one row per weight group: the loss its weight
        multiplies (Pi-mixed in the paper mode; unmixed in the reference mode, as the released code measures).
        Backpropagating only these rows, not every atomic term, keeps the vmapped backward as small as it can be.
        """
        keys = [(t.capability, t.name) for t in terms]
        if self.recipe.baseline:
            # Baselines: CE plus one unmixed term, never projected (single-teacher protocol).
            names = self.recipe.names
            groups = torch.tensor([[float(t.name == n) for t in terms] for n in names], dtype=torch.float64)
            combination = None
        else:
            names, groups = group_matrix(keys, self.pi, mixed=self.config.reweight.mode == "paper")
            grouping = self.config.gradients.grouping
            combination = (
                teacher_matrix(keys, weights, self.pi)
                if grouping == "teacher"
                else combination_matrix(keys, weights, self.pi)
            )
        blocks = []
        projected = 0
        if combination is not None and self.method != "none":
            blocks.append(combination.matrix)
            projected = combination.matrix.shape[0]
        if self.reweighter is not None:
            blocks.append(groups)
        rows = torch.cat(blocks) if blocks else None
        return RowPlan(combination, projected, tuple(names), groups, rows)

    def _gramian(self, terms: list[TermValue], tapped: Any, rows: torch.Tensor) -> torch.Tensor:
        """The exact Gramian of the row combinations; under fp16 the rows are loss-scaled and unscaled after."""
        scale = self.loss_scale.scale
        value = terms[0].value
        cotangents = scale * rows.to(device=value.device, dtype=value.dtype)
        values = [t.value for t in terms]
        if isinstance(self.engine, sharding.ShardedGramian):
            return self.engine.gramian(values, cotangents) / scale**2
        groups = [self.config.capabilities.index(t.capability) for t in terms]
        return self.engine.gramian(values, tapped, cotangents, groups) / scale**2

    def coefficients(
        self, terms: list[TermValue], plan: RowPlan, gramian: torch.Tensor | None, weights: dict[str, float]
    ) -> tuple[torch.Tensor, ProjectionStats | None]:
        """Per-term coefficients: eq. 17's weights, projected by the method when the step has a Gramian (or reusing
        the last refresh's projection between refreshes)."""
        dtype = terms[0].value.dtype
        if plan.combination is None:
            return torch.tensor([weights[t.name] for t in terms], dtype=dtype), None
        combination = plan.combination
        stats = None
        if gramian is not None and plan.projected:
            rows, stats = self._project(combination, gramian[: plan.projected, : plan.projected])
            self.row_coefficients = rows
        elif self.method != "none" and self.row_coefficients is not None:
            rows = (
                self.row_coefficients
            )  # amortised: the last refresh's projection applied to this step's rows
        else:
            rows = torch.ones(combination.matrix.shape[0], dtype=torch.float64)
        return atomic_coefficients(combination.matrix, rows).to(dtype), stats

    def _project(
        self, combination: Combination | TeacherCombination, gramian: torch.Tensor
    ) -> tuple[torch.Tensor, ProjectionStats]:
        settings = self.config.gradients
        if isinstance(combination, TeacherCombination):
            return combine_teacher_weights(
                self.method,
                gramian,
                combination.sup_index,
                combination.follower_index,
                self.permutations,
                settings.eps,
                settings.anchor_share,
            )
        return combine_weights(
            self.method,
            gramian,
            combination.sup_index,
            combination.distill_index,
            self.permutations,
            settings.eps,
        )

    # ---- the loop -------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        self._maybe_resume()
        if self.rank == 0:
            run_record.write_record(self.config, self.record_changes, self.step)
        trackers = self._trackers()
        log: list[dict[str, Any]] = []
        last = None
        with TrainProgress(self.total_steps, self.step, self.config.run.log_every, self.rank) as progress:
            progress.say(self._plan())
            while self.step < self.total_steps:
                record = self.train_step()
                log.append(record)
                self._write_log(record, trackers)
                progress.update(record)
                if self.step % self.config.run.save_every == 0 or self.step == self.total_steps:
                    last = self._save()
                if self.validation is not None and self.validation.due(self.step):
                    self._validate(trackers)
        if trackers is not None:
            trackers.finish()
        return TrainResult(self.step, self.skipped, self.output_dir, last, log, self.lengths)

    def _plan(self) -> str:
        """The start line: the planned optimizer steps, how they were derived, and the step resumed at."""
        optim, sampler = self.config.optim, self.sampler
        per_capability = isinstance(sampler, CapabilitySampler)
        samples = max(len(p) for p in sampler.pools.values()) if per_capability else len(sampler.samples)
        line = planned_steps(
            self.total_steps,
            max_steps=optim.max_steps,
            epochs=optim.epochs,
            micro_steps_per_epoch=sampler.micro_steps_per_epoch(),
            samples=samples,
            micro_batch=self.config.data.micro_batch,
            grad_accum=optim.grad_accum,
            world=self.world,
            per_capability=per_capability,
        )
        return line + (f", resuming at step {self.step}" if self.step else "")

    def current_weights(self) -> dict[str, float]:
        """The loss weights of the next step (the reweighting's, or 1)."""
        return self.reweighter.weights() if self.reweighter else dict.fromkeys(self.recipe.names, 1.0)

    def accumulate(
        self, batches: Sequence[Batch], weights: dict[str, float] | None = None, refresh: bool = True
    ) -> list[MicroStep]:
        """Zero the gradients and run the window's micro-steps: ``.grad`` then holds the step's combined update
        (summed over micro-steps, before unscaling, clipping and the optimizer)."""
        weights = self.current_weights() if weights is None else weights
        window = self.window_counts(batches)
        self.optimizer.zero_grad(set_to_none=True)
        return [self.micro_step(batch, window, refresh, weights) for batch in batches]

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its log record."""
        started = time.perf_counter()
        config = self.config
        refresh = self.step % config.gradients.refresh_every == 0
        weights = self.current_weights()
        results = self.accumulate(self.next_window(), weights, refresh)
        record: dict[str, Any] = {
            "step": self.step + 1,
            "lr": self.scheduler.get_last_lr()[0],
            "world": self.world,
        }
        record.update({f"weight/{n}": w for n, w in weights.items()})
        totals: dict[str, float] = defaultdict(float)
        for result in results:
            for term in result.terms:
                totals[f"loss/{term.name}/{term.capability}"] += float(
                    dist.all_reduce_sum(term.value.detach())
                )
        record.update(totals)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        # Each rank's terms are partial sums of the global window means; FSDP already reduce-scattered its shards.
        dist.sum_gradients([p for p in params if not isinstance(p, DTensor)])
        params = [p for p in params if p.grad is not None]
        if self.loss_scale.scale != 1.0:
            for p in params:
                p.grad.div_(self.loss_scale.scale)
        record["loss_scale"] = self.loss_scale.scale
        finite = not any(r.nonfinite for r in results) and all(
            torch.isfinite(sharding.local(p.grad)).all() for p in params
        )
        finite = dist.all_reduce_sum(torch.tensor(float(not finite))).item() == 0
        overflow = self.loss_scale.update(finite)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            # An fp16 overflow is expected while the loss scale settles; only other non-finite steps count.
            self.nonfinite_streak += 0 if overflow else 1
            record["skipped_nonfinite"] = 1
            if self.nonfinite_streak > config.run.max_nonfinite_streak:
                raise TrainingError(
                    f"{self.nonfinite_streak} optimizer steps in a row had non-finite losses or gradients (last at "
                    f"step {self.step + 1}); lower optim.lr, use float32 or bf16 instead of fp16, or check the data"
                )
        else:
            self.nonfinite_streak = 0
            if config.optim.max_grad_norm:
                record["grad_norm"] = float(
                    torch.nn.utils.clip_grad_norm_(params, config.optim.max_grad_norm)
                )
            self.optimizer.step()
            self._record_projections(record, results)
            rows = [r.gramian_rows for r in results if r.gramian_rows is not None]
            if rows:  # rows the Gramian's vmapped backward carried (fewer when split by capability)
                record["gramian/rows"] = max(rows)
            self._reweight(record, results)
        self.scheduler.step()
        self.step += 1
        record["loss"] = sum(v for k, v in totals.items())
        record["seconds"] = time.perf_counter() - started
        return record

    def _record_projections(self, record: dict[str, Any], results: list[MicroStep]) -> None:
        for result in results:
            if result.stats is None:
                continue
            for key, value in result.stats.as_log().items():
                # Counts add up over the window's micro-steps; the amplification ratio keeps its worst value.
                combine = max if key.endswith("amplification") else (lambda a, b: a + b)
                record[key] = combine(record[key], value) if key in record else value

    def _reweight(self, record: dict[str, Any], results: list[MicroStep]) -> None:
        """One reweighting step on the window's mean group losses and gradient norms (each from the loss its
        weight multiplies)."""
        usable = [r for r in results if r.norms]
        if self.reweighter is None or not usable:
            return
        losses: dict[str, float] = defaultdict(float)
        norms: dict[str, float] = defaultdict(float)
        for result in usable:
            for name, loss in result.group_losses.items():
                losses[name] += float(dist.all_reduce_sum(torch.tensor(loss, dtype=torch.float64))) / len(
                    usable
                )
            for name, norm in result.norms.items():
                norms[name] += norm / len(usable)
        step: ReweightStep | None = self.reweighter.update(dict(losses), dict(norms))
        if step is not None:
            record.update(step.as_log())

    # ---- persistence ----------------------------------------------------------------------------------------
    def _state(self, optimizer: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": self.step,
            "skipped": self.skipped,
            "streak": self.nonfinite_streak,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": ckpt.rng_state(),
            "permutations": self.permutations.get_state(),
            "row_coefficients": self.row_coefficients,
            "reweighter": self.reweighter.state_dict() if self.reweighter else None,
            "projectors": self.projectors.state_dict(),
            "loss_scale": self.loss_scale.state_dict(),
        }

    def _trained(self) -> torch.nn.Module:
        """The student and the hidden-state projectors: every tensor the optimizer updates, under one root."""
        return torch.nn.ModuleDict({"student": self.models.student, "projectors": self.projectors})

    def _validate(self, trackers: Trackers | None) -> None:
        """Evaluate on data.val, log the result, and keep the checkpoint as best/ when it is the best so far."""
        record = {"step": self.step, **self.validation.evaluate()}
        if self.rank == 0:
            self._append_log(record, trackers)
        if self.validation.improved(record):
            self._save(best=record)

    def _save(self, best: dict[str, Any] | None = None) -> Path:
        """Write checkpoint-<step> (rotated), or with ``best`` (its validation record) best/ (kept apart)."""
        path = self.output_dir / (ckpt.BEST if best is not None else f"checkpoint-{self.step}")
        model = self.config.model
        weights = None
        if self.sharded:  # collectives: every rank gathers, rank 0 writes
            weights = sharding.full_model_state(self.models.student)
            state = self._state(sharding.full_optimizer_state(self._trained(), self.optimizer))
        else:
            state = self._state(self.optimizer.state_dict())
        save_dtype = ckpt.resolve_save_dtype(model.save_dtype, model.student, model.dtype)
        config_text = run_record.config_text(self.config)
        student, processor = self.models.student, self.models.processor
        if self.rank == 0 and best is not None:
            ckpt.save_best(self.output_dir, best, student, processor, state, weights, save_dtype, config_text)
        elif self.rank == 0:
            keep = self.config.run.keep_checkpoints
            ckpt.save_checkpoint(
                self.output_dir, self.step, student, processor, state, keep, weights, save_dtype, config_text
            )
        dist.barrier()
        return path

    def _maybe_resume(self) -> None:
        """Restore everything from the checkpoint chosen at construction (checked against its manifest then)."""
        latest = self.resume_from
        if latest is None:
            return
        if self.rank == 0:
            console.print(f"resuming from {latest.name}")
        state = ckpt.load_state(latest)
        if self.sharded:
            weights = {f"student.{k}": v for k, v in ckpt.saved_weights(self.models.student, latest).items()}
            weights.update({f"projectors.{k}": v for k, v in state["projectors"].items()})
            sharding.load_full_state(self._trained(), self.optimizer, weights, state["optimizer"])
        else:
            ckpt.load_student_weights(self.models.student, latest)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.permutations.set_state(state["permutations"])
        self.row_coefficients = state["row_coefficients"]
        if self.reweighter is not None and state["reweighter"] is not None:
            self.reweighter.load_state_dict(state["reweighter"])
        self.projectors.load_state_dict(state["projectors"])
        self.loss_scale.load_state_dict(state["loss_scale"])
        self.step, self.skipped, self.nonfinite_streak = state["step"], state["skipped"], state["streak"]
        ckpt.set_rng_state(state["rng"])
        # Drop log lines written after the checkpoint (they will be written again) and a line torn by a kill.
        if self.log_path.exists():
            kept = [
                line for line in self.log_path.read_text().splitlines() if _logged_step(line) <= self.step
            ]
            self.log_path.write_text("".join(line + "\n" for line in kept))

    def _trackers(self) -> Trackers | None:
        if not self.config.run.report_to or self.rank != 0:
            return None
        config = run_record.leaves(self.config.model_dump(mode="json"))
        return Trackers(self.config.run.report_to, self.output_dir, config)

    def _write_log(self, record: dict[str, Any], trackers: Trackers | None) -> None:
        if self.rank != 0 or (
            record["step"] % self.config.run.log_every and record["step"] != self.total_steps
        ):
            return
        self._append_log(record, trackers)

    def _append_log(self, record: dict[str, Any], trackers: Trackers | None) -> None:
        with self.log_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if trackers is not None:
            trackers.log(record)


def _logged_step(line: str) -> float:
    """The step of a log line, or infinity for a line that is not a complete record."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def train(config: TrainConfig, **kwargs: Any) -> TrainResult:
    return Trainer(config, **kwargs).train()
