"""Reliability of evaluation and the judge (issue 13, items 8-11): an outage is never reported as a score, the local
judge survives bursts and malformed requests, and bad inputs end in one ``error:`` line with exit code 2.

Outages are simulated with local servers on 127.0.0.1 that refuse connections, time out, answer non-JSON or
answer 200 without ``choices``; load tests are bounded (64 clients x 3 bursts, 10 s client timeouts).
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from drivekd.data.schema import read_jsonl
from drivekd.data.synthetic import generate_split
from drivekd.errors import DriveKDError
from drivekd.evaluation.aggregate import aggregate_judge
from drivekd.evaluation.cli import eval_app, judge_app
from drivekd.evaluation.drivelm_challenge import ChallengeQA, score_drivelm
from drivekd.evaluation.judge import Judge, JudgeConfig, JudgeResult
from drivekd.evaluation.offline import facts_for, grade
from drivekd.evaluation.prompts import DriveLMPrompt
from drivekd.evaluation.rubrics import RUBRICS, parse_judge_request
from drivekd.evaluation.scoring import EvalItem
from drivekd.evaluation.server import JudgeServer, offline_responder

pytestmark = pytest.mark.reliability
runner = CliRunner()
RUNS = 2


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(eval_app, name="eval")
    app.add_typer(judge_app, name="judge")
    return app


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A synthetic split, a predictions file answering every question, and the offline grader's score of each."""
    folder = tmp_path_factory.mktemp("synth")
    split = generate_split(folder, n_scenes=1, seed=7, split="test")
    samples = list(read_jsonl(split.path))
    preds = folder / "preds.jsonl"
    rows = [
        {"id": s.id, "prediction": s.full_answer, "model": "m", "new_tokens": 1, "seconds": 0.0}
        for s in samples
    ]
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return split.path, preds, samples


def _expected_scores(samples) -> dict[str, tuple[str, float]]:
    """(task, offline grade) of every judged sample, computed without HTTP."""
    from drivekd.evaluation.rubrics import rubric_for

    out = {}
    for s in samples:
        rubric = rubric_for(s)
        if rubric is not None:
            out[s.id] = (s.task, grade(RUBRICS[rubric], facts_for(s, s.full_answer)).total)
    return out


