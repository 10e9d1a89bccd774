"""Builds snakepit_shm segments from Python, for tests that cannot wait for Elixir.

Headers are written from the layout constants of ``snakepit_shm._format`` exactly as
``c_src/core/format.cpp`` writes them (CRC over the published magic), so a forged
segment is indistinguishable from a real one.  Encrypted data is produced with
libsodium directly, following the chunk layout documented in ``c_src/core/crypto.hpp``
(nonce || ciphertext || tag, AAD = region_id[32] || u64le(index) || u64le(data_size)):
the decryption tests therefore also check the core against that description.

Every object created here is registered with a :class:`Forge`, which removes them all
in ``cleanup()``.
"""

import ctypes
import ctypes.util
import json
import os
import secrets
import struct
import time
import zlib

from snakepit_shm import _format as F
from snakepit_shm import _locate

BASE32 = "abcdefghijklmnopqrstuvwxyz234567"

# Every region id the tests created, and every process that created regions for them:
# the session's leftover check (conftest.py) looks for exactly these in /dev/shm.
CREATED_IDS = set()
CREATOR_PIDS = {os.getpid()}
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004
F_SEAL_WRITE = 0x0008
F_SEAL_FUTURE_WRITE = 0x0010
F_ADD_SEALS = 1033


def random_region_id():
    """Return a fresh random id: "spshm_" + 20 base32 characters."""
    return "spshm_" + "".join(secrets.choice(BASE32) for _ in range(20))


