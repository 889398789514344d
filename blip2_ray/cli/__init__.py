"""The `blip2-ray` command: one entry point (`[project.scripts]` in pyproject.toml) for every job.

    blip2-ray pretrain --config jobs/configs/stage1_tiny.yaml [--set key=value ...]
    blip2-ray <command> --help

Each command is a module of this package with a `main(argv) -> int` whose docstring's first line is its help;
COMMANDS names them. A new command is one line there. The modules are
imported only when their command runs, so `blip2-ray --help` starts no Ray and loads no model code. jobs/*.py
are the same commands as files, for `ray job submit -- python jobs/pretrain.py ...`.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, str] = {
    "pretrain": "blip2_ray.cli.pretrain",
    "finetune": "blip2_ray.cli.finetune",
    "evaluate": "blip2_ray.cli.evaluate",
    "capfilt": "blip2_ray.cli.capfilt",
    "serve": "blip2_ray.cli.serve",
    "index": "blip2_ray.cli.index",
    "check-data": "blip2_ray.cli.check_data",
    "make-sample-data": "blip2_ray.cli.make_sample_data",
    "pack-finetune-data": "blip2_ray.cli.pack_finetune_data",
}


def summary(module_name: str) -> str:
    """The first line of a command module's docstring."""
    return (importlib.import_module(module_name).__doc__ or "").strip().split("\n")[0]


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: blip2-ray <command> [args ...]  (blip2-ray <command> --help for its arguments)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary(module)}" for name, module in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run `blip2-ray <command> ARGS`: the command's `main(ARGS)`; its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[name]).main(rest)