class _Outage:
    """A judge on 127.0.0.1 that misbehaves (``mode``) for the sample ids in ``broken`` and grades the rest."""

    def __init__(self, samples, mode: str, broken: set[str] | None = None) -> None:
        self.mode, self.broken = mode, broken
        self.requests = 0
        grader = offline_responder(samples)
        outage = self
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    outage.requests += 1
                item = parse_judge_request(body["messages"])
                hit = outage.broken is None or (item is not None and item.sample_id in outage.broken)
                mode = outage.mode if hit else "healthy"
                if mode == "timeout":
                    time.sleep(3.0)  # the client gives up after 0.5 s
                    mode = "healthy"
                if mode == "non_json":
                    self._reply(200, "text/html", b"<html>502 Bad Gateway (but with a 200)</html>")
                elif mode == "no_choices":
                    self._reply(200, "application/json", json.dumps({"id": "x", "object": "error"}).encode())
                else:
                    _, text = grader(body)
                    choice = {"index": 0, "message": {"role": "assistant", "content": text}}
                    payload = {"id": "x", "object": "chat.completion", "created": 0, "model": "m"}
                    self._reply(200, "application/json", json.dumps(payload | {"choices": [choice]}).encode())

            def _reply(self, status: int, kind: str, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *args: None  # a client that timed out closed its end: expected here
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def _judge(samples, mode: str, broken: set[str] | None = None) -> Iterator[tuple[str, Callable[[], int]]]:
    """(base URL, request counter) of a judge in ``mode``; "refused" is a port nobody listens on."""
    if mode == "refused":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        yield f"http://127.0.0.1:{port}/v1", lambda: 0
        return
    outage = _Outage(samples, mode, broken)
    try:
        yield f"http://127.0.0.1:{outage.port}/v1", lambda: outage.requests
    finally:
        outage.stop()


def _score_args(
    samples_path: Path, preds: Path, out: Path, url: str, cache: Path, timeout: float = 20.0
) -> list[str]:
    args = ["eval", "score", str(samples_path), "--predictions", str(preds), "--out", str(out)]
    args += ["--judge-base-url", url, "--judge-model", "grader", "--runs", str(RUNS), "--cache", str(cache)]
    return [*args, "--timeout", str(timeout), "--max-retries", "0", "--no-progress"]


def _group_mean(expected: dict[str, tuple[str, float]], task: str, ids) -> float:
    return statistics.mean(score for i, (t, score) in expected.items() if t == task and i in ids)


@pytest.mark.parametrize("mode", ["refused", "timeout", "non_json", "no_choices"])
def test_an_outage_is_not_a_score(synth, tmp_path, mode):
    samples_path, preds, samples = synth
    expected = _expected_scores(samples)
    out, cache = tmp_path / "scores.json", tmp_path / "cache.sqlite"
    timeout = 0.5 if mode == "timeout" else 20.0
    with _judge(samples, mode) as (url, _):
        result = runner.invoke(_app(), _score_args(samples_path, preds, out, url, cache, timeout))
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        judge = json.loads(out.read_text())["judge"]
        assert all(stats["mean"] is None for stats in judge["per_task"].values())
        assert judge["overall"]["mean"] is None
        counts = judge["counts"]
        assert (counts["ok"], counts["failed"]) == (0, RUNS * len(expected))
        perception = sum(t == "perception" for t, _ in expected.values())
        assert counts["per_task"]["perception"]["failed"] == RUNS * perception
        assert len(judge["failures"]) == RUNS * len(expected)
        assert {f["status"] for f in judge["failures"]} == {"failed"}
        allowed = runner.invoke(
            _app(), [*_score_args(samples_path, preds, out, url, cache, timeout), "--allow-failures"]
        )
        assert allowed.exit_code == 0, allowed.output
    # The endpoint is back (same address): the rerun asks for every grading again, since none was cached.
    port = int(url.split(":")[2].split("/")[0])
    with JudgeServer(offline_responder(samples), port=port) as server:
        again = runner.invoke(_app(), _score_args(samples_path, preds, out, url, cache))
        assert again.exit_code == 0, again.output
        assert server.requests == RUNS * len(expected)
    per_task = json.loads(out.read_text())["judge"]["per_task"]
    assert per_task["perception"]["mean"] == pytest.approx(_group_mean(expected, "perception", expected))


def test_means_are_over_graded_samples_and_a_rerun_retries_only_what_failed(synth, tmp_path):
    samples_path, preds, samples = synth
    expected = _expected_scores(samples)
    perception = [i for i, (t, _) in expected.items() if t == "perception"]
    broken = {perception[0], perception[1]}
    out, cache = tmp_path / "scores.json", tmp_path / "cache.sqlite"
    with _judge(samples, "non_json", broken) as (url, requests):
        result = runner.invoke(_app(), _score_args(samples_path, preds, out, url, cache))
        assert result.exit_code == 1, result.output
        report = json.loads(out.read_text())
        graded = set(expected) - broken
        got = report["judge"]["per_task"]["perception"]
        assert got["mean"] == pytest.approx(_group_mean(expected, "perception", graded))
        assert got["runs"] == pytest.approx([_group_mean(expected, "perception", graded)] * RUNS)
        assert report["judge"]["counts"]["per_task"]["perception"] == {
            "ok": RUNS * (len(perception) - 2),
            "unparsed": 0,
            "failed": RUNS * 2,
            "missing_predictions": 0,
        }
        assert {f["id"] for f in report["judge"]["failures"]} == broken
        assert f"{RUNS * 2} gradings failed" in result.output
        before = requests()
        broken.clear()  # the same endpoint now answers every request
        again = runner.invoke(_app(), _score_args(samples_path, preds, out, url, cache))
        assert again.exit_code == 0, again.output
        assert requests() - before == RUNS * 2  # only the failed gradings were asked again
    got = json.loads(out.read_text())["judge"]["per_task"]["perception"]
    assert got["mean"] == pytest.approx(_group_mean(expected, "perception", expected))


def _item(sample_id: str, task: str, prediction: str | None = "p") -> EvalItem:
    from drivekd.data.schema import Sample

    capability = {"perception": "perception", "prediction": "reasoning", "planning": "planning"}[task]
    sample = Sample(
        id=sample_id,
        images=[{"camera": "CAM_FRONT", "path": "f.png"}],
        question="Q?",
        capability=capability,
        task=task,
        kind="open",
        answer="go",
    )
    return EvalItem(sample, prediction, "r")


def test_aggregation_hand_worked_missing_is_zero_failed_and_unparsed_are_left_out():
    items = [
        _item("p1", "perception"),
        _item("p2", "perception"),
        _item("p3", "perception", prediction=None),  # the model's failure: 0 in every run
        _item("q1", "planning"),
        _item("q2", "planning"),
    ]
    results = [
        JudgeResult("p1", 0, "ok", 80.0),
        JudgeResult("p1", 1, "ok", 60.0),
        JudgeResult("p2", 0, "failed", None, "APIConnectionError"),
        JudgeResult("p2", 1, "ok", 40.0),
        JudgeResult("q1", 0, "unparsed", None, "no score"),
        JudgeResult("q1", 1, "failed", None, "timeout"),
        JudgeResult("q2", 0, "ok", 50.0),
        JudgeResult("q2", 1, "ok", 50.0),
    ]
    out = aggregate_judge(items, results, 2)
    perception = out["per_task"]["perception"]
    # run 0: (80 + 0) / 2 = 40 (p2 not graded); run 1: (60 + 40 + 0) / 3 = 33.33
    assert perception["runs"] == pytest.approx([40.0, 100.0 / 3])
    assert perception["mean"] == pytest.approx((40.0 + 100.0 / 3) / 2)
    assert perception["std"] == pytest.approx(statistics.stdev([40.0, 100.0 / 3]))
    assert out["per_task"]["planning"]["runs"] == pytest.approx([50.0, 50.0])
    assert out["overall"]["runs"] == pytest.approx([45.0, (100.0 / 3 + 50.0) / 2])
    assert out["counts"]["per_task"]["planning"] == {
        "ok": 2,
        "unparsed": 1,
        "failed": 1,
        "missing_predictions": 0,
    }
    assert out["counts"]["per_task"]["perception"]["missing_predictions"] == 1
    # A group with no grade in any run has no score (null), and then neither has the overall average.
    items.append(_item("r1", "prediction"))
    results += [JudgeResult("r1", 0, "failed", None, "x"), JudgeResult("r1", 1, "failed", None, "x")]
    out = aggregate_judge(items, results, 2)
    assert out["per_task"]["prediction"]["mean"] is None
    assert out["per_capability"]["reasoning"]["mean"] is None
    assert out["overall"]["mean"] is None and out["overall"]["runs"] == [None, None]


def test_drivelm_gpt_score_leaves_failed_gradings_out(tmp_path):
    questions = [
        ChallengeQA(f"s_f_{k}", "s", "f", "perception", k, f"Q{k}?", f"A{k}", (1,)) for k in range(4)
    ]
    answers = {"s_f_0": "good", "s_f_1": "bad", "s_f_2": "broken"}  # s_f_3 has no answer: 0
    prompt = DriveLMPrompt(path="inline", system=None, template="Truth: {GT} Answer: {PRED}")

    def respond(body: dict) -> tuple[int, str]:
        text = body["messages"][-1]["content"]
        if "broken" in text:
            return 400, "injected failure"
        return 200, "90" if "good" in text else "30"

    with JudgeServer(respond) as server:
        config = JudgeConfig(
            base_url=server.base_url,
            model="m",
            protocol="drivelm",
            max_retries=0,
            cache_path=tmp_path / "c.sqlite",
        )
        report = score_drivelm(
            questions, answers, judge=config, prompt=prompt, language=False, progress=False
        )
    assert report["chatgpt"] == pytest.approx((90.0 + 30.0 + 0.0) / 3)  # not (90 + 30 + 0 + 0) / 4
    assert report["judge"]["counts"]["failed"] == 1
    assert report["judge"]["counts"]["per_part"]["chatgpt"]["failed"] == 1
    assert [f["id"] for f in report["judge"]["failures"]] == ["s_f_2"]


def test_drivelm_command_exits_1_when_a_grading_failed(tmp_path):
    test = tmp_path / "test.json"
    qa = [{"Q": f"Q{k}?", "A": f"A{k}", "tag": [1]} for k in range(2)]
    test.write_text(json.dumps({"s": {"key_frames": {"f": {"QA": {"perception": qa}}}}}))
    preds = tmp_path / "pred.json"
    preds.write_text(json.dumps([{"id": f"s_f_{k}", "question": "", "answer": "x"} for k in range(2)]))
    prompts = tmp_path / "gpt.yaml"
    prompts.write_text("system: Rate.\nprompt: 'Truth: {GT} Answer: {PRED}'\n")
    out = tmp_path / "out.json"
    with _judge([], "no_choices") as (url, _):
        args = ["eval", "drivelm", str(preds), "--test", str(test), "--out", str(out), "--judge-prompts"]
        args += [str(prompts), "--judge-base-url", url, "--judge-model", "m", "--max-retries", "0"]
        args += ["--cache", str(tmp_path / "c.sqlite"), "--no-progress"]
        result = runner.invoke(_app(), args)
        assert result.exit_code == 1, result.output
        report = json.loads(out.read_text())
        assert report["chatgpt"] is None and report["final_score"] is None
        assert report["judge"]["counts"]["failed"] == 2
        assert runner.invoke(_app(), [*args, "--allow-failures"]).exit_code == 0


def test_an_api_key_is_never_sent_over_plain_http_to_another_host(synth, tmp_path, monkeypatch):
    monkeypatch.setenv("DRIVEKD_TEST_KEY", "sk-secret-123")
    remote = JudgeConfig(base_url="http://judge.example/v1", model="m", api_key_env="DRIVEKD_TEST_KEY")
    with pytest.raises(DriveKDError, match="https"):
        Judge(remote)
    assert JudgeConfig(
        base_url="https://judge.example/v1", model="m", api_key_env="DRIVEKD_TEST_KEY"
    ).api_key()
    local = JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env="DRIVEKD_TEST_KEY")
    assert local.api_key() == "sk-secret-123"
    samples_path, preds, _ = synth
    args = _score_args(samples_path, preds, tmp_path / "s.json", "http://judge.example/v1", tmp_path / "c")
    result = runner.invoke(_app(), [*args, "--judge-api-key-env", "DRIVEKD_TEST_KEY"])
    assert result.exit_code == 2, result.output
    assert len(_error_lines(result.output)) == 1 and "https" in result.output
    assert "sk-secret-123" not in result.output and not (tmp_path / "s.json").exists()


