"""What every `python -m diffusion.X` command shares: one parser style, built from the config parts the command
takes, with one-line errors; the flags that say which images to make; and run_cli, which turns a UserError into
one line on stderr and exit code 2 (a traceback only with --debug)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from diffusion.config import PARTS, ModelConfig, check_value, fields_of, flag_name, shown_default
from diffusion.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage wall), like every other error of these commands."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser(command: str, description: str, *parts) -> ArgumentParser:
    """`python -m diffusion.<command>`'s parser: one --flag per field of the config parts it takes (a part, or
    (part, the names of the fields it takes)), grouped, each with its help sentence, choices and default. Flags
    left out stay absent from the parsed result."""
    parser = ArgumentParser(prog=f"python -m diffusion.{command}", description=description,
                            argument_default=argparse.SUPPRESS)
    parser.parts = dict(part if isinstance(part, tuple) else (part, None) for part in parts)
    for part, names in parser.parts.items():
        group = parser.add_argument_group(PARTS[part])
        for _, f in fields_of(part):
            if names is None or f.name in names:
                group.add_argument(*flag_names(f), dest=f.name, **argument_options(f))
    parser.add_argument("--debug", action="store_true", default=False, help="show full tracebacks on errors")
    return parser


def flag_names(f) -> list[str]:
    return [flag_name(f.name)] + ([f.metadata["alias"]] if f.metadata["alias"] else [])


def argument_options(f) -> dict:
    meta = f.metadata
    options = {"help": f"{meta['help']} (default: {shown_default(f)})".replace("%", "%%")}  # argparse formats help with %
    if meta["kind"] is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif meta["kind"] is tuple:
        options.update(nargs="*" if meta["empty"] else "+", type=number(meta["item"]),
                       metavar="X" if meta["item"] is float else "N")
    else:
        options["type"] = number(meta["kind"]) if meta["kind"] in (int, float) else meta["kind"]
    if meta["choices"]:
        options["choices"] = meta["choices"]
    return options


def number(kind: type):
    """An argparse type that reads an int or float and names the flag when it cannot."""
    def read(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
    read.__name__ = kind.__name__
    return read


def parse(parser: ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, dict[type, object]]:
    """(the parsed flags, {part: the part's config built from the flags given}). A flag that belongs to a part
    this command does not take is refused with the reason."""
    args, unknown = parser.parse_known_args(argv)
    for token in unknown:
        name = token.split("=")[0]
        owner = next((part for part, f in fields_of(*PARTS) if name in flag_names(f) or name == "--no-" +
                      flag_name(f.name)[2:]), None)
        if owner is not None:
            why = ("is fixed by training; it comes from the checkpoint" if owner is ModelConfig else
                   f"is a {PARTS[owner].split(' ')[0].rstrip(':')} setting, which {parser.prog} does not use")
            raise UserError(f"{name} {why}")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    given = vars(args)
    configs = {part: part(**{f.name: check_value(f, given[f.name]) for _, f in fields_of(part) if f.name in given})
               for part in parser.parts}
    return args, configs


def add_generation_args(parser: ArgumentParser) -> None:
    """The flags that say which images to make, shared by sampling and evaluate."""
    group = parser.add_argument_group("what to generate")
    group.add_argument("--checkpoint", default=None,
                       help="checkpoint file or exported folder (default: the latest in --ckpt-dir)")
    group.add_argument("--num-images", type=int, default=16,
                       help="images to generate (per row with --all-digits; default: 16)")
    group.add_argument("--digit", type=int, default=None, help="generate this class only (guided towards it)")
    group.add_argument("--all-digits", action="store_true", default=False, help="a grid with one row per class")
    group.add_argument("--unconditional", action="store_true", default=False,
                       help="use the model without labels (default: guided, every class equally often)")
    group.add_argument("--no-ema", action="store_true", default=False, help="use the raw weights instead of their EMA")


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a command's main(); turn UserError into 'error: ...' and exit code 2 unless --debug."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except UserError as err:
        if "--debug" in argv:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
