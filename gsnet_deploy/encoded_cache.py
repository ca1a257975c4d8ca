"""A bounded, least-recently-used cache of encoded images, sized in bytes.

The ``Segmenter`` keeps the class-independent features of the images it has seen so that a new
vocabulary on a seen image costs only the head. Features of one paper-size image take megabytes,
so the bound is a byte budget, not an entry count. Torch-free.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Generic, Protocol, TypeVar

import numpy as np

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB of encoded images per Segmenter


class _Sized(Protocol):
    """Anything that reports its memory size."""

    @property
    def nbytes(self) -> int: ...


T = TypeVar("T", bound=_Sized)


def content_key(rgb: np.ndarray) -> str:
    """Hash of an image's pixels, shape and dtype (two arrays with equal content get equal keys)."""
    data = np.ascontiguousarray(rgb)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{data.dtype.str}{data.shape}".encode())
    h.update(data.data.cast("B"))  # the pixels, without a copy
    return h.hexdigest()


class EncodedCache(Generic[T]):
    """Items by key, evicting the least recently used ones while their total size exceeds ``max_bytes``.

    An item larger than the whole budget is not stored. ``max_bytes=0`` disables the cache.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        """An empty cache holding at most ``max_bytes`` bytes of items."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, T] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        """Number of items held."""
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is held (does not count as a use)."""
        return key in self._items

    @property
    def nbytes(self) -> int:
        """Total size of the items held."""
        return self._bytes

    def get(self, key: str) -> T | None:
        """The item under ``key`` (now the most recently used), or None."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item

    def put(self, key: str, item: T) -> None:
        """Store ``item`` under ``key`` and evict the least recently used items beyond the budget."""
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
        size = item.nbytes
        if size > self.max_bytes:
            return
        self._items[key] = item
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= evicted.nbytes

    def clear(self) -> None:
        """Drop every item."""
        self._items.clear()
        self._bytes = 0
