"""Union-find over integer ids: the channel analysis unites ids that must
be kept or removed together."""

import numpy as np


class UnionFind:
    """Union-find over integer ids, growing on demand."""

    def __init__(self):
        self.parent = []

    def new(self, n):
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, i):
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # Lower id wins, so roots (and group order) are deterministic.
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb

    def roots(self):
        return np.array([self.find(i) for i in range(len(self.parent))],
                        dtype=np.int64)
