"""Command line: ``python3 -m snakepit_shm info <ref-or-id>``.

Prints the header of a region as JSON without attaching it (no hold is registered).
Exit status: 0 on success, 1 if the region cannot be found or is invalid (or the reader of
the output went away), 2 on usage errors, 130 when interrupted (Ctrl-C).
"""

import argparse
import json
import os
import sys

from . import errors, inspect


def main(argv=None):
    """Run the command line; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python3 -m snakepit_shm",
        description="Inspect snakepit_shm regions from a worker's point of view.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser(
        "info", help="print a region's header as JSON (read-only, registers no hold)")
    info.add_argument("target", help="a region id, a ref as JSON, or '-' to read the "
                                     "ref from stdin")
    args = parser.parse_args(argv)
    try:
        if args.target == "-":
            if sys.stdin is None:
                raise ValueError("'-' reads the ref from stdin, but stdin is closed")
            target = sys.stdin.read()
        else:
            target = args.target
        text = json.dumps(inspect(target), indent=2, sort_keys=True) + "\n"
    except (errors.SnakepitShmError, ValueError, TypeError, OSError) as exc:
        print(f"snakepit_shm: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("snakepit_shm: interrupted", file=sys.stderr)
        return 130
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): nothing to report. Point stdout at /dev/null
        # so that the interpreter's last flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
