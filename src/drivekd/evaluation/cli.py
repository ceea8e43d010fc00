"""Command-line glue: ``drivekd eval generate|score|drivelm|report``, ``drivekd judge serve`` and ``drivekd bench
inference``.

``eval_app`` and ``judge_app`` are typer apps to mount under ``drivekd``; :func:`bench_inference_cmd` is a command
for the ``bench`` group.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from drivekd.data.cli import TextOnly, VisualDescriptions
from drivekd.errors import DriveKDError

eval_app = typer.Typer(
    help="Generate predictions, score them (MCQ letters, LLM judge) and report Table-1/2 style.",
    no_args_is_help=True,
)
judge_app = typer.Typer(
    help="A local OpenAI-compatible judge that grades with the offline grader.", no_args_is_help=True
)
console = Console(stderr=True, soft_wrap=True)

ImageRoot = Annotated[
    Path | None,
    typer.Option(
        "--image-root",
        help="Folder image paths are relative to (for DriveBench: contains nuscenes/; for JSONL default: the "
        "root it records, else its folder).",
    ),
]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Do not draw progress bars.")]
JudgeConfigFile = Annotated[Path | None, typer.Option(help="Judge settings (YAML/JSON), no API key.")]
JudgeBaseUrl = Annotated[str | None, typer.Option(help="OpenAI-compatible base URL (.../v1).")]
JudgeModel = Annotated[str | None, typer.Option(help="Judge model name.")]
JudgeKeyEnv = Annotated[
    str | None, typer.Option(help="Environment variable holding the key (default OPENAI_API_KEY).")
]
Concurrency = Annotated[int | None, typer.Option(help="Concurrent judge calls (default 8).")]
Timeout = Annotated[float | None, typer.Option(help="Seconds per judge call (default 120).")]
MaxRetries = Annotated[int | None, typer.Option(help="Retries on 429/5xx/timeouts (default 5).")]
Cache = Annotated[Path | None, typer.Option(help="Judge cache (default runs/judge-cache.sqlite).")]
AllowFailures = Annotated[
    bool,
    typer.Option(
        "--allow-failures",
        help="Exit 0 even when some gradings failed (failed calls, unparsed replies; left out of the means).",
    ),
]


def _fail(err: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(str(err))}")
    return typer.Exit(code=2)


GENERATE_DTYPES = ("auto", "bfloat16", "float16", "float32")
BENCH_DTYPES = ("float32", "bfloat16", "float16")


def _check_device_dtype(device: str, dtype: str, dtypes: tuple[str, ...], *, allow_auto: bool) -> None:
    """Refuse an unknown ``--dtype`` or ``--device``, or a CUDA device that is not there, before any model loads."""
    import re

    import torch

    if dtype not in dtypes:
        raise DriveKDError(f"--dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    choices = "cpu, cuda, cuda:N" + (" or auto" if allow_auto else "")
    if not re.fullmatch(r"cpu|cuda(:\d+)?" + ("|auto" if allow_auto else ""), device):
        raise DriveKDError(f"--device must be {choices}, got {device!r}")
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise DriveKDError(
                f"--device {device}: {torch.cuda.device_count()} CUDA devices are visible; pass --device cpu "
                "or a visible GPU"
            )


@eval_app.command("generate")
def generate_cmd(
    input_path: Annotated[Path, typer.Argument(help="DriveBench QA file (.json) or Drive-KD JSONL.")],
    model: Annotated[str, typer.Option("--model", help="Hub id or a folder saved with save_pretrained.")],
    out: Annotated[Path, typer.Option("--out", help="Predictions JSONL (appended to; a rerun resumes).")],
    image_root: ImageRoot = None,
    text_only: TextOnly = False,
    visual_descriptions: VisualDescriptions = None,
    model_name: Annotated[
        str | None, typer.Option(help="Name stored in the records (default: --model).")
    ] = None,
    batch_size: int = 4,
    max_new_tokens: int = 256,
    device: Annotated[
        str | None,
        typer.Option(
            help="cpu, cuda, cuda:N or auto (spread over GPUs); default: cuda if available, else cpu."
        ),
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32.")] = "auto",
    backend: Annotated[str, typer.Option(help="hf, or vllm (GPU, needs the vllm package).")] = "hf",
    limit: Annotated[int | None, typer.Option(help="Only the first N samples.")] = None,
    max_length: Annotated[
        int | None,
        typer.Option(
            "--max-length",
            help="Tokens of prompt plus --max-new-tokens a sample may take (default: the model's).",
        ),
    ] = None,
    overlong: Annotated[
        str, typer.Option("--overlong", help="refuse | skip (and list) samples over --max-length.")
    ] = "refuse",
    no_progress: NoProgress = False,
) -> None:
    """Answer every sample with a model; predictions are appended as they come, so a rerun continues."""
    from drivekd.devices import default_device
    from drivekd.evaluation.generate import generate_hf, generate_vllm, load_model
    from drivekd.evaluation.inputs import load_samples
    from drivekd.evaluation.predictions import PredictionWriter

    device = device or default_device()

    if backend not in ("hf", "vllm"):
        raise _fail(ValueError(f"--backend must be hf or vllm, got {backend!r}"))
    if overlong not in ("refuse", "skip"):
        raise _fail(ValueError(f"--overlong must be refuse or skip, got {overlong!r}"))
    lengths: dict[str, Any] = {"max_length": max_length, "overlong": overlong, "source": str(input_path)}
    try:
        _check_device_dtype(device, dtype, GENERATE_DTYPES, allow_auto=True)
        samples, root = load_samples(
            input_path, image_root=image_root, text_only=text_only, visual_descriptions=visual_descriptions
        )
        samples = samples[:limit] if limit is not None else samples
        with PredictionWriter(out, model=model_name or model) as writer:
            if backend == "vllm":
                summary = generate_vllm(
                    samples,
                    model,
                    writer,
                    image_root=root,
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                    progress=not no_progress,
                    **lengths,
                )
            else:
                hf_model, processor = load_model(model, device=device, dtype=dtype)
                summary = generate_hf(
                    samples,
                    hf_model,
                    processor,
                    writer,
                    image_root=root,
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                    progress=not no_progress,
                    **lengths,
                )
    except (DriveKDError, RuntimeError) as err:
        raise _fail(err) from None
    if summary.overlong:
        shown = ", ".join(f"{i} ({n} tokens)" for i, n in summary.overlong[:10])
        console.print(
            f"[yellow]warning:[/yellow] skipped {len(summary.overlong)} samples over --max-length "
            f"{summary.max_length} (prompt + {max_new_tokens} new tokens): {escape(shown)}"
        )
    console.print(
        f"wrote {summary.written} predictions to {out} ({summary.skipped} already there); "
        f"{summary.new_tokens} new tokens at {summary.tokens_per_second:.1f} tok/s"
    )


def _judge_config(options: dict[str, Any], config_file: Path | None) -> Any:
    from drivekd.evaluation.judge import ENV_BASE_URL, JudgeConfig

    if config_file is None and options.get("base_url") is None and not os.environ.get(ENV_BASE_URL):
        return None
    config = JudgeConfig.load(config_file, **options)
    config.api_key()  # a missing key, or a key bound for plain http to another host, stops here before any work
    return config


def _exit_on_failed_gradings(counts: dict[str, Any], allow_failures: bool) -> None:
    """Exit 1 when some gradings were not made (failed calls, unparsed replies), unless ``--allow-failures``."""
    failed = counts["failed"] + counts["unparsed"]
    if not failed:
        return
    total = failed + counts["ok"]
    what = (
        f"{failed} gradings failed of {total} ({counts['failed']} failed calls, {counts['unparsed']} unparsed "
        "replies); they are listed under judge.failures and left out of the means"
    )
    if allow_failures:
        console.print(f"[yellow]warning:[/yellow] {what} (--allow-failures)")
        return
    console.print(
        f"[red]error:[/red] {what}: rerun to retry the failed calls (--retry-unparsed asks again where a reply "
        "had no score), or pass --allow-failures to accept the report as it is"
    )
    raise typer.Exit(code=1)


def _print_summary(report: dict[str, Any]) -> None:
    table = Table(title=f"{report['model']}: {report['samples']} samples")
    for column in ("score", "perception", "prediction", "behavior", "planning", "overall"):
        table.add_column(column, justify="right")

    def cell(stats: dict[str, Any] | None, key: str = "accuracy") -> str:
        return "–" if not stats or stats.get(key) is None else f"{stats[key]:.2f}"

    for mode, per_task in report["mcq"].items():
        tasks = ("perception", "prediction", "behavior", "planning", "overall")
        table.add_row(f"MCQ accuracy ({mode})", *(cell(per_task.get(t)) for t in tasks))
    judge = report.get("judge")
    if judge:
        per = judge["per_task"]
        row = [cell(per.get(t), "mean") for t in ("perception", "prediction", "behavior", "planning")]
        table.add_row(f"judge mean of {judge['runs']} runs", *row, cell(judge["overall"], "mean"))
    Console().print(table)
    if judge:
        counts, cost = judge["counts"], judge["accounting"]
        console.print(
            f"judge: {counts['ok']} ok, {counts['unparsed']} unparsed, {counts['failed']} failed, "
            f"{counts['missing_predictions']} missing predictions (scored 0; unparsed and failed are not grades "
            f"and left out of the means); {cost['calls']} calls, "
            f"{cost['cache_hits']} cache hits, {cost['prompt_tokens']} + {cost['completion_tokens']} tokens"
        )


@eval_app.command("score")
def score_cmd(
    samples_path: Annotated[Path, typer.Argument(help="DriveBench QA file (.json) or Drive-KD JSONL.")],
    out: Annotated[Path, typer.Option("--out", help="Score report (JSON).")],
    predictions: Annotated[
        Path | None, typer.Option(help="Predictions JSONL (default: a DriveBench file's 'pred' fields).")
    ] = None,
    image_root: ImageRoot = None,
    text_only: TextOnly = False,
    visual_descriptions: VisualDescriptions = None,
    model_name: Annotated[str | None, typer.Option(help="Model name in the report.")] = None,
    judge: Annotated[
        bool, typer.Option("--judge/--no-judge", help="Grade with the LLM judge when configured.")
    ] = True,
    judge_protocol: Annotated[
        str,
        typer.Option(
            help="drivekd (our rubrics, 5 runs, mean and std) or drivebench (DriveBench's own rubric prompts "
            "from --judge-prompts, temperature 0, the first 'Total Score:' read, 1 run)."
        ),
    ] = "drivekd",
    judge_prompts: Annotated[
        Path | None,
        typer.Option(
            help="Your DriveBench checkout (evaluate/prompts.py, read as data) or a YAML file of prompts."
        ),
    ] = None,
    judge_config: JudgeConfigFile = None,
    judge_base_url: JudgeBaseUrl = None,
    judge_model: JudgeModel = None,
    judge_api_key_env: JudgeKeyEnv = None,
    runs: Annotated[int | None, typer.Option(help="Judge runs per sample (default 5; drivebench 1).")] = None,
    concurrency: Concurrency = None,
    timeout: Timeout = None,
    max_retries: MaxRetries = None,
    cache: Cache = None,
    temperature: Annotated[
        float | None, typer.Option(help="Judge temperature (drivekd protocol; default: the endpoint's).")
    ] = None,
    retry_unparsed: Annotated[
        bool, typer.Option(help="Ask again where the cache holds an unparsed reply.")
    ] = False,
    allow_failures: AllowFailures = False,
    no_progress: NoProgress = False,
) -> None:
    """Score predictions: MCQ accuracy (strict and DriveBench rule), yes/no accuracy, the LLM judge over N runs
    (mean and std per task and capability) with the provenance of every grade, and the reasoning-planning
    correlation."""
    from drivekd.evaluation.evaluate import score
    from drivekd.evaluation.inputs import load_samples
    from drivekd.evaluation.predictions import read_predictions
    from drivekd.evaluation.prompts import read_drivebench_prompts
    from drivekd.evaluation.scoring import embedded_predictions

    if judge_protocol not in ("drivekd", "drivebench"):
        raise _fail(ValueError(f"--judge-protocol must be drivekd or drivebench, got {judge_protocol!r}"))
    if (judge_protocol == "drivebench") != (judge_prompts is not None):
        raise _fail(
            ValueError(
                "--judge-protocol drivebench needs --judge-prompts (your DriveBench checkout or a YAML file), "
                "and --judge-prompts is only read by that protocol"
            )
        )
    options = {
        "base_url": judge_base_url,
        "model": judge_model,
        "api_key_env": judge_api_key_env,
        "runs": runs,
        "concurrency": concurrency,
        "timeout_s": timeout,
        "max_retries": max_retries,
        "cache_path": cache,
        "temperature": temperature,
        "retry_unparsed": retry_unparsed or None,
        "protocol": judge_protocol,
    }
    try:
        config = _judge_config(options, judge_config) if judge else None
        prompts = read_drivebench_prompts(judge_prompts) if judge_prompts is not None else None
        samples, _ = load_samples(
            samples_path,
            image_root=image_root,
            check_files=False,
            text_only=text_only,
            visual_descriptions=visual_descriptions,
        )
        if predictions is not None:
            records = read_predictions(predictions)
            texts = {k: r.prediction for k, r in records.items()}
            model_name = model_name or next((r.model for r in records.values()), predictions.stem)
        else:
            texts = embedded_predictions(samples)
        if judge and config is None:
            console.print(
                "no judge configured (--judge-base-url, --judge-config or DRIVEKD_JUDGE_BASE_URL): MCQ only"
            )
        report = score(
            samples,
            texts,
            model=model_name or samples_path.stem,
            judge=config,
            prompts=prompts,
            progress=not no_progress,
        )
    except DriveKDError as err:
        raise _fail(err) from None
    _write_json(out, report)
    _print_summary(report)
    if report["missing_predictions"]:
        console.print(
            f"[yellow]{len(report['missing_predictions'])} samples have no prediction (scored 0)[/yellow]"
        )
    not_judged = report["not_judged"]
    console.print(f"not judged: {not_judged['count']} ({not_judged['reason']})")
    console.print(f"wrote {out}")
    if "judge" in report:
        _exit_on_failed_gradings(report["judge"]["counts"], allow_failures)


def _write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2), encoding="utf-8")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "null" if value is None else f"{value:.{digits}f}"


@eval_app.command("drivelm")
def drivelm_cmd(
    predictions: Annotated[
        Path, typer.Argument(help="Challenge predictions [{id, question, answer}] (.json) or our JSONL.")
    ],
    test: Annotated[
        Path, typer.Option("--test", help="The challenge test file (test.json / test_eval.json).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Score report (JSON).")],
    judge: Annotated[
        bool,
        typer.Option("--judge/--no-judge", help="GPT score (tags 1 and 3) with the judge when configured."),
    ] = True,
    judge_prompts: Annotated[
        Path | None,
        typer.Option(
            help="Your DriveLM checkout (challenge/gpt_eval.py, read as data) or a YAML prompt file."
        ),
    ] = None,
    judge_config: JudgeConfigFile = None,
    judge_base_url: JudgeBaseUrl = None,
    judge_model: JudgeModel = None,
    judge_api_key_env: JudgeKeyEnv = None,
    runs: Annotated[int | None, typer.Option(help="GPT runs per question (default 1, as upstream).")] = None,
    concurrency: Concurrency = None,
    timeout: Timeout = None,
    max_retries: MaxRetries = None,
    cache: Cache = None,
    allow_failures: AllowFailures = False,
    no_progress: NoProgress = False,
) -> None:
    """The DriveLM challenge's scores (challenge/evaluation.py): accuracy (tag 0), GPT score (tag 1), language
    metrics (tag 2: BLEU-1..4, ROUGE-L, CIDEr; needs Java), match (tag 3), after the graph filter, and the final
    score with the challenge's weights."""
    from drivekd.evaluation.drivelm_challenge import read_challenge_predictions, read_test, score_drivelm
    from drivekd.evaluation.prompts import read_drivelm_prompt

    try:
        questions = read_test(test)
        answers = read_challenge_predictions(predictions, questions)
        config = prompt = None
        if judge:
            prompt = read_drivelm_prompt(judge_prompts) if judge_prompts is not None else None
            options = {
                "base_url": judge_base_url,
                "model": judge_model,
                "api_key_env": judge_api_key_env,
                "runs": runs,
                "concurrency": concurrency,
                "timeout_s": timeout,
                "max_retries": max_retries,
                "cache_path": cache,
                "protocol": "drivelm",
                "temperature": prompt.temperature if prompt else None,
                "max_tokens": prompt.max_tokens if prompt else None,
            }
            config = _judge_config(options, judge_config)
            if config is None:
                console.print(
                    "no judge configured (--judge-base-url, --judge-config or DRIVEKD_JUDGE_BASE_URL)"
                )
            elif prompt is None:
                raise DriveKDError(
                    "the GPT score needs the challenge's prompt: pass --judge-prompts (your DriveLM checkout or "
                    "a YAML file), or --no-judge"
                )
        report = score_drivelm(questions, answers, judge=config, prompt=prompt, progress=not no_progress)
    except DriveKDError as err:
        raise _fail(err) from None
    _write_json(out, report)
    language = report["language"] or {}
    judged = "judge" if report["judged"]["chatgpt"] else "not judged"
    console.print(
        f"accuracy {_fmt(report['accuracy'])} | chatgpt {_fmt(report['chatgpt'], 2)} ({judged}) | "
        f"match {_fmt(report['match'], 2)} (F1 {_fmt(report['match_f1'], 2)}, GPT half {judged}) | "
        + " ".join(f"{k} {_fmt(v)}" for k, v in language.items())
        + f" | final {_fmt(report['final_score'])}"
    )
    console.print(
        f"{report['counted_questions']} of {report['questions']} questions counted after the graph filter; "
        f"{len(report['missing_predictions'])} without a prediction (scored as wrong / 0)"
    )
    console.print(f"wrote {out}")
    if "judge" in report:
        _exit_on_failed_gradings(report["judge"]["counts"], allow_failures)


