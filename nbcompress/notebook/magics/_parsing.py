"""How every magic reads its line and shows its ``?`` help: one parser class for all.

IPython's ``magic_arguments`` builds an argparse parser per magic; three of its habits hurt
in a notebook. The line is split on spaces, so ``--input torch.randn(2, 3, 28, 28)`` fails
with "unrecognized arguments: 3, 28, 28)". argparse's own messages ("the following
arguments are required: model") name neither the fix nor the help. And the help is reST
(``::``, double backquotes) wrapped at 80 columns. :func:`rebuild` gives a magic a
:class:`MagicParser` made from the same decorators, which splits the line with brackets
kept whole (:func:`split_line`), says what to type instead, and renders its help as plain
text (:func:`plain_help`). :class:`~nbcompress.notebook.magics._common.ModelMagics` calls
it for every magic class, so a magic's own code is unchanged.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
import textwrap
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic_arguments import MagicArgumentParser, real_name

__all__ = ["MagicParser", "plain_help", "rebuild", "split_line"]

#: Width of the help text: a terminal's, and readable in a notebook pager.
WIDTH = 88
_OPEN, _CLOSE = "([{", ")]}"


def split_line(line: str) -> list[str]:
    """Split a magic's line into arguments, keeping a bracketed expression whole.

    Words are split on whitespace outside quotes and brackets, and quotes are kept, as
    IPython's ``arg_split`` keeps them; so ``--input torch.randn(2, 3, 28, 28)`` is one
    value, and so is a dict of per-layer amounts. An unclosed bracket runs to the end of
    the line; evaluating the expression then reports it.

    Raises:
        UsageError: A quote is not closed.
    """
    tokens: list[str] = []
    word, quote, depth = "", "", 0
    for char in line:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth = max(depth - 1, 0)
        elif char.isspace() and depth == 0:
            if word:
                tokens.append(word)
            word = ""
            continue
        word += char
    if quote:
        raise UsageError(f"the line has a quote that is not closed; close it: {line}")
    return [*tokens, word] if word else tokens


# ----------------------------------------------------------------------- help text
_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_CODE = re.compile(r"``(.+?)``|`([^`]+)`")


def _plain(text: str) -> str:
    """Inline reST markup as plain text: ``code`` → code, :class:`~a.B` → B."""

    def role(match: re.Match[str]) -> str:
        target = match.group(1)
        return target.rsplit(".", 1)[-1] if match.group(0).count("~") else target

    return _CODE.sub(lambda m: m.group(1) or m.group(2), _ROLE.sub(role, text))


def _closing(text: str, start: int) -> int | None:
    """Index of the parenthesis closing the one at ``start``, or ``None``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return None


_EXAMPLE = re.compile(r"``([%-][^`]*)``")
_BETWEEN = re.compile(r",\s+(?:or\s+)?|\s+or\s+")


def _examples(paragraph: str) -> tuple[list[tuple[str, str]], str] | None:
    """An inline "Examples: ``a``, ``b`` (why)." paragraph as (example, comment) pairs.

    Returns:
        The pairs and the rest of the paragraph after the list, or ``None`` when the
        paragraph is not such a list (the examples must end a sentence).
    """
    head = re.match(r"Examples?:\s+", paragraph)
    if head is None:
        return None
    pos, items = head.end(), []
    while (code := _EXAMPLE.match(paragraph, pos)) is not None:
        pos, comment = code.end(), ""
        if paragraph.startswith(" (", pos):
            end = _closing(paragraph, pos + 1)
            if end is None:
                return None
            pos, comment = end + 1, paragraph[pos + 2 : end]
        items.append((code.group(1), comment))
        between = _BETWEEN.match(paragraph, pos)
        if between is None or not paragraph.startswith("``", between.end()):
            break
        pos = between.end()
    if not items or not re.match(r"\.(\s|$)", paragraph[pos:]):
        return None
    return items, paragraph[pos + 1 :].strip()


def _wrap(text: str, indent: str = "") -> str:
    return textwrap.fill(
        _plain(text), WIDTH, initial_indent=indent, subsequent_indent=indent,
        break_on_hyphens=False, break_long_words=False,
    )  # fmt: skip


def _description(doc: str) -> list[str]:
    """The docstring's paragraphs as plain text: prose re-wrapped, examples one a line."""
    blocks = []
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        if paragraph.startswith((" ", "\t")):  # an indented block stays as written
            blocks.append(_plain(paragraph))
            continue
        flat = " ".join(paragraph.split())
        found = _examples(flat)
        if found is None:
            blocks.append(_wrap(flat))
            continue
        items, rest = found
        lines = ["Examples:" if len(items) > 1 else "Example:"]
        for example, comment in items:
            lines.append("  " + _plain(example))
            if comment:
                lines.append(_wrap(comment, " " * 6))
        blocks.append("\n".join(lines))
        if rest:
            blocks.append(_wrap(rest))
    return blocks


def _metavar(action: argparse.Action) -> str:
    if action.metavar:
        return str(action.metavar)
    longest = max(action.option_strings, key=len)
    return longest.lstrip("-").replace("-", "_").upper()


def _invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.dest
    names = ", ".join(sorted(action.option_strings, key=len))
    return names if action.nargs == 0 else f"{names} {_metavar(action)}"


def _usage(parser: argparse.ArgumentParser) -> str:
    words = [f"%{parser.prog}"]
    for action in parser._actions:
        if action.option_strings:
            continue
        if action.nargs == "?":
            words.append(f"[{action.dest}]")
        elif action.nargs in ("*", "+"):
            words.append(f"[{action.dest} ...]" if action.nargs == "*" else f"{action.dest} ...")
        else:
            words.append(action.dest)
    if any(a.option_strings for a in parser._actions):
        words.append("[options]")
    return " ".join(words)


