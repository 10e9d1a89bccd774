"""A Snakepit adapter whose tools take and return shared memory regions.

Snakepit passes a tool's arguments as JSON; Elixir puts regions into them as
ZeroCopyRef markers (``Snakepit.SharedMemory.to_zero_copy_ref/1``).  Each tool:

* attaches every region of its arguments with ``snakepit_shm.resolve(args)`` (zero-copy
  numpy arrays; released when the block ends, safely even if arrays live on);
* writes its result into a region it allocates itself, once it knows the size
  (``snakepit_shm.from_array`` / ``snakepit_shm.allocate``), and returns the region's
  marker; Elixir adopts it with ``Snakepit.SharedMemory.adopt_region/2``.

The worker needs ``PYTHONPATH`` and ``SNAKEPIT_SHM_LIB`` from
``Snakepit.SharedMemory.python_env/0`` (a pool's ``adapter_env``).
"""

import numpy

import snakepit_shm

try:  # Snakepit's own decorator when running under Snakepit
    from snakepit_bridge.base_adapter import BaseAdapter, tool
except ImportError:  # stand-alone (tests, examples): the same shape, no gRPC
    class BaseAdapter:
        """Stand-in for snakepit_bridge.base_adapter.BaseAdapter."""

    def tool(function=None, **_options):
        """Stand-in for snakepit_bridge's @tool: marks a method as a tool."""
        def mark(f):
            f.__snakepit_tool__ = True
            return f
        return mark(function) if function is not None else mark


class ShmAdapter(BaseAdapter):
    """Tools over shared memory regions."""

    @tool(description="(x - mean) / std of a float array, as a new float32 region")
    def normalize(self, x):
        with snakepit_shm.resolve({"x": x}) as args:
            values = args["x"].astype(numpy.float64)
            result = ((values - values.mean()) / values.std()).astype(numpy.float32)
        return {"result": snakepit_shm.from_array(result).zero_copy_ref()}

    @tool(description="the elements of x above threshold: a size known only at the end")
    def select(self, x, threshold):
        with snakepit_shm.resolve(x) as values:
            chosen = values[values > threshold]
            with snakepit_shm.allocate(max(1, chosen.nbytes), dtype=chosen.dtype,
                                       shape=chosen.shape,
                                       metadata={"threshold": threshold}) as out:
                out.ndarray()[...] = chosen
                marker = out.zero_copy_ref()
        return {"count": int(chosen.size), "result": marker}

    @tool(description="sum of x * w over a list of pairs of regions")
    def weighted_sum(self, pairs):
        with snakepit_shm.resolve(pairs) as resolved:
            total = sum(float((p["x"] * p["w"]).sum()) for p in resolved)
        return {"total": total}

    @tool(description="bytes of a raw region, checksummed")
    def checksum(self, blob):
        with snakepit_shm.resolve(blob) as region:  # format "raw": a Region
            data = region.read()
        return {"bytes": len(data), "xor": int(numpy.bitwise_xor.reduce(
            numpy.frombuffer(data, numpy.uint8))) if data else 0}
