"""The HTTP gateway's cost: the same deposits over HTTP and over NATS, in the same run.

    python -m bench.http [--requests 5000] [--concurrency 50] [--rounds 3]

One `kaya run` node (embedded nats-server, the bank, `--http-address`) in its own
process; this process is the load generator. Each round sends `--requests` deposits with
`--concurrency` requests in flight, spread over as many accounts, three ways, in an order
that rotates per round:

- `http`: `POST /v1/account/<id>` on `--concurrency` keep-alive connections, by a minimal
  HTTP/1.1 client (asyncio streams): what the gateway costs, the client nearly free;
- `httpx`: the same through one `httpx.AsyncClient` (what a Python service would use);
  its connection pool costs ~2 ms of CPU a request here, so it measures httpx, mostly;
- `nats`: `kaya.Client.send`, the same deposits over NATS.

Printed per path: requests/s, p50/p99 latency (ms), the node process's CPU per request
(embedded server excluded; it includes the node's fixed background work, so it reads
high at low rates) and the generator's CPU share (near 1.0: the generator is the limit).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import orjson

from bench.common import cpu_seconds, free_port, percentile, spread, stop_pid_process
from kaya import Client

REPO = Path(__file__).resolve().parent.parent
KAYA = Path(sys.executable).parent / "kaya"


async def run_load(
    send: Callable[[int], Awaitable[None]], requests: int, concurrency: int
) -> tuple[float, list[float]]:
    """(seconds, latencies in ms) of `requests` calls of send(worker), `concurrency` at once."""
    latencies: list[float] = []
    per_worker = requests // concurrency

    async def worker(n: int) -> None:
        for _ in range(per_worker):
            started = time.perf_counter()
            await send(n)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return time.perf_counter() - started, latencies


class RawHttp:
    """One keep-alive HTTP/1.1 connection per worker: the lightest client there is."""

    def __init__(self, url: str) -> None:
        host, _, port = url.removeprefix("http://").rpartition(":")
        self._host, self._port = host, int(port)
        self._streams: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}

    async def post(self, worker: int, path: str, body: bytes) -> int:
        try:
            return await self._post(worker, path, body)
        except (asyncio.IncompleteReadError, ConnectionError):  # closed while idle (keep-alive)
            self._streams.pop(worker)[1].close()
            return await self._post(worker, path, body)

    async def _post(self, worker: int, path: str, body: bytes) -> int:
        if worker not in self._streams:
            self._streams[worker] = await asyncio.open_connection(self._host, self._port)
        reader, writer = self._streams[worker]
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self._host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await reader.readexactly(length)
        return int(head.split(b" ", 2)[1])

    def close(self) -> None:
        for _, writer in self._streams.values():
            writer.close()


async def bench(args: argparse.Namespace, nats_url: str, http_url: str, pid: int) -> None:
    deposit = {"type": "Deposit", "amount": 1}
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    results: dict[str, list[dict[str, float]]] = {"http": [], "httpx": [], "nats": []}
    async with (
        Client.connect(nats_url, attempts=1, timeout=10) as client,
        httpx.AsyncClient(base_url=http_url, limits=limits, timeout=10) as web,
    ):
        for n in range(args.concurrency):
            await client.send(
                "account", f"b-{n}", {"type": "Open", "owner": f"o{n}", "currency": "EUR"}
            )

        raw = RawHttp(http_url)
        body = orjson.dumps(deposit)

        async def over_http(n: int) -> None:
            status = await raw.post(n, f"/v1/account/b-{n}", body)
            if status != 200:
                raise RuntimeError(f"HTTP {status}")

        async def over_httpx(n: int) -> None:
            response = await web.post(f"/v1/account/b-{n}", json=deposit)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text}")

        async def over_nats(n: int) -> None:
            await client.send("account", f"b-{n}", deposit)

        paths = {"http": over_http, "httpx": over_httpx, "nats": over_nats}
        # one warm-up each (connections, actors), not counted
        for send in paths.values():
            await run_load(send, args.concurrency * 4, args.concurrency)
        for round_ in range(args.rounds):
            names = list(paths)
            order = names[round_ % 3 :] + names[: round_ % 3]
            for name in order:
                cpu_before = cpu_seconds(pid) or 0.0
                own_before = time.process_time()
                seconds, latencies = await run_load(paths[name], args.requests, args.concurrency)
                cpu = (cpu_seconds(pid) or 0.0) - cpu_before
                own = time.process_time() - own_before
                latencies.sort()
                figures = {
                    "rps": len(latencies) / seconds,
                    "p50": percentile(latencies, 50),
                    "p99": percentile(latencies, 99),
                    "cpu_us": cpu / len(latencies) * 1e6,
                    "gen_cpu": own / seconds,
                }
                results[name].append(figures)
                print(
                    f"round {round_ + 1} {name:>5}: {figures['rps']:8,.0f} req/s"
                    f"  p50 {figures['p50']:6.2f} ms  p99 {figures['p99']:6.2f} ms"
                    f"  node CPU {figures['cpu_us']:5.0f} us/req"
                    f"  generator CPU {figures['gen_cpu']:.2f}",
                    flush=True,
                )
    print(f"\nmedian of {args.rounds} rounds, {args.requests} deposits each,"
          f" {args.concurrency} in flight:")  # fmt: skip
    for name, rounds in results.items():
        line = "  ".join(
            f"{key} {spread([r[key] for r in rounds])['median']:,.2f}"
            for key in ("rps", "p50", "p99", "cpu_us", "gen_cpu")
        )
        print(f"  {name:>5}: {line}")
    raw.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kaya-bench-http-") as tmp:
        config = Path(tmp) / "kaya.toml"
        config.write_text(
            f'[node]\ndata_dir = "{tmp}/data"\napp = "examples.bank:app"\n'
            f"[nats]\nport = {free_port()}\nmonitor_port = 0\n"
            '[log]\nlevel = "warning"\n'
        )
        proc = subprocess.Popen(
            [str(KAYA), "run", "--config", str(config), "--http-address", "127.0.0.1:0"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # the node prints one `ready` line once it serves
                if " ready on " in line:
                    break
            else:
                raise SystemExit("the node exited before it was ready")
            nats_url = next(tok for tok in line.split() if tok.startswith("nats://"))
            http_url = line.split(", http ")[1].split(")")[0].strip()
            print(f"node {proc.pid}: {nats_url}, {http_url}", flush=True)
            asyncio.run(bench(args, nats_url, http_url, proc.pid))
        finally:
            stop_pid_process(proc, 15)


if __name__ == "__main__":
    main()
