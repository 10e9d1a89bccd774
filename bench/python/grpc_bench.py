"""gRPC unary round trips between two Python processes (Debian's python3-grpcio), as the
reference for what Snakepit pays today. No generated stubs: a generic handler with
identity (bytes) serializers on a Unix socket.

    grpc_bench.py client SIZES ITERATIONS   -> one JSON line {size: [ns, ...]}
    grpc_bench.py server ADDRESS            (started by the client)
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import grpc

METHOD = "/bench.Echo/Call"


def server(address):
    from concurrent import futures

    def call(request, _context):
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)})
    opts = [("grpc.max_receive_message_length", 1 << 30),
            ("grpc.max_send_message_length", 1 << 30)]
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=opts)
    srv.add_generic_rpc_handlers((handler,))
    srv.add_insecure_port(address)
    srv.start()
    print("ready", flush=True)
    sys.stdin.read()
    srv.stop(0)


def client(sizes, iterations):
    path = os.path.join(tempfile.mkdtemp(prefix="spshm-grpc-"), "s")
    address = "unix:" + path
    proc = subprocess.Popen([sys.executable, __file__, "server", address],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        opts = [("grpc.max_receive_message_length", 1 << 30),
                ("grpc.max_send_message_length", 1 << 30)]
        channel = grpc.insecure_channel(address, options=opts)
        call = channel.unary_unary(METHOD, request_serializer=None,
                                   response_deserializer=None)
        out = {}
        for size in sizes:
            payload = os.urandom(size)
            n = max(20, iterations * 64 // max(64, size // 64)) if size > 65536 else iterations
            for _ in range(min(50, n)):
                call(payload)
            samples = []
            for _ in range(n):
                t0 = time.perf_counter_ns()
                call(payload)
                samples.append(time.perf_counter_ns() - t0)
            out[str(size)] = samples
        channel.close()
        print(json.dumps(out), flush=True)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        try:
            os.unlink(path)
            os.rmdir(os.path.dirname(path))
        except OSError:
            pass


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(sys.argv[2])
    else:
        client([int(s) for s in sys.argv[2].split(",")], int(sys.argv[3]))
