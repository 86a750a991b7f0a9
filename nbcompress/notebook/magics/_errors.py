"""Errors during a magic as one ``UsageError`` line, or a traceback when nbcompress failed.

The rule (:func:`engine_errors`), applied to any ``Exception`` a magic's engine call raises:

1. **The user's code raised it** — the innermost frame of its traceback (where it was
   raised) is code that is neither nbcompress nor a library nbcompress calls (torch, torchao,
   numpy, numba, IPython, matplotlib, the standard library, ...): the model's ``forward``,
   the ``--eval`` function, the ``--calibrate`` data. A ``KeyError`` on ``input_ids`` or a
   user's shape ``assert`` is a mistake in the input or the model, not a crash of
   nbcompress. It becomes one line that names the option whose object ran (found from the
   first frame below nbcompress's own), where it raised and the fix; the exception is
   chained (``__cause__``) for whoever wants the frames. An exception raised inside torch,
   even on the way through the user's forward, is not the user's: torch's own layers
   failing on a module nbcompress swapped in is nbcompress's bug.
2. **The engine refused an argument** — a ``ValueError``/``TypeError`` raised by nbcompress:
   its message already says what is wrong and the fix; the keyword it names becomes the
   magic's option (``example_inputs`` → ``--input``); the engine's error stays chained.
3. **Anything else is nbcompress's own failure** and keeps its full traceback, so that a bug
   is never dressed up as a usage mistake.

``KeyboardInterrupt`` is never caught here: the magics that roll back say so themselves.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import sysconfig
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from IPython.core.error import UsageError

__all__ = ["engine_errors", "option_name", "user_error"]

# Engine keyword → the magic option that sets it; other keywords are left as they are.
_DASHED = (
    "layers types method scope granularity min_density seed target_sparsity max_drop objective "
    "refine stages ratios max_layers early_stop metric repeats backend mode calibrate round_to "
    "ignore heads ffn include_output remove rank energy val l1 lr epochs batch_size sampler "
    "storage objectives warm_start executor workers"
)
_OPTION_NAMES = {
    **{k: "--" + k.replace("_", "-") for k in _DASHED.split()},
    "example_inputs": "--input",
    "evaluate": "--eval",
    "budget": "--refine",
    "path": "--save",
    "importance": "--method",
    "train": "--data",
    "n_trials": "--trials",
}
# "target_sparsity / max_drop", or one item of a list argument: "ratios[1]".
_HEAD = re.compile(r"[a-z_]+(\[\d+\])?( / [a-z_]+)*")
# Libraries nbcompress itself calls: an exception raised inside them on nbcompress's behalf
# is nbcompress's failure, not the user's code.
_LIBRARIES = (
    "torch",
    "torch_pruning",
    "torchao",
    "numpy",
    "numba",
    "llvmlite",
    "IPython",
    "matplotlib",
    "ipywidgets",
    "sklearn",
    "PIL",
    "optuna",
)


def option_name(keyword: str) -> str:
    """The magic option for an engine keyword (``target_sparsity`` → ``--target-sparsity``)."""
    return _OPTION_NAMES.get(keyword, keyword)


def _names_an_argument(message: str) -> bool:
    """Whether ``message`` is an engine refusal that names an argument (``argument: ...``).

    The name may follow a context (``stage 2 of 2: target_sparsity: ...``); a Python error
    inside nbcompress (``unsupported operand type(s) for /: ...``) names none.
    """
    heads = message.split(": ")[:-1]
    return any(_HEAD.fullmatch(head) for head in heads)


def _translate(message: str) -> str:
    # Only the head of the message ("target_sparsity / max_drop: ...") names arguments.
    head, sep, rest = message.partition(": ")
    if not sep or not _HEAD.fullmatch(head):
        return message
    names = []
    for keyword in head.split(" / "):
        name, bracket, index = keyword.partition("[")
        names.append(option_name(name) + bracket + index)
    return " / ".join(names) + sep + rest


@functools.cache
def _roots() -> dict[str, tuple[str, ...]]:
    """Directories of nbcompress, of the libraries it calls, and of site-packages."""

    def where(name: str) -> tuple[str, ...]:
        spec = importlib.util.find_spec(name)
        return tuple(os.path.realpath(p) for p in (spec and spec.submodule_search_locations) or ())

    paths = sysconfig.get_paths()
    libraries = [p for name in _LIBRARIES for p in where(name)]
    return {
        "ours": (os.path.realpath(Path(__file__).parents[2]),),
        "libraries": tuple(libraries),
        "stdlib": (os.path.realpath(paths["stdlib"]), os.path.realpath(paths["platstdlib"])),
        "site": (os.path.realpath(paths["purelib"]), os.path.realpath(paths["platlib"])),
        "module_call": where("torch.nn") and (os.path.join(where("torch.nn")[0], "modules"),),
        "data": where("torch.utils.data"),
    }


@functools.cache
def _kind(filename: str) -> str:
    """Who owns the code of a file: ours, library, module_call, data or user."""
    if filename.startswith("<frozen "):
        return "library"  # the import system, e.g. a lazy import inside nbcompress
    path = os.path.realpath(filename) if os.path.isabs(filename) else filename
    roots = _roots()

    def under(key: str) -> bool:
        return any(path == r or path.startswith(r + os.sep) for r in roots[key])

    if under("ours"):
        return "ours"
    if under("module_call") and os.path.basename(path) == "module.py":
        return "module_call"
    if under("data"):
        return "data"
    if under("libraries") or (under("stdlib") and not under("site")):
        return "library"
    return "user"  # a notebook cell, the user's files, or a model library such as transformers


def _code(obj: Any) -> CodeType | None:
    """The code object that runs when ``obj`` is called or iterated, if any."""
    obj = getattr(obj, "func", obj)  # functools.partial
    own = vars(type(obj))  # a callable or iterable object runs its class's methods
    for candidate in (obj, own.get("__call__"), own.get("__iter__")):
        code = getattr(getattr(candidate, "__func__", candidate), "__code__", None)
        if isinstance(code, CodeType):
            return code
    return getattr(obj, "gi_code", None)  # a generator of batches


def _blame(frames: list[FrameType], given: dict[str, Any], model_option: str) -> str | None:
    """The option whose object raised; ``None`` when the user's code is not on the way."""
    if _kind(frames[-1].f_code.co_filename) != "user":
        return None  # raised by nbcompress or by a library on its behalf
    ours = [i for i, f in enumerate(frames) if _kind(f.f_code.co_filename) == "ours"]
    below = frames[ours[-1] + 1 if ours else 0 :]
    codes = {_code(obj): option for option, obj in given.items() if obj is not None}
    for frame in below:
        kind = _kind(frame.f_code.co_filename)
        if frame.f_code in codes:
            return codes[frame.f_code]
        if kind == "module_call":
            return model_option
        if kind == "data" and "--calibrate" in codes.values():
            return "--calibrate"
        if kind == "user":
            named = [o for o in ("--eval", "--val", "--calibrate") if given.get(o) is not None]
            return named[0] if named else model_option
    return None