@eval_app.command("report")
def report_cmd(
    scores: Annotated[
        list[Path], typer.Argument(help="Score reports from `drivekd eval score`, one per model.")
    ],
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Folder for the tables, chart and JSON.")],
    bench: Annotated[
        Path | None, typer.Option(help="`drivekd bench inference` JSON; rows matched by model name.")
    ] = None,
) -> None:
    """Table 1 (capability scores with run-to-run std, MCQ accuracy, deployment metrics) as markdown and CSV,
    Table 2 (reasoning-planning correlation) and a bar chart."""
    from drivekd.evaluation.report import read_bench_report, read_score_report, write_report

    try:
        reports = [read_score_report(p) for p in scores]
        bench_report = read_bench_report(bench) if bench else None
        files = write_report(reports, out_dir, bench_report, bench_source=str(bench))
    except DriveKDError as err:
        raise _fail(err) from None
    print(files["table1_md"].read_text(encoding="utf-8"))
    print(files["table2_md"].read_text(encoding="utf-8"))
    console.print("wrote " + ", ".join(str(p) for p in files.values()))


@judge_app.command("serve")
def serve_cmd(
    samples: Annotated[
        list[Path] | None,
        typer.Option("--samples", help="Sample files whose structured ground truth the grader uses."),
    ] = None,
    image_root: ImageRoot = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 picks a free one).")] = 8011,
    model_name: Annotated[
        str, typer.Option(help="Model name the server reports.")
    ] = "drivekd-offline-grader",
) -> None:
    """Serve the offline grader as an OpenAI-compatible judge on 127.0.0.1 (Ctrl-C stops it)."""
    from drivekd.evaluation.inputs import load_samples
    from drivekd.evaluation.server import JudgeServer, offline_responder

    try:
        known = [
            s
            for path in samples or []
            for s in load_samples(path, image_root=image_root, check_files=False)[0]
        ]
        server = JudgeServer(offline_responder(known), port=port, model=model_name)
    except DriveKDError as err:
        raise _fail(err) from None
    console.print(
        f"judge at {server.base_url} (model {model_name}, {len(known)} samples with ground truth); "
        f"use --judge-base-url {server.base_url} --judge-model {model_name}"
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("stopped")


def bench_inference_cmd(
    quick: Annotated[
        bool, typer.Option("--quick", help="A tiny random pair on CPU (about a minute).")
    ] = False,
    preset_pair: Annotated[
        str | None,
        typer.Option(help="Paper-size random-weight pair: internvl3 (8B->1B) or qwen2.5-vl (7B->3B)."),
    ] = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher checkpoint (hub id or folder).")] = None,
    student: Annotated[str | None, typer.Option(help="Student checkpoint (hub id or folder).")] = None,
    family: Annotated[str, typer.Option(help="Family of the --quick pair.")] = "qwen2_5_vl",
    samples: Annotated[
        Path | None, typer.Option(help="Drive-KD JSONL of requests (default: synthetic).")
    ] = None,
    n_samples: Annotated[int | None, typer.Option(help="Requests measured for throughput.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens generated per request.")] = None,
    ttft_runs: Annotated[int | None, typer.Option(help="One-token generations for the median TTFT.")] = None,
    device: Annotated[
        str | None,
        typer.Option(help="cpu or cuda (default: cuda for presets, else cuda if available, else cpu)."),
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 (default: bf16 on cuda).")] = None,
    backend: Annotated[str, typer.Option(help="hf, or vllm (GPU, when installed).")] = "hf",
    threads: Annotated[int | None, typer.Option(help="CPU threads per model process.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --json file.")] = False,
    teacher_name: Annotated[
        str | None,
        typer.Option(help="Name of the teacher's row (default: its checkpoint); `eval report` joins on it."),
    ] = None,
    student_name: Annotated[
        str | None,
        typer.Option(help="Name of the student's row (default: its checkpoint); `eval report` joins on it."),
    ] = None,
) -> None:
    """Deployment metrics of a teacher and a student side by side: peak memory, throughput (eq. 27), median
    time to first token (eq. 28), and their ratios. Give each row the model name of its score report
    (--teacher-name/--student-name) for `drivekd eval report --bench` to put the figures in its row."""
    from dataclasses import replace

    from drivekd.cli import check_json_out
    from drivekd.devices import default_device
    from drivekd.evaluation.inference import (
        PRESET_PAIRS,
        QUICK,
        InferenceBenchConfig,
        ModelSpec,
        run,
        table_markdown,
    )

    check_json_out(json_path, overwrite)
    if quick:
        specs = (ModelSpec(f"tiny-{family}-teacher", "tiny", family, "teacher"),)
        specs += (ModelSpec(f"tiny-{family}-student", "tiny", family, "student"),)
        base = QUICK
    elif preset_pair is not None:
        if preset_pair not in PRESET_PAIRS:
            raise _fail(ValueError(f"--preset-pair must be one of {', '.join(PRESET_PAIRS)}"))
        names = PRESET_PAIRS[preset_pair]
        specs = tuple(ModelSpec(f"{n} (random weights)", "preset", preset=n) for n in names)
        base = InferenceBenchConfig(device="cuda", dtype="bfloat16")
    elif teacher and student:
        specs = (ModelSpec(teacher, "path", path=teacher), ModelSpec(student, "path", path=student))
        base = InferenceBenchConfig()
    else:
        raise _fail(ValueError("pass --quick, --preset-pair NAME, or both --teacher and --student"))
    names = (teacher_name, student_name)
    specs = tuple(
        spec if name is None else replace(spec, name=name) for spec, name in zip(specs, names, strict=True)
    )
    device = device or (base.device if preset_pair is not None else default_device())  # presets need a GPU
    if device.startswith("cuda") and dtype is None:
        dtype = "bfloat16"
    overrides = {
        "samples": str(samples) if samples else None,
        "n_samples": n_samples,
        "max_new_tokens": max_new_tokens,
        "ttft_runs": ttft_runs,
        "device": device,
        "dtype": dtype,
        "backend": backend,
        "threads": threads,
    }
    cfg = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    try:
        _check_device_dtype(cfg.device, cfg.dtype, BENCH_DTYPES, allow_auto=False)
        report = run(specs[0], specs[1], cfg)
    except (DriveKDError, RuntimeError) as err:
        raise _fail(err) from None
    print(table_markdown(report))
    console.print(
        f"{report['device']}, {cfg.dtype}, {cfg.backend}, {cfg.n_samples} requests x {cfg.max_new_tokens} tokens"
    )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2), encoding="utf-8")
