"""`aerie` command line: `aerie train ...`, `aerie eval ...`, `aerie regenerate ...` (see `python -m jobs.<command> --help`).

Errors reach the user as one line naming the problem and the fix; the traceback goes to a log file (its path is
printed) or, with `--traceback`, to the console.
"""

from __future__ import annotations

import re
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

COMMANDS = {"train": "jobs.train", "eval": "jobs.eval", "regenerate": "jobs.regenerate"}


def error_log_dir() -> Path:
    from actors.models import cache_root

    return cache_root() / "logs"


def run_cli(entry: Callable[[list[str]], object], argv: list[str], prog: str = "aerie") -> None:
    """Run a command's `main(argv)`: exit 0 on success, 130 on Ctrl-C/SIGTERM, 1 with a one-line error otherwise
    (`--traceback`, accepted by every command, prints the traceback instead of writing it to a log file)."""
    show_traceback = "--traceback" in argv
    argv = [a for a in argv if a != "--traceback"]
    try:
        entry(argv)
    except KeyboardInterrupt as err:
        why = f" ({err})" if str(err) else ""
        after = {"train": " An open MLflow run is marked KILLED; run the same command again to resume from the last "
                          "checkpoint.",
                 "regenerate": " The parts written so far are kept; run the same command again to continue."
                 }.get(prog.split()[-1], "")
        print(f"\n[{prog}] interrupted{why}.{after}", file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as err:  # noqa: BLE001 - the CLI boundary: one readable line, the traceback kept
        from jobs.config import ConfigError

        text = "".join(traceback.format_exception(err))
        where = ""
        if isinstance(err, ConfigError):  # the message is the whole story
            pass
        elif show_traceback:
            print(text, file=sys.stderr)
        else:
            try:
                log = error_log_dir() / f"error-{time.strftime('%Y%m%d-%H%M%S')}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text(text)
                where = f"\n[{prog}] traceback: {log} (or re-run with --traceback)"
            except OSError:
                where = f"\n[{prog}] re-run with --traceback for the traceback"
        _flush_ray_logs()  # Ray's forwarded worker logs first, so that this line ends the output
        print(f"[{prog}] error: {one_line(err)}" + where, file=sys.stderr)
        raise SystemExit(1) from None


def one_line(err: BaseException) -> str:
    """The user-facing text of an error. A Ray worker failure carries the worker's whole traceback in its message:
    keep its last line (the worker's own exception). Multi-line messages of our own (several bad config fields)
    keep their lines."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    if "Traceback (most recent call last)" in text:
        causes = [ln.strip() for ln in text.splitlines() if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", ln.strip())]
        head = " ".join(text.splitlines()[0].split())
        return f"{head} {causes[-1]}" if causes else head
    first, *rest = text.split("\n")
    return " ".join(first.split()) + ("\n" + "\n".join(rest) if rest else "")


def _flush_ray_logs() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            try:
                ray.shutdown()
            except Exception:  # noqa: BLE001 - already shutting down
                pass


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: aerie {{{','.join(COMMANDS)}}} [options]   (aerie <command> --help for the options)")
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    import importlib

    run_cli(importlib.import_module(COMMANDS[argv[0]]).main, argv[1:], prog=f"aerie {argv[0]}")


if __name__ == "__main__":
    main()