def _post(port: int, body: bytes, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_judge_serve_takes_bursts_of_64_clients_without_resets():
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Give a Total Score."}]})
    errors: list[str] = []
    statuses: list[int] = []
    lock = threading.Lock()
    with JudgeServer(offline_responder()) as server:
        port = int(server.base_url.split(":")[2].split("/")[0])
        for _ in range(3):
            barrier = threading.Barrier(64, timeout=10)

            def client(barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                try:
                    status, _ = _post(port, body.encode())
                    with lock:
                        statuses.append(status)
                except OSError as err:
                    with lock:
                        errors.append(repr(err))

            threads = [threading.Thread(target=client) for _ in range(64)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
    assert errors == [] and statuses == [200] * 192


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"messages": "hello"}',
        b'{"messages": [1, 2]}',
        b'{"messages": [{"role": "user", "content": 5}]}',
        b'{"model": "m"}',
    ],
)
def test_judge_serve_answers_malformed_requests_with_400_json(body):
    with JudgeServer(offline_responder()) as server:
        port = int(server.base_url.split(":")[2].split("/")[0])
        status, payload = _post(port, body)
        assert status == 400 and payload["error"]["code"] == 400 and payload["error"]["message"]
        ok, _ = _post(port, json.dumps({"messages": [{"role": "user", "content": "Total Score?"}]}).encode())
        assert ok == 200  # the server is still serving


