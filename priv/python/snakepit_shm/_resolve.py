"""resolve(): attach every ref inside a tool's arguments for the length of a block."""

import contextlib
import json

from ._attach import attach
from ._locate import is_marker, is_ref, unwrap_marker

__all__ = ["resolve", "to_zero_copy_ref"]


@contextlib.contextmanager
def resolve(args, mode="r", arrays=True):
    """Attach every ref and Snakepit marker in ``args``; yield ``args`` with them replaced.

    ``args`` are a tool's arguments as Snakepit delivers them: dicts and lists nested
    any way, decoded from JSON (a JSON string is decoded first).  Every one of our refs
    (``export_ref/2``) and every Snakepit ``ZeroCopyRef`` marker of kind "shm" becomes a
    zero-copy numpy array (``arrays=True`` and the ref has a dtype, format "numpy") or
    a :class:`Region` (other formats, encrypted regions, ``arrays=False``).  Everything
    else is copied through unchanged.  On exit every region is closed; arrays still
    alive keep their region mapped (see Region's lifetime rules), so returning a
    computed array is safe.  If attaching one ref fails, the ones attached so far are
    released and the error propagates.

        @tool
        def scale(args):
            with snakepit_shm.resolve(args) as a:
                return float((a["x"] * a["factor"]).sum())
    """
    if isinstance(args, (str, bytes)):
        args = json.loads(args)
    with contextlib.ExitStack() as stack:
        yield _walk(args, stack, mode, arrays, set())


def _walk(value, stack, mode, arrays, path):
    if is_marker(value):
        if value.get("kind") != "shm":
            return value  # another kind of zero-copy handle: Snakepit's business
        return _attach_one(unwrap_marker(value), stack, mode, arrays)
    if is_ref(value):
        return _attach_one(value, stack, mode, arrays)
    if isinstance(value, (dict, list, tuple)):
        # Containers on the way down from the root: one seen again is a cycle (JSON
        # cannot make one, but Python arguments can), which would recurse forever.
        if id(value) in path:
            raise ValueError("resolve() got arguments that contain a cycle (a dict or list "
                             "inside itself): pass JSON-like, tree-shaped arguments")
        path.add(id(value))
        try:
            if isinstance(value, dict):
                return {key: _walk(item, stack, mode, arrays, path)
                        for key, item in value.items()}
            return [_walk(item, stack, mode, arrays, path) for item in value]
        finally:
            path.discard(id(value))
    return value


def _attach_one(ref, stack, mode, arrays):
    region = stack.enter_context(attach(ref, mode=mode))
    fmt = ref.get("format") or ("numpy" if ref.get("dtype") else "raw")
    if arrays and fmt == "numpy" and not region.encrypted:
        return region.ndarray()
    return region


def to_zero_copy_ref(ref):
    """Wrap one of our refs (e.g. ``region.ref``) in Snakepit's ZeroCopyRef marker."""
    if is_marker(ref):
        return ref
    if not is_ref(ref):
        raise ValueError("to_zero_copy_ref() takes a ref (a dict with 'v': 1, "
                         "'region_id' and 'backend'), such as Region.ref")
    return {
        "__snakepit_zero_copy__": True,
        "kind": "shm",
        "device": "cpu",
        "dtype": ref.get("dtype"),
        "shape": ref.get("shape"),
        "owner": ref.get("owner", "python"),
        "ref": ref,
        "copy": False,
        "bytes": ref.get("size"),
        "metadata": ref.get("metadata", {}),
    }
