"""Every recipe and gradient method trains, and its first update equals an independent computation.

The reference never touches the training code path: eager attention (``output_attentions``) on copies of the
student and teacher, head means, the pure loss functions of each equation on the full maps, one ``autograd.grad``
per term into flat vectors, and the explicit-vector AGP / G2 / PCGrad of ``drivekd.gradients.explicit``. One
micro-batch per window (a single sample, or one per capability with the per-capability sampler), so every window
normaliser is 1.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from drivekd.data.synthetic import generate_split
from drivekd.gradients import (
    agp,
    agp_teacher_grouped,
    g2,
    g2_teacher_grouped,
    pcgrad,
    stage2_order,
)
from drivekd.losses import (
    answer_kl,
    full_attention_cosine,
    group_targets,
    grouped_hidden_mse,
    reasoning_attention_loss,
    supervised_loss,
    text_to_vision_cosine,
    text_to_vision_mse,
)
from drivekd.training.config import load_config
from drivekd.training.trainer import Trainer

CAPS = ("perception", "reasoning", "planning")
QUIET = ["run.report_to=[]", "run.resume=false", "run.save_every=1000", "reweight.enabled=false"]
CAPABILITY = ["gradients.grouping=capability", "data.sampler=per_capability"]

CASES = {
    "sft": ["distill.recipe=sft"],
    "kl": ["distill.recipe=kl", "distill.kl_temperature=2.0"],
    "hidden-1": ["distill.recipe=hidden", "distill.hidden_layer=1"],
    "hidden-mid": ["distill.recipe=hidden", "distill.hidden_layer=mid"],
    "hidden-pen": ["distill.recipe=hidden", "distill.hidden_layer=pen"],
    "perception": ["distill.recipe=perception"],
    "reasoning": ["distill.recipe=reasoning"],
    "planning": ["distill.recipe=planning"],
    "perception-full": ["distill.recipe=perception", "distill.perception_signal=full"],
    "reasoning-tv": ["distill.recipe=reasoning", "distill.reasoning_signal=tv"],
    "planning-full": ["distill.recipe=planning", "distill.planning_signal=full"],
    "perception-cosine": ["distill.recipe=perception", "distill.metric=cosine"],
    "reasoning-cosine": ["distill.recipe=reasoning", "distill.metric=cosine"],
    "reasoning-reference": ["distill.recipe=reasoning", "distill.normalisation=reference"],
    "planning-reference": ["distill.recipe=planning", "distill.normalisation=reference"],
    "single-g1": ["distill.recipe=planning", "gradients.method=g1"],
    **{
        f"multi-{method}-{grouping}": [
            "distill.recipe=multi",
            f"gradients.method={method}",
            *(CAPABILITY if grouping == "capability" else []),
        ]
        for method in ("none", "g1", "g2", "agp")
        for grouping in ("teacher", "capability")
    },
    "multi-agp-teacher-once": ["distill.recipe=multi", "gradients.method=agp", "gradients.anchor_share=once"],
    "multi-g2-teacher-once": ["distill.recipe=multi", "gradients.method=g2", "gradients.anchor_share=once"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate_split(tmp_path_factory.mktemp("methods"), n_scenes=2, seed=1, views="single").path


def _eager(model: torch.nn.Module, batch, **kwargs):
    """A float64 eager copy of ``model`` run on ``batch``, and the copy (for its parameters)."""
    twin = copy.deepcopy(model)
    twin.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    return twin, twin(**batch.inputs, output_attentions=True, output_hidden_states=True, **kwargs)


def _reference_terms(trainer: Trainer, batch) -> tuple[dict[tuple[str, str], torch.Tensor], list]:
    """Every (term, capability) value from eager maps and the pure losses; the student copy's parameters."""
    distill = trainer.config.distill
    student, out = _eager(trainer.models.student, batch)
    teacher = None
    if trainer.models.sources:
        source = next(iter(trainer.models.sources.values()))
        _, teacher = _eager(source.model, batch)
    maps = [a.mean(dim=1) for a in out.attentions]
    teacher_maps = dict(enumerate(a.mean(dim=1) for a in teacher.attentions)) if teacher is not None else {}
    roles = batch.roles
    text = (roles.valid & ~roles.vision) if distill.normalisation == "reference" else roles.text
    keys = "all" if distill.normalisation == "reference" else "causal"
    cosine = distill.metric == "cosine"
    values = {}
    for capability in dict.fromkeys(batch.capabilities):
        rows = torch.tensor([k for k, c in enumerate(batch.capabilities) if c == capability])
        values["ce", capability] = supervised_loss(out.logits[rows], batch.labels[rows])
        for term in trainer.recipe.terms:
            name = term.name
            if name == "kl":
                values[name, capability] = answer_kl(
                    out.logits[rows], teacher.logits[rows], batch.labels[rows], distill.kl_temperature
                )
            elif name == "hidden":
                pairs = term.pairs
                targets = group_targets(
                    {k: h[rows] for k, h in enumerate(teacher.hidden_states)}, [g for _, g in pairs]
                )
                students = [out.hidden_states[s][rows] for s, _ in pairs]
                values[name, capability] = grouped_hidden_mse(
                    students, targets, roles.valid[rows], list(trainer.projectors)
                )
            elif name in CAPS:
                groups = trainer.layers.teacher[name]
                targets = group_targets({k: m[rows] for k, m in teacher_maps.items()}, groups)
                students = [maps[k][rows] for k in trainer.layers.student[name]]
                kind = {
                    "perception": distill.perception_signal,
                    "reasoning": distill.reasoning_signal,
                    "planning": distill.planning_signal,
                }[name]
                if kind == "tv":
                    loss = text_to_vision_cosine if cosine else text_to_vision_mse
                    per_layer = [
                        loss(s, t, text[rows], roles.vision[rows])
                        for s, t in zip(students, targets, strict=True)
                    ]
                    values[name, capability] = sum(per_layer) / len(per_layer)
                elif cosine:
                    values[name, capability] = full_attention_cosine(students, targets, roles.valid[rows])
                else:
                    values[name, capability] = reasoning_attention_loss(
                        students, targets, roles.valid[rows], keys
                    )
    return values, [p for p in student.parameters() if p.requires_grad]


