"""`aerie` command line: `aerie train ...`, `aerie eval ...` (see `python -m jobs.train --help`, `python -m jobs.eval --help`)."""

from __future__ import annotations

import sys

COMMANDS = {"train": "jobs.train", "eval": "jobs.eval"}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: aerie {{{','.join(COMMANDS)}}} [options]   (aerie <command> --help for the options)")
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    import importlib

    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
