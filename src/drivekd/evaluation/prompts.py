"""Benchmark judge prompts read as data from a user's checkout (never imported or executed) or from YAML.

DriveBench: ``--judge-prompts`` names the checkout (its ``evaluate/prompts.py`` holds the rubric templates as
module-level strings; ``evaluate/request.py`` the judge's system text; ``evaluate/eval.py`` the question whose
visual description is replaced by a fixed sentence), the ``prompts.py`` file itself, or a YAML file with the same
names (``PERCEPTION_MCQ_PROMPT: ...``, optional ``system`` and ``fixed_descriptions``).

DriveLM: the checkout (``challenge/gpt_eval.py``), that file, or a YAML file with ``system``, ``prompt`` (a template
with ``{GT}`` and ``{PRED}``), optional ``temperature`` and ``max_tokens``. From ``gpt_eval.py`` the system message,
the prompt built in ``forward`` (its literal text and where the ground truth and the answer go), the sampling
temperature and the token limit are read.

Python files are parsed with :mod:`ast` and only literal strings (and ``+`` of literals) are read: nothing in them
runs. Every source records its path and the SHA-256 of the prompt text it yielded, so a score report can say which
prompts produced its numbers.
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from drivekd.errors import DriveKDError

# Our rubric name -> the DriveBench template that judges it (upstream evaluate/eval.py routing).
DRIVEBENCH_TEMPLATES = {
    "perception_mcq": "PERCEPTION_MCQ_PROMPT",
    "perception_vqa": "PERCEPTION_VQA_PROMPT",
    "prediction_vqa": "PREDICTION_VQA_PROMPT",
    "planning_vqa": "PLANNING_VQA_PROMPT",
    "behavior_mcq": "BEHAVIOR_MCQ_PROMPT",
}
_DRIVEBENCH_FILES = ("evaluate/prompts.py", "evaluate/request.py", "evaluate/eval.py")
_DRIVELM_FILE = "challenge/gpt_eval.py"
_YAML = (".yaml", ".yml")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _parse(path: Path) -> ast.Module:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError) as err:
        raise DriveKDError(f"{path}: cannot read it as Python source ({err})") from None


def _literal(node: ast.AST, names: dict[str, str]) -> str | None:
    """The value of a string literal, a name bound to one earlier, or ``+`` of those; ``None`` otherwise."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal(node.left, names), _literal(node.right, names)
        return None if left is None or right is None else left + right
    return None


def module_strings(path: Path) -> dict[str, str]:
    """Module-level string assignments (``NAME = "..."``) and string-valued dicts (as ``NAME.key``)."""
    names: dict[str, str] = {}
    for node in _parse(path).body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        value = getattr(node, "value", None)
        for target in targets:
            if not isinstance(target, ast.Name) or value is None:
                continue
            text = _literal(value, names)
            if text is not None:
                names[target.id] = text
            elif isinstance(value, ast.Dict):
                for key, item in zip(value.keys, value.values, strict=True):
                    if isinstance(key, ast.Constant) and (text := _literal(item, names)) is not None:
                        names[f"{target.id}.{key.value}"] = text
    return names


def _local_string(tree: ast.Module, name: str) -> str | None:
    """The first literal string assigned to ``name`` anywhere in the file (e.g. inside a method)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            text = _literal(node.value, {})
            if text is not None:
                return text
    return None


def _fixed_descriptions(tree: ast.Module) -> dict[str, str]:
    """``if question == "<text>": return "<text>"`` pairs: questions whose description is a fixed sentence."""
    fixed: dict[str, str] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)):
            continue
        test = node.test
        if not (
            isinstance(test.left, ast.Name)
            and test.left.id == "question"
            and len(test.ops) == 1
            and isinstance(test.ops[0], ast.Eq)
        ):
            continue
        question = _literal(test.comparators[0], {})
        body = node.body[0] if node.body else None
        answer = _literal(body.value, {}) if isinstance(body, ast.Return) and body.value else None
        if question is not None and answer is not None:
            fixed[question] = answer
    return fixed


def _yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise DriveKDError(f"{path}: cannot read the prompts ({err})") from None
    if not isinstance(data, dict):
        raise DriveKDError(f"{path}: a prompts file must be a mapping of names to prompt texts")
    return data


@dataclass(frozen=True)
class DriveBenchPrompts:
    """DriveBench's rubric templates (``{QUESTION}``, ``{GT}``, ``{PRED}``, ``{DESC}``) and their provenance."""

    path: str
    templates: dict[str, str]  # by our rubric name
    system: str | None = None
    fixed_descriptions: dict[str, str] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """SHA-256 of the prompt text used: templates, system text and fixed descriptions as canonical JSON."""
        blob = {"templates": self.templates, "system": self.system, "fixed": self.fixed_descriptions}
        return _sha256(json.dumps(blob, sort_keys=True, ensure_ascii=False))

    def template_sha256(self) -> dict[str, str]:
        return {name: _sha256(text) for name, text in self.templates.items()}


