"""The D4-lattice grids of IQ3_XXS (256 points) and IQ3_S (512 points), and the search tables
ggml's `iq3xs_init_impl` derives from them.

A grid point is 4 odd levels 2*l + 1 with l in [0, 8): its index in the 4096-point cube is
l0 | l1 << 3 | l2 << 6 | l3 << 9. A grid is a subset of that cube, in ascending index order,
so it is stored here as a 4096-bit membership mask (base64, bit p of byte p // 8 = point p).
"""

from __future__ import annotations

import base64
from functools import cache

import numpy as np

_MASK_256 = (
    "FYoFAgQAACgKBSIFAhAAARUCBYoAggAgggUgAAAAAAEACACAEIAAKIIAAAQABAAAAAAAIAAAEAAAUQAACAACAAoF"
    "ChWAAQAABQIFAAAAAAAKBQIBAAAABAUAAQJAAEAAIgAAAAABAAAAABEAQAAAAiAAAAAAAAAAAAAEAAEAAAAFCkUC"
    "BAAAACoFAgEAAIgBBYIFgAEgAAACEQAAAAAAEQAAACAACAAACACAAAIAABAAAAAAAAAAAApAAAAgAAAAAgUKAAAB"
    "IAQFAAECUAAAAAoBIAAABAAEAAIACAAAAAAAAAABgAAABEEABAAAIAAAABAAQAAACAAAAAAIAAABABCAAKAAiAAA"
    "AAAAAAAAABAAAAGAAQBBAIAAAAAgAAAAEAAAAAACEAAAACAACAAAAQAAAAAAAAAAIAUAAQAAAAAABAAAAgAAAUEA"
    "QAAAIAAAABAABAAAAAQEAAAAAAgAAAABiAAAAAAEBAAAAgAAAAAAAAAAAAEAAAAAEAAEAAAAAAAQAFAAEAAAAAIA"
    "AAACAACAAAAAABAAAAAAQQAAAAAAAAAAEAAAACAAAAAABAAAAAAACAAAAAAIAAIAAAAAAKgBAAQABAAAAABAAAEA"
    "AAAABAAAIAQAAAEgAAgAAAEAAAACAAIAAAAFABAAAAAAAAAAAAEAAAAAAAAAAAAAAAA="
)
_MASK_512 = (
    "p1cjCKUKBZIXI4kiEAAiBKNJIhGkCgAJCCIFShAFgCIBiBIECQIAARQARQiiAEAIQAoAAgAEAAIVAEUIABEAABer"
    "BVIAUAIESxECCQIFAEEBpBEECSABBJIJghECAAQBKBQACkQRAAACCQIFAAIAAAAAkQBQAAAACgUCIAIABAGrVYoF"
    "KgWAKQWJJBIEAgAAkgAKgQKIABIlAhQKBAFAAIIACSQCAAAkEAIEgAEIAAGFAAIAACACACACQAEIAQAABKoEKpQC"
    "CAIqEAoAAQABRAEEARQAAQAAAhGKAYogAAgIQgQCAAQRAAIFIAQQQAAIAEAAAAIAAAAKAAUgAAAAABEEkQQCAQAB"
    "hAoEIQgiAAAKIQIIAYAEARAKBSIAAAAABQAQgAEAAAKgAAIAAAAEAAAIABAAAAEAACEAAQgCAAAEEQQAkQRAECoE"
    "AgQAAAAEAQIIQQAIAACEAYAAEAIgCBIAAQRAAAAAAARAAAAKAAAAAAAABAAAABQABAAAAAAAACoACgAAAQABAIEA"
    "AAAQAAAEABAEIAQBARACAAEAAAAAACAACAAEAAkAABAAAAEAIAAAAAEAAAAACgAAAAAAAJEABUABEAQABAIQACgA"
    "AAASQQIBAAIAAAQAACQACAAAIggBAAABAAAAAAQABAAAAAQAAAIAAAAAAQAAAAAAAAA="
)


