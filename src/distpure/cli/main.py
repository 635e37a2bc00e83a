"""``distpure`` entry point: one sub-command per job, each a thin layer over the library."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from ..config import from_dict, load_yaml, merge, parse_overrides

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, help_text: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register a sub-command: its help, its arguments and the function that runs it."""
    def decorate(run: Callable[[argparse.Namespace], int | None]):
        COMMANDS[name] = (help_text, arguments, run)
        return run
    return decorate


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with the settings")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override settings, e.g. --set steps=2000 max_minutes=90")


def _load_config(cls, args: argparse.Namespace, **defaults):
    values = load_yaml(args.config) if args.config else {}
    return from_dict(cls, merge(merge(defaults, values), parse_overrides(args.set)))


@command("train-diffusion", "train the small CIFAR-10 DDPM (resumable)", _config_arguments)
def _train_diffusion(args: argparse.Namespace) -> int:
    from ..training.diffusion import DiffusionTrainingConfig, train_diffusion

    config = _load_config(DiffusionTrainingConfig, args)
    print(f"exported EMA model to {train_diffusion(config)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distpure", description=__doc__.splitlines()[0] if __doc__ else None)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, arguments, _) in COMMANDS.items():
        arguments(subparsers.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, _, run = COMMANDS[args.command]
    return int(run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