def read_drivebench_prompts(path: str | Path) -> DriveBenchPrompts:
    """The DriveBench prompts of a checkout, of its ``evaluate/prompts.py`` or of a YAML file (module docstring)."""
    path = Path(path)
    system: str | None = None
    fixed: dict[str, str] = {}
    if path.suffix.lower() in _YAML:
        data = _yaml(path)
        strings = {k: v for k, v in data.items() if isinstance(v, str)}
        system = data.get("system")
        fixed = dict(data.get("fixed_descriptions") or {})
    else:
        prompts_file = path / _DRIVEBENCH_FILES[0] if path.is_dir() else path
        if not prompts_file.is_file():
            raise DriveKDError(
                f"{prompts_file}: not found; --judge-prompts takes a DriveBench checkout (with "
                "evaluate/prompts.py), that prompts.py, or a YAML file of prompts"
            )
        strings = module_strings(prompts_file)
        folder = prompts_file.parent
        if (folder / "request.py").is_file():
            system = _local_string(_parse(folder / "request.py"), "system_message")
        if (folder / "eval.py").is_file():
            fixed = _fixed_descriptions(_parse(folder / "eval.py"))
    missing = [name for name in DRIVEBENCH_TEMPLATES.values() if not isinstance(strings.get(name), str)]
    if missing:
        raise DriveKDError(
            f"{path}: no plain string for {', '.join(missing)}; a DriveBench prompts file assigns each rubric "
            "template to a module-level name"
        )
    templates = {rubric: strings[name] for rubric, name in DRIVEBENCH_TEMPLATES.items()}
    return DriveBenchPrompts(str(path), templates, system, fixed)


@dataclass(frozen=True)
class DriveLMPrompt:
    """The DriveLM challenge's GPT-score prompt: ``template`` has ``{GT}`` and ``{PRED}`` placeholders."""

    path: str
    system: str | None
    template: str
    temperature: float | None = None
    max_tokens: int | None = None

    @property
    def sha256(self) -> str:
        return _sha256(json.dumps({"system": self.system, "template": self.template}, ensure_ascii=False))

    def messages(self, ground_truth: str, answer: str) -> list[dict[str, str]]:
        """The chat request for one (ground truth, answer) pair, as the challenge sends it."""
        user = self.template.format(GT=ground_truth, PRED=answer)
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, {"role": "user", "content": user}]


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _forward_template(tree: ast.Module, path: Path) -> str:
    """The prompt ``forward`` builds: literal text kept, the ground-truth and answer names as placeholders."""
    forward = next(
        (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "forward"), None
    )
    if forward is None:
        raise DriveKDError(f"{path}: no forward() that builds the GPT prompt")
    slots: dict[str, str] = {}
    built: dict[str, str] = {}
    for node in forward.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target = node.targets[0]
        if isinstance(target, ast.Tuple) and len(target.elts) == 2 and not slots:
            # `answer, GT = data`: the pair is (prediction, ground truth), as evaluation.py passes it.
            pred, truth = (e.id if isinstance(e, ast.Name) else "" for e in target.elts)
            slots = {pred: "{PRED}", truth: "{GT}"}
        elif isinstance(target, ast.Name):
            value = _template_expr(node.value, slots, built)
            if value is not None:
                built[target.id] = value
    template = next((t for t in built.values() if "{GT}" in t and "{PRED}" in t), None)
    if template is None:
        raise DriveKDError(
            f"{path}: could not read the prompt from forward() (literal text joined with the ground truth and "
            "the answer); pass a YAML file with 'system' and 'prompt' instead"
        )
    return template


def _template_expr(node: ast.AST, slots: dict[str, str], built: dict[str, str]) -> str | None:
    """A prompt expression as a template: literals escaped, slot names as placeholders, earlier names expanded."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return _escape(node.value)
    if isinstance(node, ast.Name):
        return slots.get(node.id, built.get(node.id))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left = _template_expr(node.left, slots, built)
        right = _template_expr(node.right, slots, built)
        return None if left is None or right is None else left + right
    return None


def _keyword(tree: ast.Module, name: str) -> Any:
    """The first literal value passed as keyword ``name`` in a call."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == name and isinstance(kw.value, ast.Constant):
                    return kw.value.value
    return None


def read_drivelm_prompt(path: str | Path) -> DriveLMPrompt:
    """The DriveLM GPT prompt of a checkout, of its ``challenge/gpt_eval.py`` or of a YAML file."""
    path = Path(path)
    if path.suffix.lower() in _YAML:
        data = _yaml(path)
        if (
            not isinstance(data.get("prompt"), str)
            or "{GT}" not in data["prompt"]
            or "{PRED}" not in data["prompt"]
        ):
            raise DriveKDError(f"{path}: 'prompt' must be a text with {{GT}} and {{PRED}} placeholders")
        return DriveLMPrompt(
            str(path), data.get("system"), data["prompt"], data.get("temperature"), data.get("max_tokens")
        )
    source = path / _DRIVELM_FILE if path.is_dir() else path
    if not source.is_file():
        raise DriveKDError(
            f"{source}: not found; --judge-prompts takes a DriveLM checkout (with challenge/gpt_eval.py), that "
            "gpt_eval.py, or a YAML file with 'system' and 'prompt'"
        )
    tree = _parse(source)
    temperature = _keyword(tree, "temperature")
    max_tokens = _keyword(tree, "max_tokens")
    return DriveLMPrompt(
        str(source),
        _local_string(tree, "system_message"),
        _forward_template(tree, source),
        float(temperature) if isinstance(temperature, int | float) else None,
        max_tokens if isinstance(max_tokens, int) else None,
    )
