"""The 2048-point grid of IQ1_S and IQ1_M, and the search tables ggml's `iq2xs_init_impl`
derives from it (for those two types).

A grid point is 8 ternary levels l in {0, 1, 2} (the weight is l - 1 plus a shift); ggml
keys it by l0 | l1 << 2 | ... | l7 << 14. Here it is keyed by its base-3 number
l0 + 3*l1 + ... + 3**7*l7, which sorts the points in the same order, and the grid is stored
as a 6561-bit membership mask over those numbers (base64, bit p of byte p // 8 = point p).

ggml builds neighbour lists for every 2-bit code, but its quantizers only ever look up
points whose levels are all in {0, 1, 2}: those are the ones built here.
"""

from __future__ import annotations

import base64
from functools import cache

import numpy as np

from .grids_iq3 import _neighbours

N_POINTS = 3**8

_MASK = (
    "VSUUhaACQlEIRTGohiCKohoIKiAUhVAUgiBERSUVBaACgiCIGAAIgqADKqCIu6oKkKoLACIACqqMgqAIQFEIRSGI"
    "gFAUQlEIijAImKAIgCoIRSEUhSBIQlUIRQEswqAgiiYAKiSoqqII4q8ICCgoAKACQiiqKCCogCAKmwi5uqggyq6J"
    "oq6qOnzr6rq7gg64IrrK0w6SAiIAIiCoiroKggIIACpK4KI7IiArogCBQIGqiigIIgEUhVAVgiAJRSFUhaAIAiOo"
    "OiCEgiBUQlEIoiAIlVAUAioIuKiCgKBIAiAIgqJoogIoqyoIhSAIgjAIRUAARSEUhaAAQlEARQEpggCKgioIoTAU"
    "BVAUgigIRSEUhSACAiCqKgAgErGKriiouqGqqHAAggoIAigiAoQAggBIgKDqsCqqwiCLuiLq2qeLi26okrAqqnKL"
    "ikQMKiBIhEAoiioIqiDIzKIioq+aoOioAgACACqoiAAggKCLoqIouqCAgjIKur64uv7roqArogiKCijqogChMgIM"
    "+qTq3u8rqC6Nvn7r+vd/v+Z9ut5p+yf/vyb6EunhiiIQqr4OhKoIsqgLgq7/uiTpg4AEYixo8qgKpCsAAioICOKq"
    "EgACgioKpiDJgomQgigAogCMgBMAgggIAGyKqqq7Aqa+iqDKAoBrly7QsukQghAuqt4oFdGlBAAKggCKgiAIAaEg"
    "gqo5uiIyhKAJgBgAiqJiAoEURFEARSGsglAUQlEIqiAoqocKEioIRSEUBaAIQlEIRQEgAqBAoiIAiAAIoghqim64"
    "qqqAACAKguLIIiEIRFAUQlEJiiAVhVAUhgoIqioqgAAKQlEIRSGoAFAUQlEI4iCIggoYgioIqqKqirCLAgoqqiAo"
    "goCqCigIKACpiAIioL4LKLgIirpLsq7/uqT4rqogUihotqAw5oAKAigIImpigCAKAqqqK6rqoqmgoggIECCgiiIA"
    "gg4ARSEUhaAKQFEIRSGpBgBKqgIIpQAQDUQUgigIRSEUBQAIgoKs8iAAAACqCigKuiDqogIAgkgJKOkUABFLRVEA"
    "RQGoAlAUQlEIiCQIiCgKQAgARQEUBaACQFEIRQE="
)


class Iq1Grid:
    """- `levels`: (2048, 8) int8, the levels 0..2 of each grid point (its values are
      levels - 1, as ggml's `iq1s_grid` bytes);
    - `map`: (6561,) int32, the grid index of each ternary point, -1 off the grid;
    - `neighbours`: (6561, k) int32, for each point off the grid the grid points within its 3
      nearest distinct squared distances, by (distance, index), padded with -1."""

    def __init__(self):
        raw = np.frombuffer(base64.b64decode(_MASK), np.uint8)
        mask = np.unpackbits(raw, bitorder="little")[:N_POINTS]
        index = np.flatnonzero(mask)
        cube = np.arange(N_POINTS)
        cube_levels = np.stack([(cube // 3**i) % 3 for i in range(8)], axis=1)
        self.levels = cube_levels[index].astype(np.int8)
        self.map = np.full(N_POINTS, -1, np.int32)
        self.map[index] = np.arange(index.size, dtype=np.int32)
        self.neighbours = _neighbours(cube_levels, self.levels.astype(np.int64), self.map, 3)

    def packed(self) -> np.ndarray:
        """ggml's uint64 table: the 8 values levels - 1 as int8 bytes, little-endian."""
        return (self.levels - 1).astype(np.int8).view("<u8").reshape(-1)


@cache
def iq1s_grid() -> Iq1Grid:
    return Iq1Grid()
