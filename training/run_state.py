"""A resumable run's state as ONE file, and the one rule for settings that change on resume.

The file is a safetensors file (no pickle: loading never executes code): the weights of the networks
(`<prefix>.<name>`), the Adam moments (`optimizer.<param index>.<name>`) and any other tensors (RNG states,
statistics, losses), with the JSON document (format, format_version, step, settings, ...) in the file's
own metadata header. It is written atomically, so the file on disk is always a whole state: a job that
spans machines commits this one file, replaced each time.

`train` and `distill` both resume through `resumed_settings`: the saved settings win, a setting given
again with another value is refused by name, except those in `RESUME_MAY_CHANGE`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from efficientad.errors import UserError
from efficientad.files import atomic_write, check_versioned_document

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DOCUMENT_KEY = "document"  # the safetensors metadata entry that holds the JSON document
# Settings that may take a new value on --resume (the rest must stay as the run started):
# - steps: a run can be extended or shortened (not below the step it reached); schedules follow the new end;
# - learning_rate: a new rate from the resumed step on (recorded where the run keeps a schedule);
# - device, save_every, eval_every: where and how often, not what is trained.
RESUME_MAY_CHANGE = ("steps", "learning_rate", "device", "save_every", "eval_every")

SettingsT = TypeVar("SettingsT")


class RunStateError(UserError):
    """A resumable state that is missing, truncated, foreign or does not fit the networks."""


@dataclass
class RunState:
    """A loaded state: its JSON document and its tensors."""

    path: Path
    document: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.document["step"])

    def settings(self, settings_type: type[SettingsT]) -> SettingsT:
        """The saved settings as `settings_type` (a dataclass); unknown saved keys are ignored."""
        known = {field.name for field in fields(settings_type)}  # type: ignore[arg-type]
        return settings_type(**{k: v for k, v in self.document["settings"].items() if k in known})

    def restore_module(self, module: nn.Module, prefix: str) -> None:
        values = {
            key.removeprefix(f"{prefix}."): value
            for key, value in self.tensors.items()
            if key.startswith(f"{prefix}.")
        }
        try:
            module.load_state_dict(values)
        except RuntimeError as error:
            raise RunStateError(f"{self.path}: {prefix} weights do not fit the network: {error}") from None

    def restore_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in self.tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        template = optimizer.state_dict()
        try:
            optimizer.load_state_dict({"state": state, "param_groups": template["param_groups"]})
        except (ValueError, KeyError, RuntimeError) as error:
            raise RunStateError(f"{self.path}: optimizer state does not fit: {error}") from None


def save_run_state(
    path: Path,
    *,
    kind: str,
    document: Mapping[str, Any],
    modules: Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write the state atomically: `modules` by prefix, the optimizer's moments, `tensors`, `document`."""
    values: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for name, value in module.state_dict().items():
            values[f"{prefix}.{name}"] = value.detach().cpu().contiguous()
    for index, moments in optimizer.state_dict()["state"].items():
        for name, value in moments.items():
            values[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    for name, value in (tensors or {}).items():
        values[name] = value.detach().cpu().contiguous()
    header = {"format": kind, "format_version": FORMAT_VERSION, **document}
    metadata = {DOCUMENT_KEY: json.dumps(header, default=str)}
    atomic_write(Path(path), lambda temporary: save_file(values, str(temporary), metadata=metadata))
    logger.info("saved the state at step %s to %s", document.get("step"), path)


def load_run_state(path: Path, *, kind: str, what: str) -> RunState:
    """The state in `path`; RunStateError naming the file when it is missing, foreign or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise RunStateError(f"nothing to resume: {what} not found at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise RunStateError(f"cannot read {what} {path}: {error}") from None
    try:
        document = json.loads(header[DOCUMENT_KEY])
    except (KeyError, json.JSONDecodeError) as error:
        raise RunStateError(f"not {what} (no document in its header: {error}): {path}") from None
    check_versioned_document(
        document, path, expected_format=kind, max_version=FORMAT_VERSION, error=RunStateError, what=what
    )
    return RunState(path, document, tensors)


def resumed_settings(stored: SettingsT, given: Mapping[str, Any], *, what: str) -> SettingsT:
    """The run's saved settings with the changeable ones among `given` applied.

    `given`: the settings asked for now (only those set explicitly, e.g. the command line's flags). A
    setting outside RESUME_MAY_CHANGE with another value than the saved one is refused, by name.
    """
    saved = asdict(stored)  # type: ignore[call-overload]
    unknown = sorted(set(given) - set(saved))
    if unknown:
        raise UserError(f"unknown settings for {what}: {', '.join(unknown)}")
    conflicts = [
        f"--{name.replace('_', '-')} {value} (the run has {saved[name]})"
        for name, value in given.items()
        if name not in RESUME_MAY_CHANGE and value != saved[name]
    ]
    if conflicts:
        allowed = ", ".join(f"--{name.replace('_', '-')}" for name in RESUME_MAY_CHANGE)
        raise UserError(
            f"--resume continues {what} with its saved settings; these differ: {', '.join(conflicts)} "
            f"(only {allowed} may change)"
        )
    changes = {name: value for name, value in given.items() if name in RESUME_MAY_CHANGE}
    for name, value in changes.items():
        if value != saved[name]:
            logger.info("resuming %s with %s = %s (was %s)", what, name, value, saved[name])
    return replace(stored, **changes)  # type: ignore[type-var]
