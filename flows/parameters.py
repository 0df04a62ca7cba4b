"""A flow's parameters outside Prefect: the settings model of its signature, and the signature read from source.

The flow's signature is the one place a parameter's type, range (`Annotated[..., Field(...)]`), default
and description live. Prefect turns it into the deployment's parameter schema, so the UI form and the
REST API refuse out-of-range values before any worker starts; here it becomes

- `settings_model(flow_fn)`: a pydantic model of those parameters, which the flow and the CLI's
  preflight check values with (one sentence naming every bad value, `validate_settings`);
- `read_flow_signature(module, function)`: the same parameters read from the module's source without
  importing it, so the command line's options and `--help` never import Prefect or torch.

Imports only pydantic and the standard library (and the pydantic models of structured parameters).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from tasks.errors import UserError
from tasks.signals.schema import Policy, SignalSpec

REQUIRED = inspect.Parameter.empty
# The names a flow's parameter annotations may use.
ANNOTATION_NAMES: dict[str, Any] = {
    "Annotated": typing.Annotated,
    "Any": typing.Any,
    "Literal": typing.Literal,
    "Optional": typing.Optional,
    "Union": typing.Union,
    "Field": Field,
    "Policy": Policy,
    "SignalSpec": SignalSpec,
}


def settings_model(flow_fn: Callable, name: str) -> type[BaseModel]:
    """A pydantic model with one field per flow parameter (its type, range and default); other keys are refused."""
    hints = typing.get_type_hints(flow_fn, include_extras=True)
    fields = {
        parameter: (hints[parameter], ... if signature.default is REQUIRED else signature.default)
        for parameter, signature in inspect.signature(flow_fn).parameters.items()
    }
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


_SCALAR_BRANCHES = ("str", "int", "float", "bool", "none", "dict")


def _is_branch(part: object) -> bool:
    """Whether an error location part names a union branch or a validator (`str`, `list[...]`, `function-after[...]`)."""
    return isinstance(part, str) and ("[" in part or part in _SCALAR_BRANCHES)


def _of_input_branch(error: dict, parameters: dict[str, Any]) -> bool:
    """For a value that several union branches refused, whether this error is the branch of the value's own type
    (a dict's model errors, not "should be a valid string")."""
    loc = error["loc"]
    if len(loc) < 2 or not _is_branch(loc[1]):
        return True
    value = parameters.get(loc[0])
    branch = str(loc[1])
    if isinstance(value, dict):
        return not branch.startswith(_SCALAR_BRANCHES + ("list[",))
    if isinstance(value, list):
        return branch.startswith("list[")
    return not branch.startswith("function-after[") and "[" not in branch or branch.startswith(type(value).__name__)


def validate_settings(parameters: dict[str, Any], model: type[BaseModel]) -> Any:
    """The settings model from a flow's parameters; UserError with one sentence naming every bad value."""
    try:
        return model(**parameters)
    except ValidationError as exc:
        errors = [error for error in exc.errors() if _of_input_branch(error, parameters)] or exc.errors()
        first_per_parameter: dict[object, dict] = {}
        for error in errors:  # a structured value's first problem (the rest often follow from it)
            first_per_parameter.setdefault(error["loc"][0] if error["loc"] else None, error)
        errors = list(first_per_parameter.values())
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'] if not _is_branch(p))} {error['msg'].removeprefix('Value error, ').lower()} (got {error.get('input')!r})"
            for error in errors
        )
        raise UserError(f"invalid parameters: {problems}.") from None


@dataclass(frozen=True)
class FlowParameter:
    name: str
    annotation: Any  # the type, without its Annotated range
    default: Any  # REQUIRED when the parameter has none
    doc: str  # its line under "Args:" in the flow's docstring


@dataclass(frozen=True)
class FlowSignature:
    summary: str  # the docstring's first paragraph
    parameters: tuple[FlowParameter, ...]


def without_range(annotation: Any) -> Any:
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation


def argument_docs(docstring: str) -> dict[str, str]:
    """`name: text` entries of a Google-style "Args:" section (continuation lines joined)."""
    docs: dict[str, str] = {}
    in_args, current = False, None
    for line in docstring.splitlines():
        stripped = line.strip()
        if stripped == "Args:":
            in_args = True
            continue
        if not in_args:
            continue
        if not stripped or (not line.startswith(" ") and stripped.endswith(":")):
            break
        entry = re.match(r"^\s{4}(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", line)
        if entry:
            current = entry.group(1)
            docs[current] = entry.group(2)
        elif current:
            docs[current] += " " + stripped
    return docs


def read_flow_signature(module: str, function: str) -> FlowSignature:
    """The parameters of `module.function` from its source file; the module is not imported."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(module)
    tree = ast.parse(Path(spec.origin).read_text(), filename=spec.origin)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    docstring = inspect.cleandoc(ast.get_docstring(node) or "")
    docs = argument_docs(docstring)
    arguments = node.args.args
    defaults = [REQUIRED] * (len(arguments) - len(node.args.defaults)) + [ast.literal_eval(d) for d in node.args.defaults]
    parameters = tuple(
        FlowParameter(
            name=argument.arg,
            annotation=without_range(eval(compile(ast.Expression(argument.annotation), spec.origin, "eval"), dict(ANNOTATION_NAMES))),  # noqa: S307 - this project's own source
            default=default,
            doc=docs.get(argument.arg, ""),
        )
        for argument, default in zip(arguments, defaults)
    )
    return FlowSignature(summary=docstring.split("\n\n")[0], parameters=parameters)
