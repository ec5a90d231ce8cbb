"""What one S3 request costs this process in CPU: aiobotocore (as comfys3 configures it) against
obstore (Rust ``object_store`` bindings), on the requests a job makes.

Starts SeaweedFS (``weed mini``, see bench/rig_servers.py), then for each request kind runs N
requests at concurrency 1 and 8 with each client, interleaved (kind by kind, client by client)
so that drift on a shared machine hits both alike. CPU is this process's user + system time
(``getrusage(RUSAGE_SELF)``, every thread included: obstore does its I/O on tokio threads, so
thread time alone would flatter it); wall time is the elapsed time per request. SeaweedFS's own
CPU per request is printed too: the server's share is the same work whichever client asks.

Clients:

- ``aiobotocore``: the raw client :class:`processor.storage.s3.S3Storage` opens (its Config:
  fixed User-Agent, no parameter validation, checksums only when required, the fast timestamp
  parser), called directly.
- ``obstore``: ``obstore.store.S3Store`` with path-style requests, called directly.
- ``S3Storage`` / ``ObstoreStorage`` (``--layer storage``): the same requests through the
  :class:`processor.storage.base.Storage` protocol, what the worker actually runs (key checks,
  error mapping, result objects); ObstoreStorage only if that backend is installed.

    .venv/bin/python bench/s3_client_cost.py [--requests 500] [--concurrency 1 8]
        [--layer raw|storage|both]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Protocol

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydantic import SecretStr

from bench.rig_servers import S3, cpu_seconds, weed_mini
from processor.settings import S3Settings
from processor.storage.base import Storage
from processor.storage.s3 import S3Storage

BODY = os.urandom(2048)  # a small status document or manifest
LIST_OBJECTS = 100
KINDS = ["put", "put if-none-match", "get", "copy", "delete 2 keys", "list 100"]
HOT = KINDS[:5]  # what a job does; listing is the intake's, shared by many jobs


class Client(Protocol):
    """The six requests, each on the ``i``-th key of a prefix of this client's own."""

    name: str

    async def put(self, key: str) -> None: ...
    async def create(self, key: str) -> None: ...
    async def get(self, key: str) -> None: ...
    async def copy(self, src: str, dst: str) -> None: ...
    async def delete2(self, first: str, second: str) -> None: ...
    async def list100(self, prefix: str) -> None: ...


class Aiobotocore:
    """The client S3Storage opens, with its Config, called without the Storage layer."""

    name = "aiobotocore"

    def __init__(self, storage: S3Storage) -> None:
        self._s3 = storage._s3
        self._bucket = storage.bucket

    async def put(self, key: str) -> None:
        await self._s3.put_object(
            Bucket=self._bucket, Key=key, Body=BODY, ContentType="application/json"
        )

    async def create(self, key: str) -> None:
        await self._s3.put_object(
            Bucket=self._bucket, Key=key, Body=BODY, ContentType="application/json", IfNoneMatch="*"
        )

    async def get(self, key: str) -> None:
        response = await self._s3.get_object(Bucket=self._bucket, Key=key)
        async with response["Body"] as stream:
            assert len(await stream.read()) == len(BODY)

    async def copy(self, src: str, dst: str) -> None:
        await self._s3.copy_object(
            Bucket=self._bucket, Key=dst, CopySource={"Bucket": self._bucket, "Key": src}
        )

    async def delete2(self, first: str, second: str) -> None:
        keys = [{"Key": first}, {"Key": second}]
        await self._s3.delete_objects(Bucket=self._bucket, Delete={"Objects": keys, "Quiet": True})

    async def list100(self, prefix: str) -> None:
        page = await self._s3.list_objects_v2(
            Bucket=self._bucket, Prefix=prefix + "/", Delimiter="/", MaxKeys=1000
        )
        assert len(page["Contents"]) == LIST_OBJECTS


