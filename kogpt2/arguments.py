"""Argument types shared by the CLIs, so a bad number or device is refused by argparse with one line (exit 2)
before torch is even imported."""
from __future__ import annotations

import argparse
import math
import re

DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def integer(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    parse.__name__ = "integer"
    return parse


def number(minimum: float | None = None, maximum: float | None = None, above: float | None = None):
    """A finite float in [minimum, maximum], or greater than ``above``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be greater than {above:g}, not {value:g}")
        if minimum is not None and value < minimum or maximum is not None and value > maximum:
            low = "" if minimum is None else f"{minimum:g}"
            high = "" if maximum is None else f"{maximum:g}"
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], not {value:g}" if low and high
                                             else f"must be at least {low}, not {value:g}" if low
                                             else f"must be at most {high}, not {value:g}")
        return value

    parse.__name__ = "number"
    return parse


def device(text: str) -> str:
    if not DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"'{text}' is not a device: use auto, cpu, cuda, cuda:N or mps")
    return text


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options the user typed (``--name value`` or ``--name=value``)."""
    typed = {token.split("=", 1)[0] for token in argv if token.startswith("-")}
    return {action.dest for action in parser._actions if typed & set(action.option_strings)}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's help line with its real default once: appended where the help text does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"
