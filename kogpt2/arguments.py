"""The CLIs' parser and argument types, so a bad number, device or flag is refused with one line (exit 2) before
torch is even imported."""
from __future__ import annotations

import argparse
import difflib
import math
import re
from typing import NoReturn

from .defaults import LORA_PROJECTIONS

DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
FLAG = re.compile(r"^--?[^\W\d]")  # "--name" or "-n", not a negative number


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


def projections(text: str) -> tuple[str, ...]:
    """``--lora_layers``: comma-separated names of a block's projections (``attn.c_attn,mlp.c_fc``)."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in LORA_PROJECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"'{text}': give some of {','.join(LORA_PROJECTIONS)}, comma-separated")
    return names


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


class Parser(argparse.ArgumentParser):
    """Every CLI's parser: a mistake is one ``error: ...`` line and exit 2 (no usage dump), a mistyped flag is named
    with the flag meant, and help is Korean first like the README (with each flag's real default)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(formatter_class=HelpFormatter, add_help=False, **kwargs)
        self.add_argument("-h", "--help", action="help", help="이 도움말을 보이고 끝냄 / show this help and exit")

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self.unknown(extras))
        return parsed

    def unknown(self, extras: list[str]) -> str:
        """What is wrong with the arguments argparse could not place: a flag it does not have (and the close one, as
        ``--save-path`` for ``--save_path`` or ``--epochs`` for ``--epoch``), or a value without its flag."""
        typed = next((token.split("=", 1)[0] for token in extras if FLAG.match(token)), None)
        if typed is None:
            return f"unexpected argument {extras[0]}: every value follows its flag (--help lists them)"
        flags = [flag for flag in self._option_string_actions if flag.startswith("--")]
        spelled = "--" + typed.lstrip("-").replace("-", "_")
        close = difflib.get_close_matches(spelled, flags, n=1, cutoff=0.6)
        return f"unknown flag {typed}; " + (f"did you mean {close[0]}?" if close else "--help lists the flags")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")
