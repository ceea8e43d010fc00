"""The judge client over real HTTP against the local grading server: scores, cache, retries, re-ask, failures,
concurrency, and the API key never reaching disk or logs."""

from __future__ import annotations

import json
import logging
import threading
import time
from http import HTTPStatus

import pytest

from drivekd.data.schema import read_jsonl
from drivekd.data.synthetic import generate_split
from drivekd.errors import DriveKDError
from drivekd.evaluation.evaluate import score
from drivekd.evaluation.judge import JudgeConfig, parse_total, run_judge
from drivekd.evaluation.offline import facts_for, grade
from drivekd.evaluation.rubrics import REASK, RUBRICS
from drivekd.evaluation.scoring import join, judge_tasks
from drivekd.evaluation.server import JudgeServer, offline_responder


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    split = generate_split(tmp_path_factory.mktemp("synth"), n_scenes=1, seed=7, split="test")
    samples = list(read_jsonl(split.path))
    predictions = {s.id: (s.full_answer if k % 2 else s.answer) for k, s in enumerate(samples)}
    items, _ = join(samples, predictions)
    return samples, items, judge_tasks(items)


def _config(server: JudgeServer, tmp_path, **kwargs) -> JudgeConfig:
    settings = {"runs": 2, "backoff_s": 0.01, "max_backoff_s": 0.05, "cache_path": tmp_path / "cache.sqlite"}
    return JudgeConfig(base_url=server.base_url, model="grader", **(settings | kwargs))


@pytest.mark.parametrize(
    ("reply", "total"),
    [
        ("1. A (50 points): 50\nTotal Score: 83", 83),
        ("**Total Score:** 83/100", 83),
        ("total score = 7.5", 7.5),
        ("Total Score: 40\n...revised. Total Score: 45", 45),
        ("Total Score: 150", None),
        ("I would give it a good grade.", None),
        (None, None),
    ],
)
def test_parse_total(reply, total):
    assert parse_total(reply) == total


def test_scores_over_http_equal_the_offline_grader_and_reruns_hit_the_cache(synth, tmp_path):
    samples, items, tasks = synth
    by_id = {s.id: s for s in samples}
    with JudgeServer(offline_responder(samples)) as server:
        config = _config(server, tmp_path)
        results = run_judge(tasks, config, progress=False)
        assert server.requests == 2 * len(tasks)
        again = run_judge(tasks, config, progress=False)
        assert server.requests == 2 * len(tasks)  # every grading came from the cache
    assert [(r.sample_id, r.run) for r in results] == [(t.sample_id, run) for t in tasks for run in range(2)]
    for task, result in zip([t for t in tasks for _ in range(2)], results, strict=True):
        prediction = next(i.prediction for i in items if i.sample.id == task.sample_id)
        expected = grade(RUBRICS[task.rubric], facts_for(by_id[task.sample_id], prediction)).total
        assert (result.status, result.score, result.calls, result.cached) == ("ok", expected, 1, False)
        assert result.prompt_tokens > 0 and result.completion_tokens > 0
    assert all(r.cached and r.calls == 0 for r in again)
    assert [r.score for r in again] == [r.score for r in results]


def _flaky(responder, plan):
    """A responder that answers with the statuses in ``plan`` (per prompt, in order) before grading."""
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def respond(body):
        key = json.dumps(body["messages"][:2])
        with lock:
            k = seen[key] = seen.get(key, -1) + 1
        if k < len(plan):
            return plan[k], "injected failure"
        return responder(body)

    return respond


def test_429_and_5xx_are_retried_with_backoff(synth, tmp_path):
    samples, _, tasks = synth
    plan = [HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.INTERNAL_SERVER_ERROR, HTTPStatus.SERVICE_UNAVAILABLE]
    with JudgeServer(_flaky(offline_responder(samples), plan)) as server:
        results = run_judge(tasks[:3], _config(server, tmp_path, runs=1), progress=False)
    assert all(r.status == "ok" and r.calls == 4 for r in results)


def test_retries_give_up_and_client_errors_fail_at_once_without_caching(synth, tmp_path):
    samples, _, tasks = synth
    with JudgeServer(_flaky(offline_responder(samples), [HTTPStatus.SERVICE_UNAVAILABLE] * 10)) as server:
        results = run_judge(tasks[:2], _config(server, tmp_path, runs=1, max_retries=2), progress=False)
    assert all(r.status == "failed" and r.calls == 3 and "503" in r.error for r in results)
    with JudgeServer(_flaky(offline_responder(samples), [HTTPStatus.BAD_REQUEST])) as server:
        config = _config(server, tmp_path, runs=1)
        failed = run_judge(tasks[:2], config, progress=False)
        assert all(r.status == "failed" and r.calls == 1 for r in failed)
        retried = run_judge(tasks[:2], config, progress=False)  # failures are not cached
        assert server.requests == 4 and all(r.status == "ok" for r in retried)