class Iq3Grid:
    """One IQ3 grid with ggml's search tables.

    - `points`: (n, 4) uint8, the odd levels 1..15 of each grid point;
    - `levels`: (n, 4) int8, l = (level - 1) / 2;
    - `map`: (4096,) int32, the grid index of each cube point, -1 where it is not on the grid;
    - `neighbours`: (4096, k) int32, for each point off the grid the grid indices within its
      `nwant` nearest distinct squared distances, by (distance, index), padded with -1.
    """

    def __init__(self, mask_b64: str, nwant: int):
        mask = np.unpackbits(np.frombuffer(base64.b64decode(mask_b64), np.uint8),
                             bitorder="little")
        index = np.flatnonzero(mask)
        cube = np.arange(4096)
        cube_levels = np.stack([(cube >> (3 * i)) & 7 for i in range(4)], axis=1)
        self.levels = cube_levels[index].astype(np.int8)
        self.points = (2 * self.levels + 1).astype(np.uint8)
        self.map = np.full(4096, -1, np.int32)
        self.map[index] = np.arange(index.size, dtype=np.int32)
        self.neighbours = _neighbours(cube_levels, self.levels.astype(np.int64), self.map, nwant)

    @property
    def size(self) -> int:
        return self.points.shape[0]

    def flat_neighbours(self) -> tuple[np.ndarray, np.ndarray]:
        return flat_neighbours(self.map, self.neighbours)

    def packed(self) -> np.ndarray:
        """The grid as ggml's uint32 table: the 4 levels as bytes, little-endian."""
        return self.points.view("<u4").reshape(-1)


def _neighbours(cube_levels: np.ndarray, grid_levels: np.ndarray, on_grid: np.ndarray,
                nwant: int) -> np.ndarray:
    """For every cube point off the grid: the grid points at its `nwant` smallest distinct
    squared distances, sorted by (distance, index) as ggml's qsort of (d2, index) pairs;
    padded with -1. (ggml measures on the odd-level scale 2l + 1: 4x these distances, the
    same order.)"""
    off = np.flatnonzero(on_grid < 0)
    a = cube_levels[off].astype(np.int16)
    g = grid_levels.astype(np.int16)
    d2 = np.zeros((off.size, g.shape[0]), np.int16)
    for i in range(g.shape[1]):
        d = a[:, i, None] - g[None, :, i]
        d2 += d * d
    cut = d2.min(axis=1)  # the nwant-th smallest distinct distance of each row
    for _ in range(nwant - 1):
        cut = np.where(d2 > cut[:, None], d2, np.int16(1 << 14)).min(axis=1)
    r, j = np.nonzero(d2 <= cut[:, None])
    order = np.lexsort((j, d2[r, j], r))  # by row, then distance, then grid index
    r, j = r[order], j[order]
    counts = np.bincount(r, minlength=off.size)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.full((on_grid.size, int(counts.max())), -1, np.int32)
    out[off[r], np.arange(r.size) - start[r]] = j
    return out


def flat_neighbours(on_grid: np.ndarray, neighbours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's layout of the search tables, for compiled code: (map int32 where a point off
    the grid holds -(1 + offset of its list), lists uint16: each a count followed by that
    many grid indices)."""
    off = np.flatnonzero(on_grid < 0)
    rows = neighbours[off]
    counts = (rows >= 0).sum(axis=1)
    starts = np.concatenate([[0], np.cumsum(counts + 1)[:-1]])
    flat = np.zeros(int((counts + 1).sum()), np.uint16)
    flat[starts] = counts
    r, c = np.nonzero(rows >= 0)
    flat[starts[r] + 1 + c] = rows[r, c]
    fmap = on_grid.astype(np.int32).copy()
    fmap[off] = -(starts + 1)
    return fmap, flat


@cache
def iq3xxs_grid() -> Iq3Grid:
    return Iq3Grid(_MASK_256, nwant=2)


@cache
def iq3s_grid() -> Iq3Grid:
    return Iq3Grid(_MASK_512, nwant=3)
