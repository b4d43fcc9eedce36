"""Just enough Dockerfile and .dockerignore parsing to test the images without a Docker engine."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, ARG, RUN, COPY, ENV, ...
    arguments: str
    line: int


@dataclass
class Stage:
    base: str  # FROM's image, ${ARG}s resolved
    name: str | None
    args: dict[str, str] = field(default_factory=dict)  # ARG defaults declared in this stage
    instructions: list[Instruction] = field(default_factory=list)


def instructions(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    parsed: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        keyword, _, arguments = buffer.partition(" ")
        parsed.append(Instruction(keyword.upper(), arguments.strip(), start))
        buffer = ""
    return parsed


def _substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)


def _arg(arguments: str) -> tuple[str, str | None]:
    name, equals, default = arguments.partition("=")
    return name.strip(), default.strip().strip('"') if equals else None


def stages(path: Path) -> list[Stage]:
    """The build stages, each with its ARG defaults; global ARGs (before the first FROM) resolve FROM."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for instruction in instructions(path):
        if instruction.keyword == "ARG" and not result:
            name, default = _arg(instruction.arguments)
            if default is not None:
                global_args[name] = default
        elif instruction.keyword == "FROM":
            words = instruction.arguments.split()
            image = _substitute(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append(Stage(base=image, name=name))
        else:
            stage = result[-1]
            if instruction.keyword == "ARG":
                name, default = _arg(instruction.arguments)
                if default is not None:
                    stage.args[name] = default
            stage.instructions.append(instruction)
    return result


def global_args(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for instruction in instructions(path):
        if instruction.keyword == "FROM":
            break
        if instruction.keyword == "ARG":
            name, default = _arg(instruction.arguments)
            if default is not None:
                values[name] = default
    return values


def pip_requirements(stage: Stage) -> list[str]:
    """Every quoted requirement in the stage's `pip install` commands, ${ARG}s resolved."""
    found: list[str] = []
    for instruction in stage.instructions:
        if instruction.keyword != "RUN":
            continue
        for command in re.split(r"&&|;", instruction.arguments):
            words = shlex.split(command)
            if "pip" in " ".join(words[:2]) and "install" in words:
                found += [_substitute(word, stage.args) for word in words if not word.startswith("-")][2:]
    return [word for word in found if word not in ("install", "uninstall")]


def env_names(stage: Stage) -> list[str]:
    names: list[str] = []
    for instruction in stage.instructions:
        if instruction.keyword == "ENV":
            names += [word.partition("=")[0] for word in shlex.split(instruction.arguments)]
    return names


def copy_sources(path: Path) -> list[str]:
    """Sources of COPY instructions that read the build context (not --from=stage)."""
    sources: list[str] = []
    for instruction in instructions(path):
        if instruction.keyword != "COPY":
            continue
        words = shlex.split(instruction.arguments)
        if any(word.startswith("--from") for word in words):
            continue
        words = [word for word in words if not word.startswith("--")]
        sources += words[:-1]
    return sources


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over slash-separated paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def dockerignore_excludes(ignore_file: Path):
    """A function relative_path -> True when the build context leaves that path out."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in ignore_file.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        rules.append((negated, _pattern_regex(pattern.strip("/"))))

    def excluded(relative: str) -> bool:
        parts = relative.strip("/").split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for negated, regex in rules:
            if any(regex.match(prefix) for prefix in prefixes):
                result = not negated
        return result

    return excluded