def test_timeouts_are_retried_then_fail(synth, tmp_path):
    samples, _, tasks = synth
    grader = offline_responder(samples)

    def slow(body):
        time.sleep(1.0)
        return grader(body)

    with JudgeServer(slow) as server:
        config = _config(server, tmp_path, runs=1, timeout_s=0.2, max_retries=1)
        (result,) = run_judge(tasks[:1], config, progress=False)
    assert (result.status, result.calls) == ("failed", 2) and "Timeout" in result.error


def test_a_reply_without_a_total_is_asked_again_once(synth, tmp_path):
    samples, _, tasks = synth
    grader = offline_responder(samples)

    def forgetful(body):
        if body["messages"][-1]["content"] == REASK:
            return grader(body)
        return HTTPStatus.OK, "The answer looks reasonable."

    with JudgeServer(forgetful) as server:
        results = run_judge(tasks[:2], _config(server, tmp_path, runs=1), progress=False)
    assert all(r.status == "ok" and r.calls == 2 and r.score is not None for r in results)

    def hopeless(body):
        return HTTPStatus.OK, "No score from me."

    with JudgeServer(hopeless) as server:
        config = _config(server, tmp_path / "other", runs=1)
        unparsed = run_judge(tasks[:2], config, progress=False)
        assert all(r.status == "unparsed" and r.score is None and r.calls == 2 for r in unparsed)
        assert all("No score from me" in r.error for r in unparsed)
        cached = run_judge(tasks[:2], config, progress=False)
        assert server.requests == 4 and all(r.cached and r.status == "unparsed" for r in cached)
        run_judge(tasks[:2], config.model_copy(update={"retry_unparsed": True}), progress=False)
        assert server.requests == 8


def test_concurrency_is_limited(synth, tmp_path):
    samples, _, tasks = synth
    grader = offline_responder(samples)
    state = {"now": 0, "max": 0}
    lock = threading.Lock()

    def counting(body):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return grader(body)

    with JudgeServer(counting) as server:
        run_judge(tasks[:6], _config(server, tmp_path, runs=1, concurrency=2), progress=False)
    assert state["max"] == 2


def test_the_api_key_never_reaches_disk_or_logs(synth, tmp_path, monkeypatch, caplog):
    samples, items, _ = synth
    secret = "sk-drivekd-test-9f3a1c7e5b"
    monkeypatch.setenv("DRIVEKD_TEST_KEY", secret)
    predictions = {i.sample.id: i.prediction for i in items}
    caplog.set_level(logging.DEBUG)
    with JudgeServer(offline_responder(samples)) as server:
        config = _config(server, tmp_path, api_key_env="DRIVEKD_TEST_KEY")
        assert config.api_key() == secret
        report = score(samples, predictions, model="m", judge=config, progress=False)
    out = tmp_path / "scores.json"
    out.write_text(json.dumps(report))
    assert report["judge"]["config"]["api_key_env"] == "DRIVEKD_TEST_KEY"
    for path in tmp_path.iterdir():
        assert secret.encode() not in path.read_bytes(), path
    assert secret not in caplog.text


def test_judge_config_sources_and_key_rules(tmp_path, monkeypatch):
    path = tmp_path / "judge.yaml"
    path.write_text("base_url: https://judge.example/v1\nmodel: from-file\nruns: 3\n")
    monkeypatch.setenv("DRIVEKD_JUDGE_MODEL", "from-env")
    config = JudgeConfig.load(path, concurrency=4, runs=None)
    assert (config.base_url, config.model, config.runs, config.concurrency) == (
        "https://judge.example/v1",
        "from-env",
        3,
        4,
    )
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(DriveKDError, match="set the environment variable OPENAI_API_KEY"):
        config.api_key()
    assert JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m").api_key() == "not-needed"
    path.write_text("base_url: https://judge.example/v1\nmodel: m\napi_key: sk-oops\n")
    with pytest.raises(DriveKDError, match="do not write the API key"):
        JudgeConfig.load(path)
    monkeypatch.delenv("DRIVEKD_JUDGE_MODEL")
    with pytest.raises(DriveKDError, match="model"):
        JudgeConfig.load(None, base_url="http://127.0.0.1:9/v1")