def _site(frame: FrameType, line: int) -> str:
    """Where the user's code raised, e.g. ``in forward, line 7 of <ipython-input-3-…>``."""
    name = os.path.basename(frame.f_code.co_filename)
    return f"in {frame.f_code.co_name}, line {line} of {name}"


_FIXES = {
    "--eval": "fix the function passed as --eval (it takes the model and returns a number)",
    "--val": "fix the function passed as --val (it takes the model and returns a number)",
    "--calibrate": "pass calibration batches the model accepts (a tensor, a DataLoader or an "
    "iterable of batches)",
}


def user_error(
    err: BaseException, given: dict[str, Any] | None = None, model_option: str = "--input"
) -> UsageError | None:
    """One ``UsageError`` line for an exception the user's model, eval or data raised.

    Args:
        err: The exception raised during a magic's engine call.
        given: The user objects the magic passed, by option (``{"--eval": evaluate}``), to
            tell which one raised.
        model_option: The option that gave the input the model ran on (``--input``).

    Returns:
        The ``UsageError`` (its ``__cause__`` is ``err``), or ``None`` when ``err`` did not
        come from the user's code (rule 1 of this module).
    """
    walked = list(traceback.walk_tb(err.__traceback__))
    frames = [frame for frame, _ in walked]
    option = _blame(frames, given or {}, model_option) if frames else None
    if option is None:
        return None
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    what = f"{type(err).__name__}: {first}" if first else type(err).__name__
    if option in _FIXES:
        who = "the calibration data" if option == "--calibrate" else "the function"
        fix = _FIXES[option]
    else:
        who, fix = "the model", f"fix the model or pass {option} an input its forward accepts"
    usage = UsageError(f"{option}: {who} raised {what} ({_site(*walked[-1])}); {fix}.")
    usage.__cause__ = err
    return usage


@contextlib.contextmanager
def engine_errors(
    given: dict[str, Any] | None = None, *, model_option: str = "--input"
) -> Iterator[None]:
    """Turn what the user can fix into one ``UsageError`` line; let nbcompress bugs through.

    Args:
        given: The user objects the magic passed to the engine, by option
            (``{"--eval": evaluate, "--calibrate": data}``), to name the one that raised.
        model_option: The option that gave the input the model runs on.

    See the module docstring for the rule.
    """
    try:
        yield
    except Exception as err:
        usage = user_error(err, given, model_option)
        if usage is not None:
            raise usage from err
        if isinstance(err, (ValueError, TypeError)) and _names_an_argument(str(err)):
            # Chained too: the engine's error may wrap the user's (run_forward does).
            raise UsageError(_translate(str(err))) from err
        raise  # an error inside nbcompress keeps its traceback