def _help(action: argparse.Action) -> str:
    text = (action.help or "").replace("%%", "%")
    return f"  {_invocation(action)}" + (f"\n{_wrap(text, ' ' * 6)}" if text.strip() else "")


def plain_help(parser: argparse.ArgumentParser) -> str:
    """A magic's ``?`` help as plain text, for a notebook pager and a terminal alike.

    The docstring's summary line first (``%quickref`` shows it), then the usage, the
    docstring's paragraphs (examples one a line, no reST markup) and each argument on a
    line of its own with its help indented below.
    """
    doc = _description(parser.description or "")
    summary, body = (doc[0], doc[1:]) if doc else ("", [])
    blocks = [summary, f"Usage: {_usage(parser)}", *body]
    positional = [a for a in parser._actions if not a.option_strings]
    options = [a for a in parser._actions if a.option_strings]
    if positional:
        blocks.append("\n".join(["Arguments:", *map(_help, positional)]))
    if options:
        blocks.append("\n".join(["Options:", *map(_help, options)]))
    return "\n\n".join(b for b in blocks if b) + "\n"


# ----------------------------------------------------------------------- errors
_ARGUMENT = re.compile(r"argument (?P<names>[^:]+): (?P<rest>.*)", re.S)
_AMBIGUOUS = re.compile(r"ambiguous option: (?P<given>\S+) could match (?P<matches>.*)")


class MagicParser(MagicArgumentParser):
    """A magic's parser: bracket-aware splitting, plain help, errors that name the fix."""

    def parse_argstring(self, argstring: str) -> argparse.Namespace:
        """Split ``argstring`` (see :func:`split_line`) and parse it."""
        args, extras = self.parse_known_args(split_line(argstring))
        if extras:
            self._unrecognized(extras)
        return args

    def format_help(self) -> str:
        """The plain-text help (:func:`plain_help`)."""
        return plain_help(self)

    def error(self, message: str) -> NoReturn:
        """Raise argparse's complaint as one ``UsageError`` line that says what to type."""
        raise UsageError(self._explain(message))

    # ------------------------------------------------------------------- messages
    @property
    def _see(self) -> str:
        return f"see %{self.prog}? for the options"

    def _examples(self) -> list[str]:
        """The magic's examples from its docstring (``%prune model 0.5`` …)."""
        return re.findall(rf"``(%{re.escape(self.prog)}\b[^`]*)``", self.description or "")

    def _example_of(self, option: str) -> str | None:
        """``--input x``: how an example of the docstring gives ``option`` a value."""
        for example in self._examples():
            words = example.split()
            if option in words[:-1]:
                return f"{option} {words[words.index(option) + 1]}"
        return None

    def _unrecognized(self, extras: list[str]) -> NoReturn:
        first = extras[0]
        if first.startswith("-") and not re.fullmatch(r"-\d.*", first):
            flag = first.split("=", 1)[0]
            # Compared without the dashes, which would make every pair look alike.
            known = {s[2:]: s for s in self._option_string_actions if s.startswith("--")}
            words = difflib.get_close_matches(flag.lstrip("-"), list(known), n=3, cutoff=0.7)
            close = [known[word] for word in words]
            hint = f"did you mean {' or '.join(close)}? S" if close else "s"
            raise UsageError(f"{flag}: %{self.prog} has no such option; {hint}{self._see[1:]}.")
        raise UsageError(
            f"{first!r}: an extra argument %{self.prog} does not take (usage: "
            f"{_usage(self)}); a value with spaces needs quotes, or brackets around an "
            f"expression, e.g. --eval (lambda m: acc(m)); {self._see}."
        )

    def _explain(self, message: str) -> str:
        if message.startswith("the following arguments are required: "):
            names = message.split(": ", 1)[1].split(", ")
            return self._required(names)
        ambiguous = _AMBIGUOUS.fullmatch(message)
        if ambiguous:
            return (
                f"{ambiguous['given']}: could be {ambiguous['matches']}; write the option out "
                "in full."
            )
        argument = _ARGUMENT.fullmatch(message)
        if argument is None:
            return f"{message}; {self._see}."
        names = argument["names"].split("/")
        name = max(names, key=len)
        rest = argument["rest"]
        if rest.startswith("expected ") and "argument" in rest:
            action = self._option_string_actions.get(name)
            example = self._example_of(name) or (f"{name} {_metavar(action)}" if action else name)
            return f"{name}: its value is missing, e.g. {example}; {self._see}."
        return f"{name}: {rest}"

    def _required(self, names: list[str]) -> str:
        name = names[0]
        examples = self._examples()
        example = next((e for e in examples if name in e.split()), None) or (
            examples[0] if examples else f"%{self.prog} model"
        )
        what = "name the model" if name == "model" else "give it"
        return f"{name}: missing; {what}, e.g. {example}."


def rebuild(func: Any) -> None:
    """Give the magic ``func`` a :class:`MagicParser` and the plain-text help as its doc.

    The parser is made from the same ``@argument`` decorators IPython's ``magic_arguments``
    recorded on ``func``, with the magic's own docstring as its description.
    """
    old = getattr(func, "parser", None)
    if old is None or isinstance(old, MagicParser):
        return
    kwds = dict(getattr(func, "argcmd_kwds", {}))
    kwds.setdefault("description", old.description)
    parser = MagicParser(real_name(func), **kwds)
    group = None
    for decorator in func.decorators[::-1]:  # in source order, as IPython applies them
        group = decorator.add_to_parser(parser, group) or group
    func.parser = parser
    func.__doc__ = parser.format_help()