def start_time(pid):
    """Field 22 of /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        content = stat.read()
    return int(content[content.rindex(b")") + 2:].split()[19])


def boot_id():
    """This boot's id as 16 bytes (from the client's one boot-id parser)."""
    return bytes.fromhex(_locate.host_boot_id())


def build_header(region_id, backend, size, *, metadata=None, encrypted=False,
                 idle_timeout_ns=0, security_level=0):
    """Return a valid, published 4096-byte header as a bytearray."""
    meta = b"" if metadata is None else json.dumps(metadata).encode()
    assert len(meta) <= F.METADATA_CAPACITY
    flags = 0
    if encrypted:
        flags |= F.FLAG_ENCRYPTED
    if region_id.startswith("spshm_n_"):
        flags |= F.FLAG_NAMED
    if backend == F.BACKEND_MEMFD:
        flags |= F.FLAG_SPLIT_DATA
    now = time.time_ns()
    pid = os.getpid()
    fields = {
        "magic": F.MAGIC, "format_version": F.FORMAT_VERSION,
        "header_size": F.HEADER_SIZE, "data_size": size,
        "data_capacity": F.encrypted_capacity(size) if encrypted else size,
        "data_offset": 0 if backend == F.BACKEND_MEMFD else F.HEADER_SIZE,
        "backend": backend, "flags": flags, "creator_pid": pid,
        "security_level": security_level, "creator_start_time": start_time(pid),
        "boot_id": boot_id(), "created_at_ns": now,
        "cipher": F.CIPHER_XCHACHA20POLY1305_CHUNKS if encrypted else F.CIPHER_NONE,
        "chunk_size": F.CHUNK_SIZE if encrypted else 0,
        "region_id": region_id.encode(), "metadata_length": len(meta),
        "header_crc32": 0,
    }
    header = bytearray(F.HEADER_SIZE)
    header[:F.FIELD["data_name"][0]] = F.pack_immutable(fields)
    header[F.METADATA_OFFSET:F.METADATA_OFFSET + len(meta)] = meta
    header[2048:2080] = F.pack_mutable({
        "state": 0, "refcount": 0, "last_access_ns": now,
        "idle_timeout_ns": idle_timeout_ns, "holder_capacity": F.HOLDER_CAPACITY,
        "holders_generation": 0})
    recrc(header)
    return header


def recrc(header):
    """Recompute the CRC of a (possibly edited) header in place."""
    length = min(struct.unpack_from("<I", header, 128)[0], F.METADATA_CAPACITY)
    crc = zlib.crc32(bytes(header[:F.CRC_COVERED_PREFIX]))
    crc = zlib.crc32(bytes(header[F.METADATA_OFFSET:F.METADATA_OFFSET + length]), crc)
    struct.pack_into("<I", header, F.CRC_COVERED_PREFIX, crc)


class _Sodium:
    """The two libsodium calls the forge needs (libsodium23 is a project dependency)."""

    def __init__(self):
        path = ctypes.util.find_library("sodium") or "libsodium.so.23"
        self.dll = ctypes.CDLL(path)
        if self.dll.sodium_init() < 0:
            raise RuntimeError("sodium_init failed")
        self.encrypt_fn = self.dll.crypto_aead_xchacha20poly1305_ietf_encrypt
        self.encrypt_fn.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_ulonglong),
                                    ctypes.c_char_p, ctypes.c_ulonglong,
                                    ctypes.c_char_p, ctypes.c_ulonglong, ctypes.c_void_p,
                                    ctypes.c_char_p, ctypes.c_char_p]

    def seal(self, plaintext, aad, nonce, key):
        out = ctypes.create_string_buffer(len(plaintext) + F.TAG_SIZE)
        out_len = ctypes.c_ulonglong()
        if self.encrypt_fn(out, ctypes.byref(out_len), plaintext, len(plaintext), aad,
                           len(aad), None, nonce, key) != 0:
            raise RuntimeError("crypto_aead_xchacha20poly1305_ietf_encrypt failed")
        return out.raw[:out_len.value]


_sodium = None


def encrypt_chunks(region_id, plaintext, key):
    """Return the encrypted data area for ``plaintext`` (the documented layout)."""
    global _sodium
    if _sodium is None:
        _sodium = _Sodium()
    rid = region_id.encode().ljust(F.REGION_ID_CAPACITY, b"\0")
    out = bytearray()
    for index, start in enumerate(range(0, len(plaintext), F.CHUNK_SIZE)):
        chunk = plaintext[start:start + F.CHUNK_SIZE]
        nonce = secrets.token_bytes(F.NONCE_SIZE)
        aad = rid + struct.pack("<QQ", index, len(plaintext))
        out += nonce + _sodium.seal(chunk, aad, nonce, key)
    assert len(out) == F.encrypted_capacity(len(plaintext))
    return bytes(out)


class Segment:
    """One forged region: its id, objects and the ref Elixir would export for it."""

    def __init__(self, region_id, backend, size, header, data_area, key=None,
                 control_path=None, data_path=None, fds=()):
        """Internal: use Forge.posix() or Forge.memfd()."""
        self.region_id = region_id
        self.backend = backend
        self.size = size
        self.header = header  # bytearray: the header as written
        self.data_area = data_area
        self.key = key
        self.control_path = control_path
        self.data_path = data_path
        self.fds = list(fds)

    def ref(self, **overrides):
        """The ref export_ref/2 would produce (as a dict)."""
        import base64
        ref = {
            "v": 1, "region_id": self.region_id,
            "backend": F.BACKEND_NAMES[self.backend],
            "control_path": self.control_path, "data_path": self.data_path,
            "data_offset": 0 if self.backend == F.BACKEND_MEMFD else F.HEADER_SIZE,
            "size": self.size, "sealed": False,
            "encrypted": self.key is not None, "metadata": {},
        }
        if self.key is not None:
            ref["key"] = base64.b64encode(self.key).decode()
        ref.update(overrides)
        return {k: v for k, v in ref.items() if v is not None}

    def read_header(self):
        """Return the current 4096 header bytes."""
        with open(self.control_path, "rb") as f:
            return f.read(F.HEADER_SIZE)

    def patch(self, offset, data, *, fix_crc=False):
        """Overwrite header bytes at ``offset`` (and recompute the CRC if asked)."""
        header = bytearray(self.read_header())
        header[offset:offset + len(data)] = data
        if fix_crc:
            recrc(header)
        self.write_header(header)

    def write_header(self, header):
        """Replace the header bytes."""
        fd = os.open(self.control_path, os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(header), 0)
        finally:
            os.close(fd)

    def set_u32(self, field, value):
        """Set a 4-byte mutable field (state, refcount ...)."""
        self.patch(F.FIELD[field][0], struct.pack("<I", value))

    def set_u64(self, field, value):
        """Set an 8-byte mutable field (last_access_ns, idle_timeout_ns)."""
        self.patch(F.FIELD[field][0], struct.pack("<Q", value))

    def u32(self, field):
        """Read a 4-byte field."""
        return struct.unpack_from("<I", self.read_header(), F.FIELD[field][0])[0]

    def read_data(self):
        """Return the raw data area (ciphertext if encrypted)."""
        capacity = len(self.data_area)
        with open(self.data_path, "rb") as f:
            f.seek(0 if self.backend == F.BACKEND_MEMFD else F.HEADER_SIZE)
            return f.read(capacity)

    def write_data(self, offset, data):
        """Overwrite raw bytes of the data area."""
        base = 0 if self.backend == F.BACKEND_MEMFD else F.HEADER_SIZE
        fd = os.open(self.data_path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, base + offset)
        finally:
            os.close(fd)


class Forge:
    """Creates segments and removes every one of them in cleanup()."""

    def __init__(self):
        """Start with nothing to clean."""
        self.paths = []
        self.fds = []

    def posix(self, size=4096, *, data=None, metadata=None, key=None, region_id=None,
              mode=0o600, idle_timeout_ns=0):
        """Create /dev/shm/<id> (O_EXCL) with a valid header and ``data``."""
        region_id = region_id or random_region_id()
        path = os.path.join("/dev/shm", region_id)
        plaintext, area = self._data(region_id, size, data, key)
        header = build_header(region_id, F.BACKEND_POSIX, size, metadata=metadata,
                              encrypted=key is not None, idle_timeout_ns=idle_timeout_ns)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        self.paths.append(path)
        CREATED_IDS.add(region_id)
        try:
            os.ftruncate(fd, F.HEADER_SIZE + len(area))
            os.pwrite(fd, bytes(header), 0)
            os.pwrite(fd, area, F.HEADER_SIZE)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        return Segment(region_id, F.BACKEND_POSIX, size, header, area, key, path, path)

    def memfd(self, size=4096, *, data=None, metadata=None, key=None, region_id=None,
              seal_data=False, idle_timeout_ns=0, names=None):
        """Create the two memfds of a memfd region in this process."""
        region_id = region_id or random_region_id()
        plaintext, area = self._data(region_id, size, data, key)
        header = build_header(region_id, F.BACKEND_MEMFD, size, metadata=metadata,
                              encrypted=key is not None, idle_timeout_ns=idle_timeout_ns)
        control_name, data_name = names or (region_id, region_id + ".data")
        control = os.memfd_create(control_name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.fds.append(control)
        data_fd = os.memfd_create(data_name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.fds.append(data_fd)
        os.ftruncate(control, F.HEADER_SIZE)
        os.pwrite(control, bytes(header), 0)
        os.ftruncate(data_fd, len(area))
        os.pwrite(data_fd, area, 0)
        import fcntl
        for fd in (control, data_fd):
            fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)
        if seal_data:
            fcntl.fcntl(data_fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
        pid = os.getpid()
        return Segment(region_id, F.BACKEND_MEMFD, size, header, area, key,
                       f"/proc/{pid}/fd/{control}", f"/proc/{pid}/fd/{data_fd}",
                       fds=(control, data_fd))

    def track(self, path):
        """Remove ``path`` in cleanup() too."""
        self.paths.append(path)
        CREATED_IDS.add(os.path.basename(path))

    def cleanup(self):
        """Remove every segment and close every memfd created here."""
        for path in self.paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.paths.clear()
        self.fds.clear()

    @staticmethod
    def _data(region_id, size, data, key):
        plaintext = bytes(size) if data is None else bytes(data)
        assert len(plaintext) == size
        if key is None:
            return plaintext, plaintext
        return plaintext, encrypt_chunks(region_id, plaintext, key)
