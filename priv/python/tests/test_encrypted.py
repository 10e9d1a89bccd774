"""Encrypted regions: decrypt and verify with the ref's key, write with fresh nonces."""

import base64
import os

import pytest

import snakepit_shm
from snakepit_shm import _format as F
from conftest import requires_lib

pytestmark = requires_lib

SIZE = 2 * F.CHUNK_SIZE + 1000  # two full chunks and a partial one


def plaintext(size=SIZE):
    return bytes((i * 13 + 5) % 256 for i in range(size))


@pytest.fixture(params=["posix", "memfd"])
def encrypted(request, forge):
    key = os.urandom(F.KEY_SIZE)
    return getattr(forge, request.param)(SIZE, data=plaintext(), key=key)


def test_read_decrypts_with_the_key_from_the_ref(encrypted):
    with snakepit_shm.attach(encrypted.ref()) as region:
        assert region.encrypted and region.size == SIZE
        assert region.read() == plaintext()
        # Ranges across chunk boundaries.
        start = F.CHUNK_SIZE - 10
        assert region.read(start, 20) == plaintext()[start:start + 20]
        assert region.read(SIZE - 1) == plaintext()[-1:]
        assert region.read(5, 0) == b""


def test_ciphertext_is_not_the_plaintext(encrypted):
    assert plaintext()[:1000] not in encrypted.read_data()


def test_buf_and_ndarray_refuse_ciphertext(encrypted):
    with snakepit_shm.attach(encrypted.ref()) as region:
        with pytest.raises(snakepit_shm.PermissionError, match="encrypted.*read"):
            region.buf
        with pytest.raises(snakepit_shm.PermissionError, match="encrypted"):
            region.ndarray()


def test_read_without_key_tells_how_to_export_it(encrypted):
    ref = encrypted.ref()
    del ref["key"]
    for target in (ref, encrypted.region_id):
        with snakepit_shm.attach(target) as region:
            with pytest.raises(snakepit_shm.PermissionError,
                               match="include_key: true"):
                region.read()


def test_wrong_key_is_tampered(encrypted):
    ref = encrypted.ref(key=base64.b64encode(os.urandom(32)).decode())
    with snakepit_shm.attach(ref) as region:
        with pytest.raises(snakepit_shm.CorruptRegion):
            region.read()


@pytest.mark.parametrize("where", [0, F.NONCE_SIZE + 5, F.CHUNK_SIZE + F.CHUNK_OVERHEAD
                                   + F.NONCE_SIZE + F.CHUNK_SIZE + 3])
def test_tampered_data_is_corrupt(encrypted, where):
    raw = encrypted.read_data()
    encrypted.write_data(where, bytes([raw[where] ^ 0x40]))
    with snakepit_shm.attach(encrypted.ref()) as region:
        with pytest.raises(snakepit_shm.CorruptRegion):
            region.read()


def test_swapped_chunks_are_corrupt(forge):
    key = os.urandom(F.KEY_SIZE)
    seg = forge.posix(2 * F.CHUNK_SIZE, data=plaintext(2 * F.CHUNK_SIZE), key=key)
    raw = seg.read_data()
    stride = F.CHUNK_SIZE + F.CHUNK_OVERHEAD
    seg.write_data(0, raw[stride:] + raw[:stride])
    with snakepit_shm.attach(seg.ref()) as region:
        with pytest.raises(snakepit_shm.CorruptRegion):
            region.read()


def test_write_encrypts_and_another_attach_reads_it(encrypted):
    with snakepit_shm.attach(encrypted.ref(), mode="rw") as writer:
        before = encrypted.read_data()
        writer.write(F.CHUNK_SIZE - 3, b"result!")
        after = encrypted.read_data()
        assert b"result!" not in after and before != after
    expected = bytearray(plaintext())
    expected[F.CHUNK_SIZE - 3:F.CHUNK_SIZE + 4] = b"result!"
    with snakepit_shm.attach(encrypted.ref()) as reader:
        assert reader.read() == bytes(expected)


def test_write_without_key(encrypted):
    ref = encrypted.ref()
    del ref["key"]
    with snakepit_shm.attach(ref, mode="rw") as region:
        with pytest.raises(snakepit_shm.PermissionError, match="include_key"):
            region.write(0, b"x")


def test_readinto_decrypts_straight_into_a_numpy_array(encrypted):
    import numpy as np
    out = np.zeros(SIZE - 8, dtype=np.uint8)
    with snakepit_shm.attach(encrypted.ref()) as region:
        assert region.readinto(out, offset=8) == SIZE - 8
    assert out.tobytes() == plaintext()[8:]