def _flat(value: torch.Tensor, params: list) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params, strict=True)]
    )


def _reference_update(trainer: Trainer, batch, generator: torch.Generator) -> torch.Tensor:
    values, params = _reference_terms(trainer, batch)
    grads = {key: _flat(v, params) for key, v in values.items()}
    config = trainer.config
    method, grouping = config.gradients.method, config.gradients.grouping
    teachers = trainer.recipe.teachers
    caps = list(dict.fromkeys(batch.capabilities))
    if not teachers:  # sft and the baselines: CE plus the unmixed term
        return sum(grads.values())
    pi = trainer.pi

    def mix(c: str, t: str) -> float:
        return pi[CAPS.index(c)][CAPS.index(t)]

    if grouping == "teacher":
        sup = sum(grads["ce", c] for c in caps)
        followers = {t: sum(mix(c, t) * grads[t, c] for c in caps) for t in teachers}
        if method == "none":
            return sup + sum(followers.values())
        if method == "g1":
            rows = [sup, *followers.values()]
            return pcgrad(rows, stage2_order(generator, range(len(rows))))
        order = stage2_order(generator, list(followers))
        combine = agp_teacher_grouped if method == "agp" else g2_teacher_grouped
        return combine(sup, followers, order, anchor_share=config.gradients.anchor_share)
    sup = {c: grads["ce", c] for c in CAPS if c in caps}
    distill = {c: sum(mix(c, t) * grads[t, c] for t in teachers) for c in sup}
    if method == "none":
        return sum(sup.values()) + sum(distill.values())
    if method == "g1":
        rows = [v for c in sup for v in (sup[c], distill[c])]
        return pcgrad(rows, stage2_order(generator, range(len(rows))))
    order = stage2_order(generator, list(sup))
    return (agp if method == "agp" else g2)(sup, distill, order)


@pytest.mark.parametrize("case", sorted(CASES))
def test_first_update_equals_an_independent_computation(case, data, tmp_path):
    config = load_config(
        overrides=[
            f"data.train={data}",
            f"run.output_dir={tmp_path}",
            *QUIET,
            "model.dtype=float64",
            "optim.grad_accum=1",
            "optim.max_steps=2",
            *CASES[case],
        ]
    )
    trainer = Trainer(config)
    for source in {id(s): s for s in trainer.models.sources.values()}.values():
        source.model.double()
    batch = trainer.next_window()[0]
    batch.inputs["pixel_values"] = batch.inputs["pixel_values"].double()
    generator = torch.Generator()
    generator.set_state(trainer.permutations.get_state())
    trainer.accumulate([batch], dict.fromkeys(trainer.recipe.names, 1.0))
    params = [p for p in trainer.models.student.parameters() if p.requires_grad]
    got = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    expected = _reference_update(trainer, batch, generator)
    # transformers' RMSNorm computes in float32 even in a float64 model: one backward of sum_k c_k L_k and the
    # combination of separate backwards agree to float32 round-off (the mathematics itself to 1e-15,
    # tests/test_gradients_*).
    assert float((got - expected).norm() / expected.norm()) < 1e-6, case
    # ... and the recipe trains end to end: two optimizer steps change the weights.
    before = [p.detach().clone() for p in params]
    result = trainer.train()
    assert result.steps == 2 and result.skipped_steps == 0
    assert any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))
