"""What the `dipfast` commands share on their command lines: argument types, and a parser whose usage
errors are one line (dipfast.cli and dipfast.bench.cli both build theirs with it)."""

from __future__ import annotations

import argparse

EXIT_BAD_INPUT = 2


def _integer_from(minimum: int):
    """An argparse type: an integer >= minimum."""
    kind = "positive" if minimum == 1 else "non-negative" if minimum == 0 else f">= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
        return value

    return parse


positive_int, non_negative_int = _integer_from(1), _integer_from(0)


def tile_option(text: str) -> int | str | None:
    """--tile: 'auto', 'none' or a positive integer (restore()'s tile=)."""
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'none' or a positive integer, got {text!r}") from None


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr like every other bad input (no usage dump), and a word left
    over that is a value of one of the command's options says which (`dipfast restore lr.png sr`, as one would call
    restore("lr.png", "sr"): "... ('sr' is a value of --task: write --task sr)")."""

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            hints = [f"{word!r} is a value of {option}: write {option} {word}" for word in extras
                     for option in _options_taking(word, self, parsed)]  # fmt: skip
            self.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else ""))
        return parsed

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"dipfast: error: {message}\n")


def _options_taking(word: str, parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> list[str]:
    """The options among whose choices `word` is, in `parser` and the subcommands `parsed` chose."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(parsed, action.dest, None))
            found += _options_taking(word, chosen, parsed) if chosen is not None else []
        elif action.option_strings and action.choices and word in map(str, action.choices):
            found.append(action.option_strings[-1])
    return found
