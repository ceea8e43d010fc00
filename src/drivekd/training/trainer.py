"""The Drive-KD training loop.

One optimizer step = ``grad_accum`` micro-steps; a micro-step is one forward of a batch holding ``micro_batch``
samples of every capability of the recipe. Per micro-step the atomic terms (CE and each teacher's term, per
capability, normalised over the whole window) are built; when a projection method or the reweighting is on, the
exact Gramian of their gradients comes from one vmapped backward (:class:`GramianEngine`), the method turns it into
coefficients, and one ordinary backward of sum_m c_m L_m adds the combined update to ``.grad``. So the projection
acts on each micro-step's capability gradients and the projected updates are summed over the window. The
reweighting takes one step per optimizer step, on the window's mean losses and gradient norms. With ``run.fsdp`` the
student is sharded and the Gramian comes from per-row sharded gradients (:mod:`drivekd.training.sharding`).
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
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch.distributed.tensor import DTensor
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from drivekd.capture.recorder import AttentionRecorder, use_capture_attention
from drivekd.data.collate import Batch, VLMCollator
from drivekd.data.roles import TVIndex
from drivekd.data.schema import Sample, read_jsonl
from drivekd.errors import DriveKDError
from drivekd.gradients import LossReweighter
from drivekd.gradients.autogram import GramianEngine, functional_forward
from drivekd.gradients.gramian import combine_weights
from drivekd.gradients.mixing import Combination, atomic_coefficients, combination_matrix, group_matrix
from drivekd.gradients.owners import TokenOwners, owners_of
from drivekd.losses import HiddenProjector
from drivekd.models.families import FamilyAdapter
from drivekd.signals.types import TeacherSignals
from drivekd.training import checkpoint as ckpt
from drivekd.training import distributed as dist
from drivekd.training import sharding
from drivekd.training.config import TrainConfig, dump_config
from drivekd.training.models import Models, build_models
from drivekd.training.objective import Objective, Term, logit_positions, window_counts
from drivekd.training.recipes import Recipe, hidden_pairs, resolve_layers, student_plan, teacher_needs
from drivekd.training.sampling import CapabilitySampler
from drivekd.training.scaling import LossScale


@dataclass(frozen=True)
class _RowPlan:
    """What one micro-step backpropagates for its Gramian (see ``Trainer._plan``)."""

    combination: Combination | None  # eq. 17 rows; None for the KL / hidden baselines
    projected: int  # how many leading rows are projection rows (0 without a method)
    group_names: tuple[str, ...]  # reweighting groups, in the order of the trailing rows
    rows: torch.Tensor | None  # (R, terms); None when no Gramian is needed


class TrainingError(DriveKDError):
    """Training cannot go on (too many non-finite steps in a row, say)."""


@dataclass
class TrainResult:
    steps: int
    skipped_steps: int
    output_dir: Path
    checkpoint: Path | None
    log: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    def __init__(
        self, config: TrainConfig, *, samples: Sequence[Sample] | None = None, models: Models | None = None
    ) -> None:
        self.config = config
        self.output_dir = Path(config.run.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.run.seed)
        self.models = models or build_models(config)
        self.device = next(self.models.student.parameters()).device
        self.recipe = Recipe.of(config.distill)
        self.family: FamilyAdapter = self.models.family
        s_depth = len(self.family.decoder_layers(self.models.student))
        t_depth = self.models.teacher_depth or s_depth
        self.layers = resolve_layers(config.layers, s_depth, t_depth)
        self.plan = student_plan(self.recipe, self.layers, config.distill)
        self.needs = teacher_needs(self.recipe, self.layers, config.distill, t_depth, s_depth)
        pairs = hidden_pairs(self.recipe, s_depth, t_depth)
        self.projectors = self._projectors(len(pairs))
        self.objective = Objective(self.recipe, self.layers, config.distill, self.projectors, pairs)
        use_capture_attention(self.models.student)
        if config.model.gradient_checkpointing:
            self.models.student.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        # Module hooks and map consumers work during the forward; gradient checkpointing replays layers in backward,
        # which would fire the hooks again and not recompute the maps, so both are off under it.
        self.layer_hooks = not config.model.gradient_checkpointing
        self.samples = list(samples) if samples is not None else self._read_data()
        self.rank, self.world = dist.rank_and_world()
        self.sharded = config.run.fsdp
        if self.sharded:
            sharding.shard_student(self.models.student, self.family)
        precision = config.optim.mixed_precision
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.loss_scale = LossScale(precision == "fp16")
        self.sampler = CapabilitySampler(
            self.samples,
            config.capabilities,
            per_capability=config.data.micro_batch,
            seed=config.run.seed,
            rank=self.rank,
            world=self.world,
        )
        root = config.data.image_root or str(Path(config.data.train).parent)
        self.collate = VLMCollator(
            self.models.processor,
            self.family.image_token_id(self.models.student),
            image_root=root,
            padding_side=config.data.padding_side,
        )
        params = [p for p in self.models.student.parameters() if p.requires_grad] + list(
            self.projectors.parameters()
        )
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
        self.reweighter = (
            LossReweighter(
                self.recipe.loss_names,
                {n: config.reweight.ratios.get(n, 1.0) for n in self.recipe.loss_names},
                alpha=config.reweight.alpha,
                lr=config.reweight.lr,
                bounds=config.reweight.bounds,
            )
            if config.reweight.enabled and len(self.recipe.loss_names) > 1
            else None
        )
        self.method = config.gradients.method or "none"
        needs_gramian = self.method != "none" or self.reweighter is not None
        self.engine: GramianEngine | sharding.ShardedGramian | None = None
        if needs_gramian and self.sharded:
            self.engine = sharding.ShardedGramian(
                list(self.models.student.parameters()), list(self.projectors.parameters())
            )
        elif needs_gramian:
            self.engine = GramianEngine(
                self.models.student,
                reduce=dist.all_reduce_sum,
                gather=dist.all_gather_cat,
                is_vision=self.family.is_vision_module,
            )
        self.permutations = torch.Generator().manual_seed(config.run.seed)
        # Pi mixes teachers only in multi-teacher runs (eq. 17); a single-teacher run is CE + w_t L_t.
        self.pi = (
            config.distill.pi
            if self.recipe.teachers and len(self.recipe.teachers) > 1
            else torch.eye(3).tolist()
        )
        self.row_coefficients: torch.Tensor | None = None  # the last refresh, for refresh_every > 1
        self.step = 0
        self.skipped = 0
        self.nonfinite_streak = 0
        self.log_path = self.output_dir / "log.jsonl"

    def _projectors(self, count: int) -> torch.nn.ModuleList:
        if not count:
            return torch.nn.ModuleList()
        widths = (self.family.text_config(self.models.student).hidden_size, self.models.teacher_width)
        return torch.nn.ModuleList(HiddenProjector(*widths) for _ in range(count)).to(self.device)

    def _read_data(self) -> list[Sample]:
        if not self.config.data.train:
            raise TrainingError(
                "data.train is empty: give a Drive-KD JSONL file (drivekd data synth/import-...)"
            )
        root = Path(self.config.data.image_root) if self.config.data.image_root else None
        return [
            s
            for s in read_jsonl(self.config.data.train, image_root=root)
            if s.capability in self.config.capabilities
        ]

    # ---- one micro-step -------------------------------------------------------------------------------------
    def _teacher_signals(self, batch: Batch, index: TVIndex) -> dict[str, TeacherSignals]:
        """One forward per distinct teacher source, asking for everything the teachers it serves need."""
        by_source: dict[int, TeacherSignals] = {}
        out = {}
        for name, source in self.models.sources.items():
            if id(source) not in by_source:
                by_source[id(source)] = source.signals(batch, index, self.needs)
            out[name] = by_source[id(source)]
        return out

    def _micro_step(
        self, batch: Batch, window: Counter, refresh: bool, weights: dict[str, float]
    ) -> dict[str, Any]:
        batch = batch.to(self.device)
        index = TVIndex.from_masks(batch.roles.text, batch.roles.vision)
        teacher = self._teacher_signals(batch, index) if self.models.sources else {}
        positions = logit_positions(batch.labels)
        use_engine = self.engine is not None and refresh
        tap = use_engine and isinstance(self.engine, GramianEngine)
        inputs = dict(batch.inputs, logits_to_keep=positions, output_hidden_states=bool(self.recipe.hidden))
        with (
            self.engine.tap(self._owners(batch)) if tap else nullcontext() as tapped,
            AttentionRecorder(self.models.student, self.plan, grad=True) as recorder,
        ):
            # Attention terms built layer by layer as the forward runs (see StreamedTerms).
            streamed = (
                self.objective.stream(batch, index, teacher)
                if self.layer_hooks and self.recipe.teachers
                else None
            )
            recorder.start(index if self.plan.tv_layers else None, consumer=streamed)
            with torch.autocast(
                self.device.type, self.autocast or torch.bfloat16, enabled=self.autocast is not None
            ):
                out = (
                    functional_forward(self.models.student, tapped, inputs)
                    if tap
                    else self.models.student(**inputs)
                )
            captured = recorder.collect()
            terms = self.objective.terms(
                batch,
                index,
                out.logits,
                captured,
                teacher,
                window,
                out.hidden_states if self.recipe.hidden else (),
                positions,
                streamed,
            )
            local_bad = not all(torch.isfinite(t.value).all() for t in terms)
            if dist.all_reduce_sum(torch.tensor(float(local_bad))).item() > 0:  # every rank skips together
                return {"nonfinite": True, "terms": terms}
            plan = self._plan(terms, weights)
            gramian = (
                self._gramian(terms, tapped, plan.rows) if use_engine and plan.rows is not None else None
            )
            if gramian is not None and not bool(torch.isfinite(gramian).all()):
                return {"nonfinite": True, "terms": terms}  # an fp16 overflow in the vmapped backward
        coefficients, stats, norms = self._combine(terms, plan, gramian, weights)
        scale = self.loss_scale.scale
        torch.autograd.backward(sum(scale * c * t.value for c, t in zip(coefficients, terms, strict=True)))
        rows = self.engine.backpropagated_rows if gramian is not None and tap else None
        return {"nonfinite": False, "terms": terms, "stats": stats, "norms": norms, "gramian_rows": rows}

    def _owners(self, batch: Batch) -> TokenOwners | None:
        """Each batch row's capability, so the engine can split gradients by capability (module taps)."""
        if not self.layer_hooks:
            return None
        order = self.config.capabilities
        rows = [order.index(c) for c in batch.capabilities]
        return owners_of(rows, batch.roles.vision.sum(1), len(order))

    def _plan(self, terms: list[Term], weights: dict[str, float]) -> _RowPlan:
        """The loss combinations whose Gramian this step needs, as rows over the atomic terms.

        First the projection rows (c:sup = w_ce CE_c and c:distill = sum_t pi_{c,t} w_t L_t(c)) when a method is
        on, then, with reweighting, one row per weight group (the loss its weight multiplies). Backpropagating
        only these rows, not every atomic term, keeps the vmapped backward as small as the step allows.
        """
        keys = [(t.capability, t.name) for t in terms]
        baseline = bool(self.recipe.kl or self.recipe.hidden)
        combination = None if baseline else combination_matrix(keys, weights, self.pi)
        if baseline:
            names = self.recipe.loss_names
            groups = torch.tensor([[float(t.name == n) for t in terms] for n in names], dtype=torch.float64)
        else:
            names, groups = group_matrix(keys, self.pi)
        blocks = []
        projected = 0
        if combination is not None and self.method != "none":
            blocks.append(combination.matrix)
            projected = combination.matrix.shape[0]
        if self.reweighter is not None:
            blocks.append(groups)
        rows = torch.cat(blocks) if blocks else None
        return _RowPlan(combination, projected, tuple(names), rows)

    def _gramian(self, terms: list[Term], tapped: Any, rows: torch.Tensor) -> torch.Tensor:
        """The exact Gramian of the row combinations; under fp16 the rows are loss-scaled and unscaled after."""
        scale = self.loss_scale.scale
        value = terms[0].value
        cotangents = scale * rows.to(device=value.device, dtype=value.dtype)
        values = [t.value for t in terms]
        if isinstance(self.engine, sharding.ShardedGramian):
            return self.engine.gramian(values, cotangents) / scale**2
        groups = [self.config.capabilities.index(t.capability) for t in terms]
        return self.engine.gramian(values, tapped, cotangents, groups) / scale**2

    def _combine(
        self, terms: list[Term], plan: _RowPlan, gramian: torch.Tensor | None, weights: dict[str, float]
    ) -> tuple[torch.Tensor, Any, dict[str, float] | None]:
        """Per-term coefficients (eq. 17 weights, projected when a method is on) and the reweighting norms."""
        dtype = terms[0].value.dtype
        norms = None
        if gramian is not None and self.reweighter is not None:
            block = gramian[plan.projected :, plan.projected :]
            squared = torch.diagonal(block).clamp_min(0).sqrt()
            norms = dict(zip(plan.group_names, squared.tolist(), strict=True))
        if plan.combination is None:
            # Baselines: CE plus one unmixed term, never projected (single-teacher protocol).
            return torch.tensor([weights[t.name] for t in terms], dtype=dtype), None, norms
        combination = plan.combination
        stats = None
        if gramian is not None and plan.projected:
            rows, stats = combine_weights(
                self.method,
                gramian[: plan.projected, : plan.projected],
                combination.sup_index,
                combination.distill_index,
                self.permutations,
                self.config.gradients.eps,
            )
            self.row_coefficients = rows
        elif self.method != "none" and self.row_coefficients is not None:
            rows = (
                self.row_coefficients
            )  # amortised: the last refresh's projection applied to this step's rows
        else:
            rows = torch.ones(combination.matrix.shape[0], dtype=torch.float64)
        return atomic_coefficients(combination.matrix, rows).to(dtype), stats, norms

    # ---- the loop -------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        self._maybe_resume()
        dump_config(self.config, self.output_dir / "config.yaml")
        writer = self._tensorboard()
        log: list[dict[str, Any]] = []
        last = None
        with Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=True,
        ) as progress:
            task = progress.add_task("train", total=self.total_steps, completed=self.step, info="")
            while self.step < self.total_steps:
                record = self._optimizer_step()
                log.append(record)
                self._write_log(record, writer)
                progress.update(
                    task, completed=self.step, info=f"loss {record.get('loss', float('nan')):.4f}"
                )
                if self.step % self.config.run.save_every == 0 or self.step == self.total_steps:
                    last = self._save()
        if writer is not None:
            writer.close()
        return TrainResult(self.step, self.skipped, self.output_dir, last, log)

    def _optimizer_step(self) -> dict[str, Any]:
        started = time.perf_counter()
        config = self.config
        refresh = self.step % config.gradients.refresh_every == 0
        weights = self.reweighter.weights() if self.reweighter else dict.fromkeys(self.recipe.loss_names, 1.0)
        batches = [self.collate(self.sampler.next()) for _ in range(config.optim.grad_accum)]
        window = self._global_counts(window_counts(batches, self.recipe, config.distill))
        self.optimizer.zero_grad(set_to_none=True)
        results = [self._micro_step(batch, window, refresh, weights) for batch in batches]
        record: dict[str, Any] = {
            "step": self.step + 1,
            "lr": self.scheduler.get_last_lr()[0],
            "world": self.world,
        }
        record.update({f"weight/{n}": w for n, w in weights.items()})
        totals: dict[str, float] = defaultdict(float)
        for result in results:
            for term in result["terms"]:
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
        finite = not any(r["nonfinite"] for r in results) and all(
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
            rows = [r["gramian_rows"] for r in results if r.get("gramian_rows") is not None]
            if rows:  # rows the Gramian's vmapped backward carried (fewer when split by capability)
                record["gramian/rows"] = max(rows)
            self._reweight(record, results)
        self.scheduler.step()
        self.step += 1
        record["loss"] = sum(v for k, v in totals.items())
        record["seconds"] = time.perf_counter() - started
        return record

    def _global_counts(self, counts: Counter) -> Counter:
        """Window normalisers summed over ranks, so each rank's terms are partial sums of the global means."""
        keys = sorted(counts)
        totals = dist.all_reduce_sum(torch.tensor([counts[k] for k in keys], dtype=torch.float64))
        return Counter(dict(zip(keys, (int(v) for v in totals.tolist()), strict=True)))

    def _record_projections(self, record: dict[str, Any], results: list[dict[str, Any]]) -> None:
        for result in results:
            stats = result.get("stats")
            if stats is None:
                continue
            for key, value in stats.as_log().items():
                # Counts add up over the window's micro-steps; the amplification ratio keeps its worst value.
                combine = max if key.endswith("amplification") else (lambda a, b: a + b)
                record[key] = combine(record[key], value) if key in record else value

    def _reweight(self, record: dict[str, Any], results: list[dict[str, Any]]) -> None:
        usable = [r for r in results if r.get("norms")]
        if self.reweighter is None or not usable:
            return
        losses: dict[str, float] = defaultdict(float)
        norms: dict[str, float] = defaultdict(float)
        for result in usable:
            for term in result["terms"]:
                losses[term.name] += float(dist.all_reduce_sum(term.value.detach())) / len(usable)
            for name, norm in result["norms"].items():
                norms[name] += norm / len(usable)
        active = {n: v for n, v in losses.items() if n in norms}
        step = self.reweighter.update(active, {n: norms[n] for n in active})
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

    def _save(self) -> Path:
        path = self.output_dir / f"checkpoint-{self.step}"
        weights = None
        if self.sharded:  # collectives: every rank gathers, rank 0 writes
            weights = sharding.full_model_state(self.models.student)
            state = self._state(sharding.full_optimizer_state(self._trained(), self.optimizer))
        else:
            state = self._state(self.optimizer.state_dict())
        if self.rank == 0:
            ckpt.save_checkpoint(
                self.output_dir,
                self.step,
                self.models.student,
                self.models.processor,
                state,
                self.config.run.keep_checkpoints,
                weights,
            )
        dist.barrier()
        return path

    def _maybe_resume(self) -> None:
        found = ckpt.list_checkpoints(self.output_dir) if self.config.run.resume else []
        if not found:
            return
        latest = found[-1]
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

    def _tensorboard(self) -> Any:
        if not self.config.run.tensorboard or self.rank != 0:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.output_dir / "tensorboard"))

    def _write_log(self, record: dict[str, Any], writer: Any) -> None:
        if self.rank != 0 or (
            record["step"] % self.config.run.log_every and record["step"] != self.total_steps
        ):
            return
        with self.log_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    writer.add_scalar(key, value, record["step"])


def _logged_step(line: str) -> float:
    """The step of a log line, or infinity for a line that is not a complete record."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def train(config: TrainConfig, **kwargs: Any) -> TrainResult:
    return Trainer(config, **kwargs).train()
