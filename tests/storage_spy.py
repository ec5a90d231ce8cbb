"""A Storage that records what a worker asks of the real one, and can make chosen calls fail.

Poison tests need to count what no log says reliably (how often a manifest was claimed, whether
a claim was tried on a manifest already retired) and to break storage at one precise step (the
delete that retires a manifest) without touching the code under test.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from processor.storage.base import ObjectInfo, Page, Storage, StoredObject


@dataclass(frozen=True)
class Call:
    op: str
    keys: tuple[str, ...]
    if_none_match: bool = False
    if_match: str | None = None
    body: bytes = b""
    ok: bool = True


# (operation, keys) -> None, or raise a StorageError to make the call fail before it is sent.
Fault = Callable[[str, tuple[str, ...]], None]


class SpyStorage:
    """Wraps ``inner``; every call is appended to ``calls`` (a list several spies may share)."""

    def __init__(
        self, inner: Storage, calls: list[Call] | None = None, fault: Fault | None = None
    ) -> None:
        self.inner = inner
        self.calls: list[Call] = calls if calls is not None else []
        self.fault = fault

    def __repr__(self) -> str:
        return f"SpyStorage({self.inner!r})"

    def clock_offset(self) -> float | None:
        return self.inner.clock_offset()

    def _before(self, op: str, keys: tuple[str, ...]) -> None:
        if self.fault is not None:
            try:
                self.fault(op, keys)
            except Exception:
                self.calls.append(Call(op, keys, ok=False))
                raise

    async def get(self, key: str, *, max_bytes: int | None = None) -> StoredObject:
        self._before("get", (key,))
        return await self.inner.get(key, max_bytes=max_bytes)

    async def head(self, key: str) -> ObjectInfo | None:
        self._before("head", (key,))
        return await self.inner.head(key)

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        self._before("put", (key,))
        try:
            etag = await self.inner.put(
                key,
                data,
                content_type=content_type,
                if_none_match=if_none_match,
                if_match=if_match,
            )
        except Exception:
            self.calls.append(Call("put", (key,), if_none_match, if_match, data, ok=False))
            raise
        self.calls.append(Call("put", (key,), if_none_match, if_match, data))
        return etag

    async def list(
        self, prefix: str, *, recursive: bool = False, limit: int | None = None
    ) -> list[ObjectInfo]:
        self._before("list", (prefix,))
        return await self.inner.list(prefix, recursive=recursive, limit=limit)

    async def list_page(
        self, prefix: str, *, start_after: str | None = None, limit: int = 1000
    ) -> Page:
        self._before("list_page", (prefix,))
        page = await self.inner.list_page(prefix, start_after=start_after, limit=limit)
        self.calls.append(Call("list_page", (prefix,)))
        return page

    async def delete(self, key: str) -> None:
        self._before("delete", (key,))
        await self.inner.delete(key)
        self.calls.append(Call("delete", (key,)))

    async def delete_many(self, keys: Sequence[str]) -> None:
        self._before("delete_many", tuple(keys))
        await self.inner.delete_many(keys)
        self.calls.append(Call("delete_many", tuple(keys)))

    async def move(self, src: str, dst: str, *, lenient: bool = False) -> None:
        self._before("move", (src, dst))
        await self.inner.move(src, dst, lenient=lenient)
        self.calls.append(Call("move", (src, dst)))

    async def copy(self, src: str, dst: str) -> None:
        self._before("copy", (src, dst))
        await self.inner.copy(src, dst)
        self.calls.append(Call("copy", (src, dst)))

    async def presign_get(self, key: str, expires_in: int) -> str:
        return await self.inner.presign_get(key, expires_in)

    def location(self, key: str) -> str:
        return self.inner.location(key)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> Self:
        await self.inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.inner.__aexit__(exc_type, exc, tb)


def claim_creates(calls: list[Call], claims_prefix: str = "input/_claims") -> dict[str, int]:
    """Claim attempts by manifest name: every acquire starts with a create (If-None-Match)."""
    counted: dict[str, int] = {}
    for call in calls:
        if call.op == "put" and call.if_none_match and call.keys[0].startswith(claims_prefix + "/"):
            name = call.keys[0][len(claims_prefix) + 1 :].removesuffix(".json")
            counted[name] = counted.get(name, 0) + 1
    return counted


def claims_won(calls: list[Call], claims_prefix: str = "input/_claims") -> dict[str, int]:
    """Claims taken, by manifest name: a create that succeeded, or a takeover (a conditional
    replace whose new document is held with a higher ``tries`` than the lease it replaced)."""
    won: dict[str, int] = {}
    tries: dict[str, int] = {}
    for call in calls:
        if call.op != "put" or not call.ok or not call.keys[0].startswith(claims_prefix + "/"):
            continue
        name = call.keys[0][len(claims_prefix) + 1 :].removesuffix(".json")
        document = json.loads(call.body)
        if "tries" not in document:
            continue  # not a claim: the start-up probe of conditional writes
        if call.if_none_match or (
            document["state"] == "held" and document["tries"] > tries.get(name, 0)
        ):
            won[name] = won.get(name, 0) + 1
        tries[name] = document["tries"]
    return won
