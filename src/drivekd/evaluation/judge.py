"""An LLM judge behind any OpenAI-compatible chat-completions endpoint, run N times with a disk cache.

Each (sample, run) is one grading: the prompt is sent and the score read from the reply as the judge protocol
says. ``drivekd`` (the default: our rubrics, 5 runs, the endpoint's own sampling unless a temperature is given)
reads the last "Total Score: N" and re-asks once when there is none; ``drivebench`` (DriveBench's
``evaluate/request.py``) sends temperature 0 and reads the first "Total Score: N" (up to 3 digits), and
``drivelm`` (the DriveLM challenge's ``gpt_eval.py``) sends temperature 0.6 and reads the whole reply as a bare
number; neither re-asks. A reply without a score is recorded as "unparsed". Calls run concurrently up to a limit,
time out, and are retried with exponential backoff on 429, 5xx, timeouts, connection errors and malformed 200 replies
(not JSON, or without ``choices``); other errors fail at once. A failed grading is recorded as "failed" with its
error and never cached, so a rerun asks again; unparsed and failed gradings are not grades and never enter a mean
(:mod:`drivekd.evaluation.aggregate`). Replies are cached under a key of every setting
that shapes a grade (:mod:`drivekd.evaluation.cache`), so a rerun only pays for what is missing, and a cache that
holds grades of the same prompts made under other settings is refused rather than mixed.

The API key is read from the environment variable named in the config; it is never stored, logged or written, and
never sent over plain http to a host other than this machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import openai
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drivekd.errors import DriveKDError
from drivekd.evaluation.cache import CachedReply, JudgeCache, content_hash, prompt_hash
from drivekd.evaluation.progress import progress_bar
from drivekd.evaluation.rubrics import REASK

log = logging.getLogger(__name__)
Status = Literal["ok", "unparsed", "failed"]
Protocol = Literal["drivekd", "drivebench", "drivelm"]
PROTOCOLS: tuple[str, ...] = ("drivekd", "drivebench", "drivelm")
# What an upstream protocol fixes (its evaluator's request settings); runs default to its single pass.
_PROTOCOL_SETTINGS: dict[str, dict[str, Any]] = {
    "drivebench": {"temperature": 0.0, "max_tokens": 3000, "runs": 1},
    "drivelm": {"temperature": 0.6, "max_tokens": 3000, "runs": 1},
}
ENV_BASE_URL = "DRIVEKD_JUDGE_BASE_URL"
ENV_MODEL = "DRIVEKD_JUDGE_MODEL"
_TOTAL = re.compile(r"total\s*score\s*[*_]*\s*[:=]?\s*[*_]*\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_FIRST_TOTAL = re.compile(r"Total Score:\s*(\d{1,3})\b")


class JudgeConfig(BaseModel):
    """Where the judge is and how to call it. The key itself is never part of the config."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(min_length=1)
    model: str = Field(min_length=1)
    api_key_env: str = "OPENAI_API_KEY"
    runs: int = Field(5, ge=1)
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(5, ge=0)
    backoff_s: float = Field(1.0, ge=0)
    max_backoff_s: float = Field(60.0, ge=0)
    cache_path: Path | None = Path("runs/judge-cache.sqlite")
    temperature: float | None = None  # None: the endpoint's default sampling, as the N runs are meant to vary
    max_tokens: int = Field(1024, ge=1)
    retry_unparsed: bool = False
    protocol: Protocol = "drivekd"

    @model_validator(mode="before")
    @classmethod
    def _protocol_settings(cls, data: Any) -> Any:
        """An upstream protocol's temperature and token limit, and its single run unless more are asked for."""
        fixed = _PROTOCOL_SETTINGS.get(data.get("protocol", "drivekd")) if isinstance(data, dict) else None
        if fixed is None:
            return data
        wanted = data.get("temperature")
        if wanted is not None and float(wanted) != fixed["temperature"]:
            raise ValueError(
                f"the {data['protocol']} protocol judges at temperature {fixed['temperature']} as upstream does; "
                f"drop the temperature {wanted} (or use the drivekd protocol)"
            )
        return {**fixed, **{k: v for k, v in data.items() if v is not None}}

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> JudgeConfig:
        """Settings from a YAML/JSON file, then ``DRIVEKD_JUDGE_BASE_URL`` / ``DRIVEKD_JUDGE_MODEL``, then
        ``overrides`` (``None`` values are ignored)."""
        data: dict[str, Any] = {}
        if path is not None:
            data = _read_config_file(Path(path))
            if not isinstance(data, dict):
                raise DriveKDError(f"{path}: a judge config must be a mapping of settings")
            if "api_key" in data:
                raise DriveKDError(
                    f"{path}: do not write the API key into a config file; put it in an environment variable and "
                    "name that variable with api_key_env"
                )
        for env, name in ((ENV_BASE_URL, "base_url"), (ENV_MODEL, "model")):
            if os.environ.get(env):
                data[name] = os.environ[env]
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "protocol"
            raise DriveKDError(
                f"judge config: {field}: {first['msg'].removeprefix('Value error, ')} (set it in the config file, with "
                f"{ENV_BASE_URL}/{ENV_MODEL}, or on the command line)"
            ) from None

    def settings(self) -> dict[str, Any]:
        """Everything besides the messages that shapes a grade: with them it makes up the cache key."""
        return {
            "protocol": self.protocol,
            "endpoint": self.base_url,
            "model": self.model,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def is_local(self) -> bool:
        host = urlparse(self.base_url).hostname or ""
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def api_key(self) -> str:
        """The key from the environment; a local endpoint (127.0.0.1, localhost) may run without one. A key is
        refused for a plain-http endpoint on another host, where it would cross the network in clear."""
        key = os.environ.get(self.api_key_env)
        if key:
            scheme = urlparse(self.base_url).scheme
            if scheme != "https" and not self.is_local():
                raise DriveKDError(
                    f"refusing to send the API key in {self.api_key_env} over plain {scheme or 'http'} to "
                    f"{urlparse(self.base_url).hostname}: use an https:// judge base URL (or a judge on "
                    "127.0.0.1 / localhost)"
                )
            return key
        if self.is_local():
            return "not-needed"
        raise DriveKDError(
            f"the judge at {self.base_url} needs an API key: set the environment variable {self.api_key_env} "
            "(or name another variable with api_key_env)"
        )


def _read_config_file(path: Path) -> Any:
    """The settings of a judge config file, or one error that names the file and what to do."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise DriveKDError(f"{path}: no such judge config file (check the --judge-config path)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DriveKDError(f"{path}: cannot read the judge config ({err}); pass a YAML/JSON file") from None
    except yaml.YAMLError as err:
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise DriveKDError(
            f"{path}: not valid YAML{where} ({problem}); fix the --judge-config file"
        ) from None


def parse_total(reply: str | None) -> float | None:
    """The last "Total Score: N" in ``reply`` when N is within 0..100, else ``None``."""
    found = _TOTAL.findall(reply or "")
    if not found:
        return None
    value = float(found[-1])
    return value if 0.0 <= value <= 100.0 else None


def parse_first_total(reply: str | None) -> float | None:
    """DriveBench's reading: the first "Total Score: N" with N of 1 to 3 digits, else ``None``."""
    found = _FIRST_TOTAL.search(reply or "")
    return float(found.group(1)) if found else None


def parse_number(reply: str | None) -> float | None:
    """The DriveLM challenge's reading: the whole reply as one number (``float(reply)``), else ``None``."""
    try:
        value = float((reply or "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


PARSERS = {"drivekd": parse_total, "drivebench": parse_first_total, "drivelm": parse_number}


@dataclass(frozen=True)
class JudgeTask:
    sample_id: str
    rubric: str
    messages: list[dict[str, str]]


@dataclass(frozen=True)
class JudgeResult:
    """One grading of one sample. Tokens and calls are what this invocation spent (0 for a cache hit)."""

    sample_id: str
    run: int
    status: Status
    score: float | None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    cached: bool = False


class MalformedReply(Exception):
    """A 200 reply that is not a chat completion (not JSON, or without ``choices``): a failed call, retried."""


def _reply_text(response: Any) -> str:
    """The completion's text; :class:`MalformedReply` when the reply is not a chat completion with choices."""
    if isinstance(response, str):
        raise MalformedReply(f"the reply is not JSON: {response[:200]!r}")
    if not getattr(response, "choices", None):
        raise MalformedReply("a 200 reply without choices")
    message = response.choices[0].message
    return (message.content if message is not None else None) or ""


class JudgeCallError(Exception):
    """A call that failed for good (a non-retryable error, or retries used up)."""

    def __init__(self, message: str, calls: int) -> None:
        super().__init__(message)
        self.calls = calls


@dataclass
class _Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    calls: int


def _retryable(err: Exception) -> bool:
    if isinstance(err, MalformedReply | ValueError):  # ValueError: a JSON reply body that does not parse
        return True
    if isinstance(err, openai.APIStatusError):
        return err.status_code == 429 or err.status_code >= 500
    return isinstance(err, openai.APITimeoutError | openai.APIConnectionError)


def _retry_after(err: Exception) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Judge:
    """Grade :class:`JudgeTask` s with the configured endpoint; ``client`` may be injected for tests."""

    def __init__(self, config: JudgeConfig, *, client: openai.AsyncOpenAI | None = None) -> None:
        self.config = config
        self._key = config.api_key()
        self.client = client or openai.AsyncOpenAI(
            base_url=config.base_url, api_key=self._key, timeout=config.timeout_s, max_retries=0
        )
        self.cache = JudgeCache(config.cache_path) if config.cache_path is not None else None

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    async def _call(self, messages: list[dict[str, str]]) -> _Reply:
        cfg = self.config
        calls = 0
        for attempt in range(cfg.max_retries + 1):
            calls += 1
            try:
                kwargs: dict[str, Any] = {"max_tokens": cfg.max_tokens}
                if cfg.temperature is not None:
                    kwargs["temperature"] = cfg.temperature
                response = await self.client.chat.completions.create(
                    model=cfg.model, messages=messages, **kwargs
                )
                text = _reply_text(response)
            except Exception as err:
                if not _retryable(err) or attempt == cfg.max_retries:
                    raise JudgeCallError(self._redact(f"{type(err).__name__}: {err}"), calls) from None
                delay = min(cfg.max_backoff_s, cfg.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
                await asyncio.sleep(min(cfg.max_backoff_s, max(delay, _retry_after(err) or 0.0)))
                continue
            usage = getattr(response, "usage", None)
            return _Reply(
                text,
                usage.prompt_tokens if usage else 0,
                usage.completion_tokens if usage else 0,
                calls,
            )
        raise AssertionError("unreachable")

    async def _grade(self, task: JudgeTask, run: int) -> JudgeResult:
        cfg = self.config
        parse = PARSERS[cfg.protocol]
        digest = prompt_hash(task.messages, cfg.settings(), task.sample_id)
        cached = self.cache.get(digest, run) if self.cache is not None else None
        if cached and not (cached.status == "unparsed" and cfg.retry_unparsed):
            hit: Status = "ok" if cached.status == "ok" else "unparsed"
            error = None if hit == "ok" else "no score in the cached reply"
            return JudgeResult(task.sample_id, run, hit, cached.score, error, cached=True)
        replies: list[_Reply] = []
        try:
            replies.append(await self._call(task.messages))
            score = parse(replies[0].text)
            if score is None and cfg.protocol == "drivekd":
                follow_up = [*task.messages, {"role": "assistant", "content": replies[0].text}]
                replies.append(await self._call([*follow_up, {"role": "user", "content": REASK}]))
                score = parse(replies[-1].text)
        except JudgeCallError as err:
            log.warning("judge call for %s (run %d) failed: %s", task.sample_id, run, err)
            error: str | None = str(err)
            status: Status = "failed"
            score, calls = None, err.calls
        else:
            status = "ok" if score is not None else "unparsed"
            error = None if score is not None else f"no score in the reply: {replies[-1].text[:200]!r}"
            calls = 0
        prompt_tokens = sum(r.prompt_tokens for r in replies)
        completion_tokens = sum(r.completion_tokens for r in replies)
        calls += sum(r.calls for r in replies)
        if self.cache is not None and status != "failed":
            reply = "\n-----\n".join(r.text for r in replies)
            entry = CachedReply(status, reply, score, prompt_tokens, completion_tokens, calls)
            self.cache.put(digest, run, entry, content=content_hash(task.messages), settings=cfg.settings())
        return JudgeResult(task.sample_id, run, status, score, error, prompt_tokens, completion_tokens, calls)

    async def grade_all(self, tasks: Sequence[JudgeTask], *, progress: bool = True) -> list[JudgeResult]:
        """Every task graded ``config.runs`` times; results in task order, then run order."""
        limit = asyncio.Semaphore(self.config.concurrency)
        jobs = [(task, run) for task in tasks for run in range(self.config.runs)]
        with progress_bar(len(jobs), f"judge ({self.config.model})", enabled=progress) as advance:
            done = {"calls": 0}

            async def one(task: JudgeTask, run: int) -> JudgeResult:
                async with limit:
                    result = await self._grade(task, run)
                done["calls"] += result.calls
                advance(1, rate=f"{done['calls']} calls")
                return result

            try:
                if self.cache is not None:
                    self.cache.refuse_mixing(
                        [content_hash(t.messages) for t in tasks], self.config.settings()
                    )
                return list(await asyncio.gather(*(one(task, run) for task, run in jobs)))
            finally:
                await self.client.close()
                if self.cache is not None:
                    self.cache.close()


def run_judge(
    tasks: Sequence[JudgeTask],
    config: JudgeConfig,
    *,
    client: openai.AsyncOpenAI | None = None,
    progress: bool = True,
) -> list[JudgeResult]:
    """Synchronous entry point: grade every task ``config.runs`` times."""
    judge = Judge(config, client=client)
    return asyncio.run(judge.grade_all(tasks, progress=progress))


def public_config(config: JudgeConfig) -> dict[str, Any]:
    """The config as written into score files: settings and the key's variable name, never the key."""
    return json.loads(config.model_dump_json())
