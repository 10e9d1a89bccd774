"""A gRPC-free stand-in for Snakepit's Python side, for tests and experiments.

Reads one JSON request per line on stdin, ``{"id": 1, "tool": "name", "args": {...}}``,
calls the tool of the adapter class the way Snakepit does (keyword arguments decoded
from JSON), and writes one JSON line per request: ``{"id": 1, "result": ...}`` or
``{"id": 1, "error": "...", "type": "ExceptionName"}``.

    python3 snakepit_stub.py path/to/snakepit_adapter.py ShmAdapter
"""

import importlib.util
import json
import sys
import traceback


def load(path, class_name):
    spec = importlib.util.spec_from_file_location("adapter_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, class_name)()


def main():
    adapter = load(sys.argv[1], sys.argv[2])
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            function = getattr(adapter, request["tool"])
            result = {"id": request.get("id"), "result": function(**request["args"])}
        except Exception as exc:  # noqa: BLE001 - reported to the caller, as Snakepit does
            result = {"id": request.get("id"), "error": str(exc),
                      "type": type(exc).__name__,
                      "traceback": traceback.format_exc()}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
