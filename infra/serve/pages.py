"""The pages of the paged KV cache, on the host: which are free, which sequences hold them, and
which hold a prompt prefix that later requests may reuse (prefix caching).

The device cache is ``num_pages`` pages of ``page_size`` positions; a sequence's pages are
listed in its row of the block table (`infra.serve.forward`). Page 0 is never handed out: it
is where writes that belong to nobody go (a free slot's decode, a prefill's padding).

Prefix caching: a full page of a prompt is known by a hash chained over every token up to its
end (and the adapter that computed it), so equal hashes mean equal keys and values. After a
prefill its full pages are registered; a later prompt starting with the same tokens takes them
(a reference each, no copy) and computes only the rest. A page nobody holds stays cached until
its place is needed (least recently released first).
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np

TRASH = 0


class PagePool:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError("a paged cache needs at least 2 pages (page 0 is the trash page)")
        self.num_pages, self.page_size = int(num_pages), int(page_size)
        self.free: collections.deque[int] = collections.deque(range(1, num_pages))
        self.refs = np.zeros(num_pages, np.int32)
        self.cached: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self.hash_of: dict[int, bytes] = {}  # page -> its prefix hash (cached pages)
        self.computing: collections.Counter[bytes] = collections.Counter()  # being prefilled
        self.hits = 0  # prompt tokens served from cached pages

    def available(self) -> int:
        """Pages that `allocate` can hand out now (free, or cached and held by nobody)."""
        return len(self.free) + sum(1 for p in self.cached.values() if self.refs[p] == 0)

    def allocate(self) -> int | None:
        """A page for one sequence (refcount 1), or None when every page is held."""
        if self.free:
            page = self.free.popleft()
        else:
            page = next((p for p in self.cached.values() if self.refs[p] == 0), None)
            if page is None:
                return None
            del self.cached[self.hash_of.pop(page)]  # evict the least recently released
        self.refs[page] = 1
        return page

    def release(self, pages: list[int]) -> None:
        for page in pages:
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if page in self.hash_of:  # keep its prefix for later, as most recently used
                    self.cached.move_to_end(self.hash_of[page])
                else:
                    self.free.append(page)

    def hashes(self, ids: np.ndarray, salt: int) -> list[bytes]:
        """The chained hash of each full page of `ids` (what `lookup`, `begin` and `register`
        take: computed once per prompt)."""
        out, h = [], hashlib.sha256(f"adapter {salt}".encode()).digest()
        size = self.page_size
        for i in range(len(ids) // size):
            h = hashlib.sha256(h + np.asarray(ids[i * size:(i + 1) * size], np.int32).tobytes()
                               ).digest()
            out.append(h)
        return out

    def lookup(self, hashes: list[bytes]) -> list[int] | None:
        """The cached pages of the longest cached prefix of a prompt's full pages (`hashes`),
        each now held once more; None (nothing held) when the page after them is being
        prefilled for another sequence: wait for it (the `n` choices of one request, or
        requests with one system prompt arriving together, share it that way)."""
        pages = []
        for h in hashes:
            page = self.cached.get(h)
            if page is None:
                if self.computing[h]:
                    return None
                break
            pages.append(page)
        for page in pages:
            self.refs[page] += 1
        self.hits += len(pages) * self.page_size
        return pages

    def begin(self, hashes: list[bytes]) -> list[bytes]:
        """A prompt starts being prefilled: its full pages' `hashes`, marked as being computed
        until `end`."""
        self.computing.update(hashes)
        return hashes

    def end(self, hashes: list[bytes]) -> None:
        self.computing.subtract(hashes)
        for h in hashes:
            if self.computing[h] <= 0:
                del self.computing[h]

    def forget(self) -> None:
        """Drop every cached prefix (the weights that computed them changed)."""
        for page in self.cached.values():
            if self.refs[page] == 0:
                self.free.append(page)
        self.cached.clear()
        self.hash_of.clear()

    def register(self, hashes: list[bytes], pages: list[int]) -> None:
        """`pages` hold a prompt (from position 0) whose full pages have `hashes`: make them
        reusable."""
        for h, page in zip(hashes, pages):
            if h not in self.cached and page not in self.hash_of:
                self.cached[h] = page
                self.hash_of[page] = h
