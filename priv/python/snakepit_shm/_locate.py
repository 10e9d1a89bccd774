"""Turning a ref or a region id into opened, checked file descriptors.

Nothing here trusts its input: region ids are validated against the only two shapes
the manager produces before any path is built from them, /dev/shm paths are opened
with O_NOFOLLOW, every object must be a regular file of our own uid, and memfds must
carry the name of the region they claim to belong to.
"""

import base64
import binascii
import dataclasses
import errno
import json
import os
import re
import reprlib
import stat

from . import errors
from . import _format
from . import _proc

SHM_DIR = "/dev/shm"
# The VM's config :snakepit_shm, shm_path (POSIX segments moved to another tmpfs):
# workers that attach by bare region id need it; refs carry full paths anyway.
SHM_PATH_ENV = "SNAKEPIT_SHM_PATH"
NAMED_PREFIX = "spshm_n_"
_RANDOM_ID = re.compile(r"spshm_[a-z2-7]{20}")
_NAMED_ID = re.compile(r"spshm_n_[a-z0-9_-]{1,21}")
_PROC_FD_PATH = re.compile(r"/proc/[1-9][0-9]*/fd/[0-9]+")
_INDEX_NUMBER = re.compile(r"[0-9]{1,20}")
_ARENA_TARGET = re.compile(r"/memfd:spshm_arena_[a-z2-7]{20} \(deleted\)")
_BACKENDS = {"posix": _format.BACKEND_POSIX, "memfd": _format.BACKEND_MEMFD}


@dataclasses.dataclass
class Location:
    """Where a region lives, and what the ref (if any) said about it."""

    region_id: str
    backend: int
    control_path: str
    data_path: str
    from_ref: bool = False
    data_offset: int = None
    size: int = None
    dtype: str = None
    shape: tuple = None
    key: bytes = None
    control_offset: int = None  # an arena region: its control block's offset


class OpenDenied(errors.PermissionError):
    """The OS refused to open an object with the requested access (EACCES/EPERM)."""


def shm_dir():
    """The directory of POSIX segments: $SNAKEPIT_SHM_PATH, else /dev/shm."""
    value = os.environ.get(SHM_PATH_ENV)
    if not value:
        return SHM_DIR
    if not os.path.isabs(value) or "\0" in value:
        raise ValueError(
            f"{SHM_PATH_ENV}={_shown(value)} is not an absolute directory path: set it to the "
            "VM's config :snakepit_shm, shm_path (for example /run/snakepit_shm)")
    return os.path.normpath(value)


def _segment_path_ok(path, region_id):
    """True for an absolute, normalised path whose last component is the region id."""
    return (os.path.isabs(path) and os.path.normpath(path) == path
            and os.path.basename(path) == region_id)


def valid_region_id(text):
    """Return True if ``text`` has the shape of one of our region ids."""
    return bool(_RANDOM_ID.fullmatch(text) or _NAMED_ID.fullmatch(text))


def _shown(value, limit=80):
    """``repr(value)`` cut to about ``limit`` characters: values from a ref or a command
    line go into error messages, and a ref may be any size."""
    text = reprlib.repr(value) if not isinstance(value, str) else repr(value[:limit + 1])
    return text if len(text) <= limit + 2 else text[:limit] + "..."


def validate_region_id(region_id):
    """Return ``region_id`` if it has the shape of one of our ids, else raise ValueError."""
    if not isinstance(region_id, str):
        raise TypeError(f"a region id must be a str, got {type(region_id).__name__}")
    if valid_region_id(region_id):
        return region_id
    raise ValueError(
        f"{_shown(region_id)} is not a snakepit_shm region id: expected 'spshm_' followed by "
        "20 characters of [a-z2-7], or 'spshm_n_' followed by 1-21 characters of "
        "[a-z0-9_-]. Pass the id or the ref returned by the Elixir side unchanged.")


def parse_target(target):
    """Return a :class:`Location` for a ref (dict or JSON string) or a region id."""
    if isinstance(target, bytes):
        target = target.decode("utf-8", "replace")
    if isinstance(target, str):
        text = target.strip()
        if text.startswith("{"):
            try:
                target = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"the ref is not valid JSON: {exc}") from None
        else:
            return find_by_id(validate_region_id(text))
    if isinstance(target, dict):
        return _parse_ref(unwrap_marker(target))
    raise TypeError(
        "attach() takes a region id (str), a ref (dict, as returned by Elixir's "
        f"export_ref/2) or that ref as a JSON string; got {type(target).__name__}")


