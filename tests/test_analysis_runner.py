"""``drivekd analyze`` end to end on tiny models: every metric against an independent per-sample eager route, the
command's files, its refusals, and a run on the real DriveLM sample."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import yaml
from PIL import Image
from typer.testing import CliRunner

from drivekd.analysis.cli import analyze_cmd, figures_cmd
from drivekd.analysis.dataset import image_key, load_prestudy
from drivekd.analysis.runner import AnalysisOptions, analyze
from drivekd.data.collate import VLMCollator
from drivekd.data.drivelm import import_drivelm
from drivekd.data.schema import read_jsonl, write_jsonl
from drivekd.data.synthetic import generate_split
from drivekd.errors import DataError
from drivekd.models.pair import build_tiny_pair
from drivekd.training.config import load_config

KEYS = {
    "adjacent_cosine",
    "vision_text_cosine",
    "intra_consistency",
    "dispersion",
    "confidence",
    "recommended_layers",
}
FIGURES = ("fig2_summary", "fig4_similarity", "fig5_intra_consistency", "fig6_dispersion", "fig7_confidence")
runner = CliRunner()
app = typer.Typer()
app.command("analyze")(analyze_cmd)
app.command("figures")(figures_cmd)


@app.callback()
def _root() -> None:
    """A group, so the command is invoked by name as under ``drivekd``."""


@pytest.fixture(scope="module")
def prestudy(tmp_path_factory) -> tuple[Path, Path]:
    """Two synthetic front-view scenes with five questions each (2 perception, 1 reasoning, 2 planning), one
    rewording per scene, and a general split."""
    root = tmp_path_factory.mktemp("prestudy")
    # unmarked, so that all questions of a scene share its image (a framed copy would be an image of its own)
    generate_split(root, n_scenes=2, seed=0, views="single", image_size=(112, 63), mark_objects=False)
    generate_split(root, n_scenes=1, seed=0, image_size=(112, 63), domain="general", split="general")
    samples = list(read_jsonl(root / "train.jsonl"))
    rows = []
    for scene in (samples[:8], samples[8:]):
        picked = [scene[k] for k in (0, 1, 3, 5, 6)]
        assert [s.capability for s in picked] == ["perception"] * 2 + ["reasoning"] + ["planning"] * 2
        reworded = picked[3].model_copy(deep=True)
        reworded.id = picked[3].id + "-reworded"
        reworded.question = "Rephrased: " + picked[3].question
        reworded.meta["paraphrase_of"] = picked[3].id
        rows += [*picked, reworded]
    write_jsonl(rows, root / "prestudy.jsonl")
    return root / "prestudy.jsonl", root / "general.jsonl"


def _cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _reference(pair, samples, image_root):
    """Per sample, unbatched, eager attention with output_attentions and a hook for the raw last layer."""
    model = copy.deepcopy(pair.student)
    model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    layers = pair.family.decoder_layers(model)
    collate = VLMCollator(pair.student_processor, pair.family.image_token_id(model), image_root=image_root)
    raw = {}
    handle = layers[-1].register_forward_hook(lambda m, a, out: raw.__setitem__("h", out))
    rows = {}
    with torch.no_grad():
        for sample in samples:
            batch = collate([sample])
            out = model(**batch.inputs, output_hidden_states=True, output_attentions=True)
            hidden = [h[0].double().numpy() for h in out.hidden_states[: len(layers)]]
            hidden.append(raw["h"][0].double().numpy())  # layer N before the final norm
            normed = out.hidden_states[len(layers)][0].double().numpy()
            text, answer = batch.roles.text[0].numpy(), batch.roles.answer[0].numpy()
            answer_text = np.flatnonzero(text & answer)
            rows[sample.id] = {
                "hidden": hidden,
                "normed": normed,
                "maps": [a[0].mean(0).double().numpy() for a in out.attentions],
                "vision": batch.roles.vision[0].numpy(),
                "text": text,
                "question": np.flatnonzero(text & ~answer)[-1],
                "answer": answer_text[-1],
                "logits": out.logits[0, answer_text - 1].double().numpy(),
            }
    handle.remove()
    return rows


def _mean_pairs(vectors) -> float:
    return float(np.mean([_cos(a, b) for a, b in itertools.combinations(vectors, 2)]))


def test_every_metric_matches_an_independent_per_sample_route(prestudy):
    data_path, general_path = prestudy
    pair = build_tiny_pair("qwen2_5_vl")
    with torch.no_grad():  # a non-trivial final norm, so that layer N before and after it differ in direction
        pair.student.model.language_model.norm.weight.uniform_(0.2, 3.0)
    data = load_prestudy(data_path)
    general = load_prestudy(general_path, domain="general", max_samples=3)
    metrics = analyze(
        pair.student,
        pair.student_processor,
        pair.family,
        data,
        general,
        AnalysisOptions(batch_size=3, bins=4),
    )
    n = len(
        pair.family.decoder_layers(pair.student)
    )  # 2 query heads over 1 key head: grouped-query attention
    ref = _reference(pair, data.samples + general.samples, data.image_root)
    driving = [ref[s.id] for s in data.samples]

    tokens = [(r["hidden"], i) for r in driving for i in range(len(r["text"]))]
    adjacent = [np.mean([_cos(h[k][i], h[k + 1][i]) for h, i in tokens]) for k in range(n)]
    np.testing.assert_allclose(metrics["adjacent_cosine"]["values"], adjacent, atol=2e-5)
    assert metrics["adjacent_cosine"]["tokens"] == len(tokens)
    normed = np.mean(
        [_cos(r["hidden"][n - 1][i], r["normed"][i]) for r in driving for i in range(len(r["text"]))]
    )
    assert metrics["adjacent_cosine"]["last_with_final_norm"] == pytest.approx(normed, abs=2e-5)
    assert abs(normed - adjacent[-1]) > 1e-3  # the final norm's weights change the direction

    vision_text = [
        np.mean(
            [_cos(r["hidden"][k][r["vision"]].mean(0), r["hidden"][k][r["text"]].mean(0)) for r in driving]
        )
        for k in range(n + 1)
    ]
    np.testing.assert_allclose(metrics["vision_text_cosine"]["values"], vision_text, atol=2e-5)

    for capability in ("perception", "reasoning", "planning"):
        centres: dict = {}
        for sample in data.samples:
            if sample.capability == capability:
                r = ref[sample.id]
                centres.setdefault(image_key(sample), []).append([h[r["question"]] for h in r["hidden"]])
        means = [np.mean(v, axis=0) for v in centres.values()]
        expected = [_mean_pairs([m[k] for m in means]) for k in range(n + 1)]
        np.testing.assert_allclose(
            metrics["intra_consistency"]["by_capability"][capability], expected, atol=2e-5
        )

    by_image: dict = {}
    for sample in data.samples:
        by_image.setdefault(image_key(sample), []).append(sample)
    for kind in ("question", "rewording"):
        hidden_means, attention_means = [], []
        for group in by_image.values():
            pairs = [
                (ref[a.id], ref[b.id])
                for a, b in itertools.combinations(group, 2)
                if (data.groups.get(a.id) is not None and data.groups.get(a.id) == data.groups.get(b.id))
                == (kind == "rewording")
            ]
            if not pairs:  # an image without a pair of this kind adds nothing to the mean
                continue
            hidden = [
                [1 - _cos(a["hidden"][k][a["answer"]], b["hidden"][k][b["answer"]]) for a, b in pairs]
                for k in range(1, n + 1)
            ]
            attention = []
            for k in range(n):  # decoder index k is paper layer k + 1
                values = []
                for a, b in pairs:
                    m = min(len(a["text"]), len(b["text"]))  # the top-left overlap of the two maps
                    values.append(1 - _cos(a["maps"][k][:m, :m], b["maps"][k][:m, :m]))
                attention.append(values)
            hidden_means.append(np.mean(hidden, axis=1))
            attention_means.append(np.mean(attention, axis=1))
        dispersion = metrics["dispersion"]
        np.testing.assert_allclose(
            dispersion["hidden"][kind]["all"], np.mean(hidden_means, axis=0), atol=2e-5
        )
        np.testing.assert_allclose(
            dispersion["attention"][kind]["all"], np.mean(attention_means, axis=0), atol=1e-5
        )
    assert metrics["dispersion"]["pairs"]["rewording"] == 2

    for domain, group in (("driving", data.samples), ("general", general.samples)):
        logits = [ref[s.id]["logits"] for s in group]
        top1 = []
        for z in logits:
            p = np.exp(z - z.max(-1, keepdims=True))
            top1.extend((p / p.sum(-1, keepdims=True)).max(-1))
        got = metrics["confidence"]["domains"][domain]
        assert got["tokens"] == len(top1) and got["answers"] == len(group)
        assert got["by_temperature"]["1"]["top1"]["mean"] == pytest.approx(np.mean(top1), abs=1e-6)


def _invoke(*args: str):
    return runner.invoke(app, ["analyze", *args])


def _check_outputs(out: Path, layers: int, role: str) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= KEYS
    assert len(metrics["adjacent_cosine"]["values"]) == layers
    assert len(metrics["vision_text_cosine"]["values"]) == layers + 1
    for values in metrics["intra_consistency"]["by_capability"].values():
        assert values is None or len(values) == layers + 1
    for signal in ("hidden", "attention"):
        for values in (metrics["dispersion"][signal]["question"] or {}).values():
            assert values is None or len(values) == layers
    assert metrics["dispersion"]["layers"] == list(range(1, layers + 1))
    block = yaml.safe_load((out / "layers.yaml").read_text())
    assert block == {"layers": metrics["recommended_layers"]["layers"]}
    chosen = block["layers"][role]
    assert set(chosen) == {"perception", "reasoning", "planning"}
    assert (
        1
        <= chosen["perception"]
        == chosen["reasoning"][0]
        <= chosen["reasoning"][1]
        == chosen["planning"]
        < layers
    )
    for name in FIGURES:
        path = out / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
    return metrics


def test_command_runs_a_tiny_model_and_keeps_earlier_results(prestudy, tmp_path):
    data_path, general_path = prestudy
    out = tmp_path / "run"
    args = ["--model", "tiny:qwen2_5_vl", "--data", str(data_path), "--out", str(out), "--role", "teacher"]
    result = _invoke(*args, "--general-data", str(general_path), "--max-samples", "8", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    metrics = _check_outputs(out, 6, "teacher")
    config = load_config(out / "layers.yaml")  # what `drivekd train` reads
    chosen = metrics["recommended_layers"]["layers"]["teacher"]
    assert config.layers.teacher.model_dump() == chosen | {"reasoning": tuple(chosen["reasoning"])}
    assert "layers.teacher.reasoning=[" in result.output
    assert set(metrics["confidence"]["domains"]) == {"driving", "general"}
    assert metrics["model"]["role"] == "teacher" and metrics["data"]["samples"] == 8
    before = (out / "metrics.json").read_bytes()
    result = _invoke(*args)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "metrics.json").read_bytes() == before
    result = _invoke(*args, "--overwrite", "--max-samples", "3", "--temperatures", "1.0")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["confidence"]["temperatures"] == [1.0]
    # Figures of several runs side by side, one of them with nothing to show for intra, dispersion and general.
    sparse = json.loads(before)
    sparse["intra_consistency"]["by_capability"] = dict.fromkeys(sparse["intra_consistency"]["by_capability"])
    sparse["dispersion"]["hidden"]["question"] = sparse["dispersion"]["attention"]["question"] = None
    sparse["confidence"]["domains"].pop("general")
    (tmp_path / "sparse.json").write_text(json.dumps(sparse))
    figures = tmp_path / "figures"
    metrics_files = [str(out / "metrics.json"), str(tmp_path / "sparse.json")]
    result = runner.invoke(app, ["figures", *metrics_files, "--out", str(figures), "--labels", "full,sparse"])
    assert result.exit_code == 0, result.output
    for name in FIGURES:
        with Image.open(figures / f"{name}.png") as image:
            image.verify()
    result = runner.invoke(app, ["figures", *metrics_files, "--out", str(figures), "--labels", "one"])
    assert result.exit_code == 2 and "--labels" in result.output


def test_command_loads_a_saved_model_folder(prestudy, tmp_path):
    data_path, _ = prestudy
    build_tiny_pair("internvl", seed=2).save(tmp_path / "pair")
    out = tmp_path / "run"
    model = str(tmp_path / "pair" / "student")
    result = _invoke("--model", model, "--data", str(data_path), "--out", str(out), "--max-samples", "5")
    assert result.exit_code == 0, result.output
    metrics = _check_outputs(out, 4, "student")
    assert metrics["model"]["family"] == "internvl"
    assert "general" not in metrics["confidence"]["domains"]
    assert metrics["dispersion"]["hidden"]["rewording"] is None  # the first rewording is sample 6


def test_bad_input_is_a_named_error_and_writes_nothing(prestudy, tmp_path):
    data_path, _ = prestudy
    rows = [json.loads(line) for line in data_path.read_text().splitlines()]
    rows[4]["meta"]["paraphrase_of"] = "no-such-question"
    bad = data_path.parent / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    result = _invoke("--model", "tiny:qwen2_5_vl", "--data", str(bad), "--out", str(out))
    assert result.exit_code == 2
    assert (
        "bad.jsonl" in result.output
        and "meta.paraphrase_of" in result.output
        and rows[4]["id"] in result.output
    )
    assert not out.exists()
    rows[4]["meta"]["paraphrase_of"] = rows[7]["id"]  # a question of the other image
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match="different image"):
        load_prestudy(bad)
    result = _invoke("--model", "tiny:nope", "--data", str(data_path), "--out", str(out))
    assert result.exit_code == 2 and "unknown model family" in result.output
    result = _invoke(
        "--model", "tiny:qwen2_5_vl", "--data", str(data_path), "--out", str(out), "--temperatures", "0,1"
    )
    assert result.exit_code == 2 and "positive" in result.output


@pytest.mark.shared
def test_command_on_the_drivelm_sample(shared_drivelm, tmp_path):
    imported = import_drivelm(shared_drivelm / "test_eval.json", shared_drivelm)
    data = tmp_path / "drivelm.jsonl"
    write_jsonl(imported.samples, data)
    out = tmp_path / "run"
    result = _invoke(
        "--model", "tiny:qwen3_vl", "--data", str(data), "--image-root", str(shared_drivelm), "--out", str(out),
        "--max-samples", "12", "--batch-size", "4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = _check_outputs(out, 4, "student")
    assert metrics["data"]["images"] >= 2 and metrics["data"]["samples"] == 12
    assert metrics["model"]["family"] == "qwen3_vl"
    assert metrics["vision_text_cosine"]["samples"] == 12
