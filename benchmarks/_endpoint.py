"""A minimal, fast chat-completions endpoint for benchmarks (raw asyncio protocol, HTTP/1.1 keep-alive).

Every POST gets the same small `chat.completion` body: a forced `output` tool call whose arguments
match the benchmarks' schema, with usage, exactly as the simulator answers gpt-4-turbo in tool mode,
so the pipeline's classify -> usage -> extract -> validate path runs in full. Optional fixed latency
(`--latency-ms`) is a timer per request, not a sleeping task, so it costs almost no CPU.

Run as a separate process so its CPU never mixes with the client's:

    python benchmarks/_endpoint.py --port 0 [--latency-ms 200]

It prints `http://127.0.0.1:PORT/v1` on stdout once listening, and serves until SIGTERM/SIGINT.
Only 127.0.0.1 is ever bound.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys

BODY = (
    b'{"id":"gen-bench-1","provider":"OpenAI","model":"openai/gpt-4-turbo","object":"chat.completion",'
    b'"created":1795599691,"choices":[{"index":0,"message":{"role":"assistant","content":null,"refusal":null,'
    b'"tool_calls":[{"id":"call_21340b59892ffe517ceb5851","type":"function","function":{"name":"output",'
    b'"arguments":"{\\"score\\":3,\\"sentiment\\":\\"positive\\",\\"tags\\":[\\"delivery\\"]}"}}]},'
    b'"logprobs":null,"finish_reason":"tool_calls","native_finish_reason":"tool_calls"}],'
    b'"system_fingerprint":"fp_8b36560000","usage":{"prompt_tokens":129,"completion_tokens":9,'
    b'"total_tokens":138,"cost":0.00156}}'
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)


class Http(asyncio.Protocol):
    """Reads request heads and bodies (Content-Length only); answers each with RESPONSE."""

    def __init__(self, latency_s: float) -> None:
        self.buf = bytearray()
        self.latency_s = latency_s
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            length = 0
            i = head.find(b"content-length:")
            if i >= 0:
                j = head.find(b"\r\n", i)
                length = int(head[i + 15 : j if j > 0 else None])
            total = end + 4 + length
            if len(buf) < total:
                return
            del buf[:total]
            if self.latency_s > 0:
                asyncio.get_running_loop().call_later(self.latency_s, self._reply)
            else:
                self._reply()

    def _reply(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(RESPONSE)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(port: int, latency_ms: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Http(latency_ms / 1000.0), "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    port = server.sockets[0].getsockname()[1]
    print(f"http://127.0.0.1:{port}/v1", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--uvloop", action="store_true", help="serve on uvloop if it is installed")
    args = ap.parse_args()
    if args.uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            print("uvloop not installed; using asyncio", file=sys.stderr)
    asyncio.run(serve(args.port, args.latency_ms))


if __name__ == "__main__":
    main()
