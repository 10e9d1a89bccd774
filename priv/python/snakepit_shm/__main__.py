"""Command line: ``python3 -m snakepit_shm info <ref-or-id>``.

Prints the header of a region as JSON without attaching it (no hold is registered).
Exit status: 0 on success, 1 if the region cannot be found or is invalid, 2 on usage
errors.
"""

import argparse
import json
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
    target = sys.stdin.read() if args.target == "-" else args.target
    try:
        description = inspect(target)
    except (errors.SnakepitShmError, ValueError, TypeError) as exc:
        print(f"snakepit_shm: {exc}", file=sys.stderr)
        return 1
    json.dump(description, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