class Obstore:
    """``obstore.store.S3Store``, path-style, plain HTTP allowed (the bench's SeaweedFS)."""

    name = "obstore"

    def __init__(self, s3: S3) -> None:
        import obstore
        from obstore.store import S3Store

        self._ob = obstore
        self._store = S3Store(
            s3.bucket,
            endpoint=s3.endpoint_url,
            access_key_id=s3.access_key,
            secret_access_key=s3.secret_key,
            region=s3.region,
            virtual_hosted_style_request=False,
            client_options={"allow_http": True},
        )

    async def put(self, key: str) -> None:
        await self._ob.put_async(
            self._store,
            key,
            BODY,
            attributes={"Content-Type": "application/json"},
            use_multipart=False,
        )

    async def create(self, key: str) -> None:
        await self._ob.put_async(
            self._store,
            key,
            BODY,
            attributes={"Content-Type": "application/json"},
            mode="create",
            use_multipart=False,
        )

    async def get(self, key: str) -> None:
        result = await self._ob.get_async(self._store, key)
        assert len(await result.bytes_async()) == len(BODY)

    async def copy(self, src: str, dst: str) -> None:
        await self._ob.copy_async(self._store, src, dst)

    async def delete2(self, first: str, second: str) -> None:
        await self._ob.delete_async(self._store, [first, second])

    async def list100(self, prefix: str) -> None:
        page = await self._ob.list_with_delimiter_async(self._store, prefix + "/")
        assert len(page["objects"]) == LIST_OBJECTS


class ThroughStorage:
    """The same requests through the Storage protocol: what the worker pays per request."""

    def __init__(self, name: str, storage: Storage) -> None:
        self.name = name
        self._storage = storage

    async def put(self, key: str) -> None:
        await self._storage.put(key, BODY, content_type="application/json")

    async def create(self, key: str) -> None:
        await self._storage.put(key, BODY, content_type="application/json", if_none_match=True)

    async def get(self, key: str) -> None:
        assert len((await self._storage.get(key)).data) == len(BODY)

    async def copy(self, src: str, dst: str) -> None:
        await self._storage.copy(src, dst)

    async def delete2(self, first: str, second: str) -> None:
        await self._storage.delete_many([first, second])

    async def list100(self, prefix: str) -> None:
        page = await self._storage.list_page(prefix)
        assert len(page.items) == LIST_OBJECTS


@dataclass
class Figure:
    client: str
    kind: str
    concurrency: int
    cpu_ms: float  # this process, per request
    wall_ms: float  # elapsed per request (at concurrency c: total / N)
    server_cpu_ms: float | None  # SeaweedFS, per request


