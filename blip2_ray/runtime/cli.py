"""The command line every job shares, and how a job's user errors reach the terminal.

`job_parser` gives the common flags: `--config FILE.yaml` (overrides of the config's defaults), any
number of `--set key=value` (the value parsed as YAML), `--address` (see `cluster.init_ray`) and, where
the job prints a result, `--json`; `--progress` (Ray Data's progress bars: auto = only on a terminal).
`run_config_job` is the shape of every config job (parse, validate, check before Ray, start Ray, run);
`cli_main` wraps a job's `main`.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, TypeVar

from blip2_ray.config import load_config
from blip2_ray.errors import UserError
from blip2_ray.runtime.cluster import PROGRESS_CHOICES

T = TypeVar("T")
R = TypeVar("R")

ADDRESS_HELP = "Ray address (default: RAY_ADDRESS, else a new local instance)"


def job_parser(description: str, *, config_help: str | None = None, config_required: bool = True,
               set_help: str = "override one config key (repeatable)", json_help: str | None = None,
               **parser_kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser with the job flags: --config (when `config_help`), --set, --address, and
    --json (when `json_help`). The job adds its own arguments to it."""
    p = argparse.ArgumentParser(description=description, **parser_kwargs)
    if config_help is not None:
        p.add_argument("--config", required=config_required, help=config_help)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.add_argument("--progress", choices=PROGRESS_CHOICES, default="auto",
                   help="Ray Data progress bars: auto (only when the output is a terminal), on, off")
    if json_help is not None:
        p.add_argument("--json", action="store_true", help=json_help)
    return p


def load_job_config(cls: type[T], args: argparse.Namespace) -> T:
    """The validated config of type `cls`: its defaults <- the --config file <- each --set in order."""
    return load_config(cls, args.config, args.set)


def run_config_job(argv: list[str] | None, config_cls: type[T], *, prog: str, description: str,
                   check: Callable[[T], object], run: Callable[[T], R], json_help: str | None = None
                   ) -> tuple[T, argparse.Namespace, R]:
    """Parse the job flags, build the validated `config_cls` config, `check(cfg)` before Ray starts (bad inputs
    are one sentence, not a Ray traceback), start or join Ray (`--address`), `run(cfg)`: (cfg, args, result)."""
    from blip2_ray.runtime.cluster import init_ray

    p = job_parser(description, prog=prog, config_help=f"YAML of overrides of the {config_cls.__name__} defaults",
                   json_help=json_help)
    args = p.parse_args(argv)
    cfg = load_job_config(config_cls, args)
    check(cfg)
    init_ray(args.address, progress=args.progress)
    return cfg, args, run(cfg)


def cli_main(fn: Callable[..., int | None] | None = None, *,
             subcommands: dict[str, Callable[[list[str]], int]] | None = None):
    """Wrap a job's `main(argv)`: a UserError (a ConfigError is one) prints `error: <sentence>` and exits 2.

    `@cli_main(subcommands={name: main})`: when argv starts with one of the names, that main runs on the rest
    instead (`blip2-ray evaluate caption-metrics ...`, `blip2-ray capfilt measure ...`).
    """
    if fn is None:
        return functools.partial(cli_main, subcommands=subcommands)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            if subcommands:  # main(argv): argv (default sys.argv[1:]) may start with a subcommand
                argv = list(sys.argv[1:] if not args or args[0] is None else args[0])
                if argv and argv[0] in subcommands:
                    return subcommands[argv[0]](argv[1:])
                args = (argv, *args[1:])
            rc = fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        return int(rc or 0)

    return wrapper