def test_judge_serve_health():
    with JudgeServer(offline_responder(), model="grader") as server:
        port = int(server.base_url.split(":")[2].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health")
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read()) == {"status": "ok", "model": "grader", "requests": 0}
        conn.close()


def test_judge_serve_busy_or_invalid_port_is_one_error_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(_app(), ["judge", "serve", "--port", str(port)])
    assert result.exit_code == 2, result.output
    assert len(_error_lines(result.output)) == 1 and "in use" in result.output
    for bad in ("70000", "-1"):
        result = runner.invoke(_app(), ["judge", "serve", "--port", bad])
        assert result.exit_code == 2, result.output
        assert len(_error_lines(result.output)) == 1 and "0..65535" in result.output


def test_eval_report_inputs_missing_keys_are_one_error_line(tmp_path):
    out_dir = tmp_path / "report"
    cases = {
        "no_mcq.json": ({"model": "m"}, "mcq"),
        "a_list.json": ([1, 2], "not a score report"),
        "no_overall.json": ({"model": "m", "mcq": {"strict": {}, "drivebench": {}}}, "mcq.strict.overall"),
    }
    for name, (content, key) in cases.items():
        path = tmp_path / name
        path.write_text(json.dumps(content))
        result = runner.invoke(_app(), ["eval", "report", str(path), "--out-dir", str(out_dir)])
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        (line,) = _error_lines(result.output)
        assert name in line and key in line and "drivekd eval score" in line
    assert not out_dir.exists()