MARKER = "__snakepit_zero_copy__"


def is_marker(value):
    """True for a Snakepit ZeroCopyRef wire marker (any kind)."""
    return isinstance(value, dict) and value.get(MARKER) is True


def is_ref(value):
    """True for one of our refs (export_ref/2 or a worker output)."""
    return (isinstance(value, dict) and value.get("v") == 1
            and isinstance(value.get("region_id"), str) and "backend" in value)


def unwrap_marker(value):
    """Return our ref from a Snakepit marker of kind "shm"; other dicts unchanged."""
    if not is_marker(value):
        return value
    kind = value.get("kind")
    if kind != "shm":
        raise ValueError(f"a Snakepit zero-copy marker of kind {_shown(kind)} carries no shared "
                         "memory region: only kind 'shm' can be attached here")
    ref = value.get("ref")
    if isinstance(ref, str):
        try:
            ref = json.loads(ref)
        except ValueError as exc:
            raise ValueError(f"the marker's ref is not valid JSON: {exc}") from None
    if not isinstance(ref, dict):
        raise ValueError("the Snakepit marker has no 'ref' object: build it with "
                         "Snakepit.SharedMemory.to_zero_copy_ref/1")
    return ref


def _ref_field(ref, name, kinds, required=True):
    value = ref.get(name)
    if value is None:
        if required:
            raise ValueError(f"the ref has no {name!r}: pass the map returned by "
                             "Snakepit.SharedMemory.export_ref/2 unchanged")
        return None
    # bool is an int subclass: never accept it where a number is expected.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ValueError(f"the ref's {name!r} has the wrong type: {_shown(value)}")
    return value


def _parse_ref(ref):
    if "v" not in ref or "region_id" not in ref:
        raise ValueError("not a snakepit_shm ref (no \"v\" or \"region_id\"): pass the map "
                         "Elixir's export_ref/2 returns (or its JSON), or a region id")
    version = ref.get("v")
    if version != 1:
        raise ValueError(f"unsupported ref version {_shown(version)}: this client reads "
                         "refs with \"v\": 1; upgrade the Python package")
    region_id = validate_region_id(_ref_field(ref, "region_id", (str,)))
    _check_host(ref, region_id)
    backend_name = _ref_field(ref, "backend", (str,))
    if backend_name not in _BACKENDS:
        raise ValueError(f"the ref's backend {_shown(backend_name)} cannot be attached here: "
                         "this client supports 'posix' and 'memfd' (Linux)")
    backend = _BACKENDS[backend_name]
    if backend == _format.BACKEND_POSIX:
        # The VM may keep segments in another tmpfs (shm_path): the ref's path says
        # where; it must still name this region's segment (and is opened O_NOFOLLOW).
        path = None
        for name in ("control_path", "data_path"):
            given = _ref_field(ref, name, (str,), required=False)
            if given is None:
                continue
            if not _segment_path_ok(given, region_id) or (path is not None and given != path):
                raise ValueError(f"the ref's {name} {_shown(given)} is not the POSIX segment "
                                 f"of {region_id} (expected <shm directory>/{region_id})")
            path = given
        if path is None:
            path = os.path.join(shm_dir(), region_id)
        control_path = data_path = path
    else:
        control_path = _ref_field(ref, "control_path", (str,))
        data_path = _ref_field(ref, "data_path", (str,))
        for name, path in (("control_path", control_path), ("data_path", data_path)):
            if not _PROC_FD_PATH.fullmatch(path):
                raise ValueError(f"the ref's {name} {_shown(path)} is not a /proc/<pid>/fd/<n> "
                                 "path of a memfd region")
    data_offset = _ref_field(ref, "data_offset", (int,), required=False)
    control_offset = _ref_field(ref, "control_offset", (int,), required=False)
    if control_offset is not None:
        if backend != _format.BACKEND_MEMFD or control_path != data_path or \
                control_offset < 0 or control_offset % _format.HEADER_SIZE:
            raise ValueError(f"the ref's control_offset {_shown(control_offset)} does not name "
                             "a chunk of an arena (a positive multiple of 4096 of a memfd "
                             "whose control_path and data_path are the same)")
    size = _ref_field(ref, "size", (int,), required=False)
    dtype = _ref_field(ref, "dtype", (str,), required=False)
    shape = _ref_field(ref, "shape", (list, tuple), required=False)
    if shape is not None and not all(isinstance(d, int) and not isinstance(d, bool)
                                     and d >= 0 for d in shape):
        raise ValueError(f"the ref's shape {_shown(shape)} must be a list of non-negative ints")
    return Location(region_id, backend, control_path, data_path, from_ref=True,
                    data_offset=data_offset, size=size, dtype=dtype,
                    shape=tuple(shape) if shape is not None else None,
                    key=_decode_key(ref.get("key")), control_offset=control_offset)


BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
_HEX32 = re.compile(r"[0-9a-f]{32}")


def host_boot_id():
    """Return this host's boot id as 32 lowercase hex digits (as refs carry it), or None."""
    boot = _proc.boot_id()
    if boot is None or len(boot) != 16:
        return None
    return boot.hex()


def _check_host(ref, region_id):
    """Refuse a ref made on another host (or another boot of this one).

    Refs from export_ref/2 carry ``boot_id``; older refs without it are accepted as
    before. Checked before anything is opened, so a region of the same name on this
    host is never mapped in its place.
    """
    boot_id = _ref_field(ref, "boot_id", (str,), required=False)
    if boot_id is None:
        return
    if not _HEX32.fullmatch(boot_id):
        raise ValueError(f"the ref's boot_id {_shown(boot_id)} is not 32 hex digits: pass the "
                         "map returned by Snakepit.SharedMemory.export_ref/2 unchanged")
    here = host_boot_id()
    if here is not None and here != boot_id:
        node = ref.get("node")
        where = f" on node {node}" if isinstance(node, str) else ""
        raise errors.ForeignHostRegion(
            f"region {region_id} lives on another host{where} (its ref's boot_id is "
            f"{boot_id}, this host's is {here}): shared memory does not cross hosts. "
            "Fetch it to a node on this host first, with "
            "Snakepit.SharedMemory.fetch(ref) there, and attach the ref of the copy.")


def _decode_key(value):
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("the ref's key must be a base64 string")
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the ref's key is not valid base64") from None
    if len(key) != _format.KEY_SIZE:
        raise ValueError(f"the ref's key has {len(key)} bytes, expected "
                         f"{_format.KEY_SIZE}")
    return key


def arena_link_target(path, region_id):
    """The /proc link target of the arena memfd that ``path`` names (checked)."""
    try:
        target = os.readlink(path)
    except OSError as exc:
        raise _open_error(path, region_id, False, exc) from None
    if not _ARENA_TARGET.fullmatch(target):
        raise _reused_fd(path, region_id, target, "/memfd:spshm_arena_<id> (deleted)")
    return target


def memfd_link_targets(region_id):
    """Return the /proc/<pid>/fd link targets of the control and data memfds."""
    return (f"/memfd:{region_id} (deleted)", f"/memfd:{region_id}.data (deleted)")


# The runtime index (c_src/core/runtime_index.hpp): the VM lists each memfd region in a
# per-user 0700 directory, one symlink per region id whose text is
# "spshm1 <kind> <control path> <data path> <offset> <size>".
RUNTIME_DIR_ENV = "SNAKEPIT_SHM_RUNTIME_DIR"
_PIDNS_LINK = re.compile(r"pid:\[([0-9]{1,20})\]")
_pidns_cache = (None, None)  # (pid, namespace_dir_name()) of the process that asked
INDEX_VERSION = "spshm1"


def runtime_dir(euid=None):
    """The base directory of the runtime index, as the VM computes it (it may not
    exist): $SNAKEPIT_SHM_RUNTIME_DIR, else $XDG_RUNTIME_DIR/snakepit_shm, else
    /dev/shm/snakepit_shm-<euid>. The entries are in its subdirectory of this PID
    namespace (index_dir()). ``euid``: os.geteuid() if the caller just asked."""
    own = os.environ.get(RUNTIME_DIR_ENV)
    if own and own.startswith("/"):
        return own
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and xdg.startswith("/"):
        return xdg + "/snakepit_shm"
    return f"/dev/shm/snakepit_shm-{os.geteuid() if euid is None else euid}"


