"""A careless caller of snakepit_shm.StatusBoard (session-4 attack), on a real board made
by an Elixir peer: a bad value or ref gives an exception that names it, not an error
from inside the client (struct's "required argument is not an integer" naming no field,
"unhashable type: 'list'", "'str' object has no attribute 'get'")."""

import json
import math
import secrets
import subprocess

import pytest

from snakepit_shm import board
from conftest import requires_lib

pytestmark = requires_lib

BOARD_PEER = """
{:ok, _} = Application.ensure_all_started(:snakepit_shm)
[name] = System.argv()
alias Snakepit.SharedMemory.{JSON, StatusBoard}
{:ok, b} = StatusBoard.create(name, capacity: 4, gauges: [:gpu])
{:ok, ref} = StatusBoard.export_ref(b)
{:ok, json} = JSON.encode(ref)
IO.puts(json)
IO.gets("")
StatusBoard.delete(b)
"""


@pytest.fixture
def board_ref(tmp_path):
    from test_real_regions import _peer_command
    try:
        argv, env = _peer_command()
    except LookupError as exc:
        pytest.skip(str(exc))
    name = "a4bm" + secrets.token_hex(4)
    script = tmp_path / "board_peer.exs"
    script.write_text(BOARD_PEER)
    peer = subprocess.Popen(argv[:-1] + [str(script), name], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = peer.stdout.readline()
        while line and not line.startswith("{"):  # anything the VM printed first
            line = peer.stdout.readline()
        yield json.loads(line)
    finally:
        peer.communicate("\n", timeout=60)


def test_bad_values_name_their_field(board_ref):
    with board.StatusBoard.join(board_ref, "w1") as slot:
        for kwargs, field in ((dict(queue="3"), "queue"), (dict(queue=1.5), "queue"),
                              (dict(errors=-1), "errors"), (dict(memory=1 << 64), "memory"),
                              (dict(gpu=math.nan), "gpu"), (dict(gpu=1 << 63), "gpu")):
            with pytest.raises(ValueError, match=f"^{field} must be an integer"):
                slot.update(state="idle", **kwargs)
        for state in ([], {}, 1):
            with pytest.raises(ValueError, match="state must be one of"):
                slot.update(state=state)
        # Nothing of a refused call was published or kept.
        slot.update(queue=2)
        values = slot._values
        assert values[0] == 0 and values[1] == 2  # state still "starting"


def test_a_ref_whose_board_is_not_a_map_is_refused(board_ref):
    for bad in ("x", ["gpu"], 5):
        ref = dict(board_ref, board=bad)
        with pytest.raises(ValueError, match='"board"'):
            board.StatusBoard.join(ref, "w1")
    with board.StatusBoard.join(board_ref, "w1") as slot:
        assert slot.index == 0  # the refused joins took no slot