async def run_many(count: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> None:
    """``one(0) .. one(count - 1)``, at most ``concurrency`` at a time."""
    numbers = iter(range(count))

    async def lane() -> None:
        for i in numbers:
            await one(i)

    await asyncio.gather(*(lane() for _ in range(concurrency)))


def process_cpu() -> float:
    """User + system seconds of this process, all threads, in microseconds' resolution
    (``os.times`` counts clock ticks, 10 ms: too coarse for a sub-millisecond request)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(
    client: Client, kind: str, count: int, concurrency: int, root: str, weed_pid: int
) -> Figure:
    """One kind of request, ``count`` times under ``root`` (a prefix for this client and
    concurrency, so every put lands on a fresh key and every copy has its source)."""
    calls: dict[str, Callable[[int], Awaitable[None]]] = {
        "put": lambda i: client.put(f"{root}/put/{i}"),
        "put if-none-match": lambda i: client.create(f"{root}/create/{i}"),
        "get": lambda i: client.get(f"{root}/put/{i}"),
        "copy": lambda i: client.copy(f"{root}/put/{i}", f"{root}/copy/{i}"),
        "delete 2 keys": lambda i: client.delete2(f"{root}/put/{i}", f"{root}/create/{i}"),
        "list 100": lambda i: client.list100(f"{root}/list"),
    }
    server_before = cpu_seconds(weed_pid)
    before, started = process_cpu(), time.perf_counter()
    await run_many(count, concurrency, calls[kind])
    cpu, wall = process_cpu() - before, time.perf_counter() - started
    server_after = cpu_seconds(weed_pid)
    server = (
        (server_after - server_before) * 1000 / count
        if server_before is not None and server_after is not None
        else None
    )
    return Figure(client.name, kind, concurrency, cpu * 1000 / count, wall * 1000 / count, server)


async def fill_list(client: Client, root: str) -> None:
    await run_many(LIST_OBJECTS, 8, lambda i: client.put(f"{root}/list/{i:03d}"))


@contextlib.asynccontextmanager
async def clients(s3: S3, layer: str) -> AsyncIterator[list[Client]]:
    settings = S3Settings(
        region=s3.region,
        access_key=SecretStr(s3.access_key),
        secret_key=SecretStr(s3.secret_key),
        bucket_name=s3.bucket,
        endpoint_url=s3.endpoint_url,
    )
    async with contextlib.AsyncExitStack() as stack:
        chosen: list[Client] = []
        if layer in {"raw", "both"}:
            raw = await stack.enter_async_context(S3Storage(settings))
            chosen += [Aiobotocore(raw), Obstore(s3)]
        if layer in {"storage", "both"}:
            boto = await stack.enter_async_context(S3Storage(settings))
            chosen.append(ThroughStorage("S3Storage", boto))
            with contextlib.suppress(ImportError):
                from processor.storage.obstore_s3 import ObstoreStorage

                ob = await stack.enter_async_context(ObstoreStorage(settings))
                chosen.append(ThroughStorage("ObstoreStorage", ob))
        yield chosen


async def warm_up(client: Client) -> None:
    await run_many(20, 4, lambda i: client.put(f"warm/{client.name}/{i}"))
    await run_many(20, 4, lambda i: client.get(f"warm/{client.name}/{i}"))


async def bench(s3: S3, count: int, concurrencies: list[int], layer: str) -> list[Figure]:
    figures: list[Figure] = []
    async with clients(s3, layer) as chosen:
        for client in chosen:  # warm-up: connections, models, first-call caches
            await warm_up(client)
        for concurrency in concurrencies:
            roots = {c.name: f"{c.name}/c{concurrency}" for c in chosen}
            for client in chosen:
                await fill_list(client, roots[client.name])
            for kind in KINDS:
                for client in chosen:
                    figure = await measure(
                        client, kind, count, concurrency, roots[client.name], s3.pid
                    )
                    figures.append(figure)
                    print(
                        f"  {figure.client:>14} c={concurrency} {kind:<18} "
                        f"cpu {figure.cpu_ms:6.3f} ms  wall {figure.wall_ms:6.3f} ms",
                        file=sys.stderr,
                    )
    return figures


def table(figures: list[Figure]) -> str:
    """One row per request kind and concurrency; a CPU ratio per pair of clients measured side
    by side (aiobotocore / obstore, S3Storage / ObstoreStorage)."""
    names = list(dict.fromkeys(f.client for f in figures))
    pairs = list(zip(names[0::2], names[1::2], strict=False))
    by = {(f.client, f.kind, f.concurrency): f for f in figures}
    head = ["request", "c"]
    for name in names:
        head += [f"{name} CPU ms", f"{name} wall ms"]
    head += [f"CPU {first}/{second}" for first, second in pairs]
    head += ["weed CPU ms (per client)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for concurrency in sorted({f.concurrency for f in figures}):
        for kind in [*KINDS, "hot mean"]:
            kinds = HOT if kind == "hot mean" else [kind]
            cpu = {n: mean([by[(n, k, concurrency)].cpu_ms for k in kinds]) for n in names}
            wall = {n: mean([by[(n, k, concurrency)].wall_ms for k in kinds]) for n in names}
            server = {
                n: mean([by[(n, k, concurrency)].server_cpu_ms or 0.0 for k in kinds])
                for n in names
            }
            cells = [kind, str(concurrency)]
            for name in names:
                cells += [f"{cpu[name]:.3f}", f"{wall[name]:.3f}"]
            for first, second in pairs:
                cells.append(f"{cpu[first] / cpu[second]:.1f}x" if cpu[second] else "-")
            cells.append(" / ".join(f"{server[n]:.2f}" for n in names))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="requests per kind (N)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--layer", choices=["raw", "storage", "both"], default="raw")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="s3-client-cost-") as base, weed_mini(Path(base)) as s3:
        print(f"SeaweedFS at {s3.endpoint_url}; N={args.requests}; 2 KB bodies", file=sys.stderr)
        figures = asyncio.run(bench(s3, args.requests, args.concurrency, args.layer))
    cores = os.cpu_count()
    print(f"\nCPU = this process's user+sys per request; wall = elapsed / N; {cores} cores\n")
    print(table(figures))


if __name__ == "__main__":
    main()