def namespace_dir_name(link_text=None):
    """The subdirectory of runtime_dir() holding the entries of this PID namespace:
    "pidns-<inode>" from the link "pid:[<inode>]" of /proc/self/ns/pid (the core's
    runtime_index::namespace_dir_name: entries name /proc/<pid>/fd paths, which mean
    something only in their VM's PID namespace). None if it cannot be named."""
    global _pidns_cache
    if link_text is None:
        pid = _proc.pid()
        if _pidns_cache[0] == pid:  # a process never changes PID namespace
            return _pidns_cache[1]
        try:
            name = namespace_dir_name(os.readlink("/proc/self/ns/pid"))
        except OSError:
            name = None
        _pidns_cache = (pid, name)
        return name
    match = _PIDNS_LINK.fullmatch(link_text)
    return f"pidns-{match.group(1)}" if match else None


def index_dir(euid=None):
    """The directory holding this PID namespace's entries (it may not exist), or None."""
    name = namespace_dir_name()
    return None if name is None else f"{runtime_dir(euid)}/{name}"


def _ours_0700(path, euid):
    info = os.lstat(path)
    return stat.S_ISDIR(info.st_mode) and info.st_uid == euid \
        and not info.st_mode & 0o077


def index_entry(region_id):
    """Return (kind, control_path, data_path, offset, size) of ``region_id``'s entry in
    the runtime index, or None: no directory, a directory that is not ours or not 0700
    (nothing in it is trusted), no entry, or an entry that is not one of ours.

    An entry only says where to look: the caller still checks the memfd's name and the
    header's region id after opening.
    """
    euid = os.geteuid()  # once (a system call), not once per directory
    directory = index_dir(euid)
    if directory is None:
        return None
    try:
        if not (_ours_0700(runtime_dir(euid), euid) and _ours_0700(directory, euid)):
            return None
        text = os.readlink(f"{directory}/{region_id}")
    except (OSError, ValueError):
        return None
    fields = text.split(" ")
    if len(fields) != 6 or fields[0] != INDEX_VERSION:
        return None
    _, kind, control, data, offset, size = fields
    # [0-9], not str.isdigit(): a forged entry's "²" passes isdigit() and fails int()
    if not (_PROC_FD_PATH.fullmatch(control) and _PROC_FD_PATH.fullmatch(data)
            and _INDEX_NUMBER.fullmatch(offset) and _INDEX_NUMBER.fullmatch(size)):
        return None
    return kind, control, data, int(offset), int(size)


def _indexed(region_id):
    """The Location of a memfd region found through the runtime index, or None."""
    entry = index_entry(region_id)
    if entry is None:
        return None
    if entry[0] == "arena":
        return _indexed_in_arena(region_id, entry[1], entry[2], entry[3])
    if entry[0] != "memfd":
        return None  # kinds this client does not read fall back to the scan
    _, control, data, _, _ = entry
    try:
        # A stale entry (its VM died or freed the region unannounced) names a
        # descriptor that is gone or now something else: then scan.
        if os.readlink(control) != memfd_link_targets(region_id)[0]:
            return None
    except OSError:
        return None
    return Location(region_id, _format.BACKEND_MEMFD, control, data)


def index_hint(target):
    """For a bare region id listed in the runtime index: a Location built from its
    entry (kind ``memfd`` or ``arena``), NOT verified: the caller's fast open checks
    what the entry says while opening (the memfd links before and after the open, the
    owner; for an arena, that the chunk holds this id) and uses the hint only then.
    None for anything else: refs, malformed ids, no entry, another kind."""
    if not isinstance(target, str):
        return None
    region_id = target.strip()
    if not _RANDOM_ID.fullmatch(region_id):
        return None  # named regions are POSIX segments: never in the index
    entry = index_entry(region_id)
    if entry is None:
        return None
    kind, control, data, offset, _ = entry
    if kind == "memfd":
        return Location(region_id, _format.BACKEND_MEMFD, control, data)
    if kind != "arena" or control != data or offset % _format.HEADER_SIZE \
            or offset >= 1 << 63:
        return None  # (ctypes would silently wrap a larger offset)
    return Location(region_id, _format.BACKEND_MEMFD, control, control,
                    control_offset=offset)


def arena_hint(target):
    """For a bare region id whose runtime index entry is of kind ``arena``: a Location
    built from the entry, NOT verified (the caller's fast open checks the arena link,
    the owner and that the chunk holds this id, and uses the hint only then). None for
    anything else: refs, malformed ids, no entry, another kind."""
    if not isinstance(target, str):
        return None
    region_id = target.strip()
    if not valid_region_id(region_id):
        return None
    entry = index_entry(region_id)
    if entry is None or entry[0] != "arena":
        return None
    _, control, data, offset, _ = entry
    if control != data or offset % _format.HEADER_SIZE or offset >= 1 << 63:
        return None  # (ctypes would silently wrap a larger offset)
    return Location(region_id, _format.BACKEND_MEMFD, control, control,
                    control_offset=offset)