def test_missing_judge_config_file_is_one_error_line(synth, tmp_path):
    samples_path, preds, _ = synth
    args = [
        "eval",
        "score",
        str(samples_path),
        "--predictions",
        str(preds),
        "--out",
        str(tmp_path / "s.json"),
    ]
    result = runner.invoke(_app(), [*args, "--judge-config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2, result.output
    (line,) = _error_lines(result.output)
    assert "nope.yaml" in line and "--judge-config" in line
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_url: [unclosed\n")
    result = runner.invoke(_app(), [*args, "--judge-config", str(bad)])
    assert result.exit_code == 2 and len(_error_lines(result.output)) == 1, result.output


def test_eval_inputs_and_settings_are_checked_before_any_model_loads(synth, tmp_path, monkeypatch):
    import drivekd.evaluation.generate as generate

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(generate, "load_model", no_model)
    samples_path, _, _ = synth
    preds = tmp_path / "p.jsonl"
    generate_args = ["eval", "generate", str(samples_path), "--model", "some/model", "--out", str(preds)]
    cases = [
        ([*generate_args, "--dtype", "float8"], "--dtype"),
        ([*generate_args, "--device", "tpu"], "--device"),
        (["eval", "score", str(samples_path), "--predictions", str(tmp_path / "none.jsonl")], "none.jsonl"),
        (["bench", "inference", "--quick", "--device", "tpu"], "--device"),
        (["bench", "inference", "--quick", "--dtype", "float8"], "--dtype"),
    ]
    for args, named in cases:
        if args[1] == "score":
            args = [*args, "--out", str(tmp_path / "s.json")]
        result = runner.invoke(_bench_app(), args)
        assert result.exit_code == 2, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), args
        (line,) = _error_lines(result.output)
        assert named in line, line
    assert not preds.exists()


def _bench_app() -> typer.Typer:
    from drivekd.evaluation.cli import bench_inference_cmd

    app = _app()
    bench = typer.Typer()
    bench.command("inference")(bench_inference_cmd)
    app.add_typer(bench, name="bench")
    return app