def _indexed_in_arena(region_id, control, data, offset):
    """The Location of an arena region named by an index entry, or None.

    The entry is believed only as far as it is checked: the path names an arena memfd
    (before and after the open), a regular file of our uid, and the control block at
    the offset is a published header of this very region, not deallocated. A stale
    entry (the region was freed, its chunk reused, its VM died) or a forged one fails
    one of these and the caller scans. The attach then validates the header in full.
    """
    if control != data or offset % _format.HEADER_SIZE:
        return None
    try:
        if not _ARENA_TARGET.fullmatch(os.readlink(control)):
            return None
        fd = os.open(control, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() \
                or offset + _format.HEADER_SIZE > info.st_size \
                or not _ARENA_TARGET.fullmatch(os.readlink(f"/proc/self/fd/{fd}")):
            return None
        state_at = _format.FIELD["state"][0]
        raw = os.pread(fd, state_at + 4, offset)
    except OSError:
        return None
    finally:
        os.close(fd)
    id_at, id_len = _format.FIELD["region_id"][0], _format.FIELD["region_id"][1]
    if len(raw) != state_at + 4 or raw[:8] != _format.MAGIC \
            or raw[id_at:id_at + id_len].rstrip(b"\0") != region_id.encode() \
            or int.from_bytes(raw[state_at:], "little") & _format.STATE_DEALLOCATED:
        return None
    return Location(region_id, _format.BACKEND_MEMFD, control, control,
                    control_offset=offset)


def find_by_id(region_id):
    """Locate a region by id: the shm directory first ($SNAKEPIT_SHM_PATH, else
    /dev/shm), then the runtime index of memfd regions, then memfds in /proc/*/fd of
    our uid (where the index is missing or stale)."""
    path = os.path.join(shm_dir(), region_id)
    if os.path.lexists(path):
        return Location(region_id, _format.BACKEND_POSIX, path, path)
    indexed = _indexed(region_id)
    if indexed is not None:
        return indexed
    control_target, data_target = memfd_link_targets(region_id)
    uid = os.geteuid()
    arenas = []
    for pid in _pids_of_uid(uid):
        fd_dir = f"/proc/{pid}/fd"
        control = data = None
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue  # the process exited, or its fds are not ours to see
        seen = {}
        for name in names:
            try:
                target = os.readlink(f"{fd_dir}/{name}")
            except OSError:
                continue
            seen[target] = f"{fd_dir}/{name}"
            if target == control_target:
                control = f"{fd_dir}/{name}"
            elif target == data_target:
                data = f"{fd_dir}/{name}"
            elif _ARENA_TARGET.fullmatch(target):
                arenas.append((f"{fd_dir}/{name}", target))
            if control and data:
                return Location(region_id, _format.BACKEND_MEMFD, control, data)
        if control:
            # A data memfd reused from the creator's warm pool keeps its first name:
            # the control header's data_name says which it is.
            data = seen.get(_pooled_data_target(control))
            if data:
                return Location(region_id, _format.BACKEND_MEMFD, control, data)
    walked = set()
    for arena_path, target in arenas:
        if target in walked:  # the same arena through another descriptor
            continue
        walked.add(target)
        offset = _find_in_arena(arena_path, region_id)
        if offset is not None:
            return Location(region_id, _format.BACKEND_MEMFD, arena_path, arena_path,
                            control_offset=offset)
    raise errors.RegionNotFound(
        f"region {region_id} does not exist: there is no {path}, and no process of uid "
        f"{uid} has its memfds open. It was deallocated, its owner exited, or it lives "
        "in another container or under another user; check the id, or pass the full ref "
        "from export_ref/2.")


def _find_in_arena(path, region_id):
    """The control_offset of ``region_id`` in the arena at ``path``, or None.

    Walks the arena's chunks from its start: a published control block names its
    region and its data capacity (the next chunk follows it); anything else is skipped
    a page at a time. Reads with pread (never maps: untouched pages stay unallocated).
    The attach that follows validates what it finds, as for any other ref.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        wanted = region_id.encode()
        id_at, id_len = _format.FIELD["region_id"][0], _format.FIELD["region_id"][1]
        cap_at = _format.FIELD["data_capacity"][0]
        offset = 0
        while offset + _format.HEADER_SIZE <= size:
            prefix = os.pread(fd, id_at + id_len, offset)
            step = _format.HEADER_SIZE
            if prefix[:8] == _format.MAGIC:
                if prefix[id_at:id_at + id_len].rstrip(b"\0") == wanted:
                    return offset
                capacity = int.from_bytes(prefix[cap_at:cap_at + 8], "little")
                if 0 < capacity <= size:
                    step += -(-capacity // _format.HEADER_SIZE) * _format.HEADER_SIZE
            offset += step
        return None
    except OSError:
        return None
    finally:
        os.close(fd)


def _pooled_data_target(control_path):
    """The link target of the data memfd named by the header's data_name, or None."""
    from . import _header  # _header imports this module
    try:
        fd = os.open(control_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        raw = os.pread(fd, _format.HEADER_SIZE, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    name = _header.data_name(raw) if len(raw) == _format.HEADER_SIZE else None
    return f"/memfd:{name} (deleted)" if name else None


def _pids_of_uid(uid):
    own = _proc.pid()
    pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    # Our own fds last: a worker usually finds the memfds in the VM that exported them.
    pids.sort(key=lambda pid: pid == own)
    for pid in pids:
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                yield pid
        except OSError:
            continue


def open_object(path, region_id, writable, *, memfd_target=None):
    """Open one object of a region and check it is a regular file of our uid.

    ``memfd_target`` is the /proc link target the object must have (memfd backend);
    /dev/shm paths are opened without following symlinks.  Returns (fd, size).
    """
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
    if memfd_target is None:
        flags |= os.O_NOFOLLOW
    else:
        _check_memfd_link(path, region_id, memfd_target)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _open_error(path, region_id, writable, exc) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise errors.CorruptRegion(
                f"{path} is not a snakepit_shm segment (not a regular file); refusing "
                f"to map it. Something else took the name of {region_id}.")
        if info.st_uid != os.geteuid():
            raise errors.PermissionError(
                f"{path} belongs to uid {info.st_uid}, not to this process's uid "
                f"{os.geteuid()}; snakepit_shm only attaches segments of its own user. "
                "Run the worker as the same user as the Elixir VM.")
        if memfd_target is not None:
            # Checked again on the opened file: the descriptor may have been closed
            # and reused between the readlink above and the open.
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target != memfd_target:
                raise _reused_fd(path, region_id, target, memfd_target)
        return fd, info.st_size
    except BaseException:
        os.close(fd)
        raise


def _open_error(path, region_id, writable, exc):
    if exc.errno == errno.ENOENT:
        return errors.RegionNotFound(
            f"region {region_id} does not exist ({path}: no such file). It was "
            "deallocated or its owner exited; ask the Elixir side for a fresh ref.")
    if exc.errno == errno.ELOOP:
        return errors.CorruptRegion(
            f"{path} is a symbolic link, not a snakepit_shm segment; refusing to follow "
            "it. Remove it (it is not ours) or check who created it.")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return OpenDenied(
            f"cannot open {path} {'for writing' if writable else 'for reading'}: "
            f"{exc.strerror}. Check that the worker runs as the VM's user.")
    return errors.SnakepitShmError(f"cannot open {path}: {exc.strerror}")


def _check_memfd_link(path, region_id, memfd_target):
    """Refuse a /proc/<pid>/fd/<n> path that no longer names the region's memfd.

    Once the owner closed the memfd (the region was deallocated) its descriptor
    number is free and the process may reuse it for anything: a socket, a pipe,
    another file.  Looking at the link first means we never even open such a thing.
    """
    try:
        target = os.readlink(path)
    except OSError as exc:
        raise _open_error(path, region_id, False, exc) from None
    if target != memfd_target:
        raise _reused_fd(path, region_id, target, memfd_target)


def _reused_fd(path, region_id, target, memfd_target):
    return errors.RegionNotFound(
        f"region {region_id} no longer exists: {path} is now {target!r}, not its memfd "
        f"{memfd_target!r}. The owner closed the region (deallocated, or the owner "
        "exited) and its descriptor number was reused; ask the Elixir side for a fresh "
        "region and ref.")
