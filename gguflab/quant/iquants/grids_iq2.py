"""The lattices of the 2-bit i-quants and the search tables their quantizers walk.

Every grid point is 8 coordinates, each a level 0, 1 or 2 (the quantizer's odd values
1, 3, 5; the dequantizer's bytes 8, 25, 43). The published grids (256 points for IQ2_XXS,
512 for IQ2_XS, 1024 for IQ2_S) are kept here as their points written in base 3
(coordinate 0 the least significant digit), four hex digits a point, in grid-index order;
everything else is derived from them at import:

- `grid_levels(t)`: (n, 8) uint8 levels of each grid point;
- `grid_bytes(t)`: (n, 8) uint8 dequantized magnitudes (what the dequantizer multiplies);
- `search_tables(t)`: where a point of the 3^8 level cube sits: on the grid (its index) or
  off it (its list of nearest grid points), built the way ggml's `iq2xs_init_impl` builds
  `kmap` / `kneighbors`: the grid points at the `nwant` smallest squared distances, in order
  of (distance, index), so that the quantizers' tie-breaking matches ggml's.

Points are addressed by ggml's packing of levels: 2 bits a coordinate, coordinate i at bits
2i..2i+1, so an address is below 4^8.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

import numpy as np

from ...gguf import GGMLType

_IQ2_XXS = """
0000 0002 0004 0006 0008 000a 000c 0012 0014 0018 001a 001c 001e 0024 002a 002e 0030 0036
0038 003e 004a 0052 0054 005a 005e 006c 008a 0096 00a2 00a4 00b6 00da 00f4 00f6 00fc 0106
0108 010e 0110 0114 0120 012a 012c 0132 013e 0144 0146 014a 0156 0164 0178 017a 0184 019c
019e 01b0 01ce 01e0 01e6 01ea 01ec 01f2 01fe 0202 0204 020a 020c 0222 023a 0252 028a 0294
02da 02dc 02e2 02ec 02f4 0306 0312 0318 031c 032a 0330 033c 034e 0356 0360 0390 039a 03cc
03d2 03de 03e2 03ee 0402 042c 044c 046e 047c 04c0 04c2 04c8 04da 04f6 0510 0514 0558 0586
05b2 05b4 05ba 05d0 05e0 05e8 05ea 061c 0624 0654 0656 06a6 06a8 06ae 06c0 06ce 06f6 0712
0726 0786 079e 07aa 07da 0858 088c 088e 0894 089a 089e 08a0 08a6 08ac 08b4 08b8 08c2 08c4
08ca 08dc 08ee 090a 0912 0916 092e 0936 094e 0956 0960 097e 0984 0990 09b4 09c4 09da 09e4
0a20 0a72 0a74 0a7a 0a8c 0a90 0ac2 0aec 0af0 0afa 0b32 0b52 0b64 0b6a 0b6e 0b74 0b76 0b9a
0ba0 0bb8 0bd2 0c00 0c46 0c96 0c98 0cb0 0cfa 0d20 0d4a 0d54 0d5a 0d7a 0db6 0df2 0e40 0e46
0e58 0e70 0e8e 0eb6 0eee 0f0c 0f30 0f34 0f8a 0f8c 0fba 1040 1116 1118 111e 1132 114e 116a
1176 1182 11c2 120a 120c 1212 1216 1224 1236 125a 127a 129c 12b2 12c6 12d8 12fe 1350 13a8
13f2 13f8 1404 140a 1438 144e 1476 14b0 14e2 14f6 1500 1558 160c 1638 16ca 16ec 1702 1720
176a 17ca 18d2 1902
"""

_IQ2_XS = """
0000 0002 0004 0006 0008 000a 000c 000e 0010 0012 0014 0016 0018 001c 001e 0020 0022 0024
0026 0028 002a 002e 0030 0036 0038 003a 003c 0040 0042 0046 0048 0052 0054 0056 0058 005a
005c 005e 0060 0062 0064 0066 006c 006e 0070 0072 0076 0078 007e 0084 0088 008a 0090 00a2
00a4 00a6 00a8 00ac 00ae 00b4 00be 00c0 00c6 00ca 00d8 00e0 00f4 00f6 00f8 00fa 00fc 00fe
0100 0102 0106 0108 010e 0110 0112 0114 0118 011a 011c 0120 012a 012c 0132 0144 0146 0148
014a 014e 0150 0156 0160 0162 0168 0172 017a 0196 0198 019e 01ac 01b0 01b2 01ce 01e6 01e8
01ea 01ec 01ee 01f0 01f2 01f8 01fc 0202 0204 020a 0210 021c 022e 0236 0238 023a 0240 0252
026e 0274 0288 029a 02a0 02cc 02d0 02da 02dc 02de 02e0 02e2 02e4 02e6 02e8 02ec 02ee 02f4
02f6 02f8 02fa 02fe 0300 0306 030e 0310 0312 0318 032a 032c 032e 0330 0334 0336 033c 0346
0348 034e 0360 036c 036e 037c 037e 0380 0384 0396 03a8 03cc 03ce 03d0 03d2 03d6 03d8 03de
03e8 03ea 03ee 03f0 03fc 0402 041e 0420 0426 0438 046e 047a 0490 04c0 04c2 04c8 04ca 04da
04e6 04fa 0510 0514 0542 0586 05b0 05b2 05b4 05b6 05b8 05ba 05bc 05be 05c4 05ce 05d0 05d6
05e8 05fa 0604 0606 060c 061e 0624 0634 0654 0668 068a 06a2 06a6 06a8 06ae 06be 06c0 06f6
0712 071c 073c 0748 0758 0794 0798 079e 07a0 07aa 07c0 07d4 07e2 081c 0828 0840 084c 0872
0876 0878 088c 088e 0890 0892 0894 0896 0898 089a 089e 08a0 08a6 08a8 08aa 08ac 08ae 08b0
08b2 08b8 08bc 08c2 08c4 08ca 08dc 08de 08e0 08e2 08e6 08e8 08ee 08f8 08fa 0900 0912 0916
0926 092e 0930 0936 0938 0946 0948 097e 0980 0982 0984 0988 098a 098e 0990 099a 099c 09a2
09b4 09c0 09d0 09d2 09d8 09e4 09ea 0a16 0a20 0a28 0a3e 0a44 0a72 0a74 0a7a 0a8c 0a90 0a98
0aa0 0ac2 0acc 0ae0 0ae6 0af6 0b16 0b64 0b66 0b68 0b6a 0b6e 0b70 0b76 0b7c 0b80 0b82 0b88
0b9a 0bb6 0bb8 0bbe 0bc2 0bd0 0bd2 0c06 0c24 0c56 0c58 0c5a 0c60 0c6a 0c72 0c84 0c8e 0ca0
0ca8 0cae 0cde 0ce4 0d0c 0d2c 0d42 0d4a 0d56 0d66 0d6e 0d90 0dac 0db6 0db8 0e26 0e3e 0e40
0e46 0e58 0e64 0e6c 0e78 0e8c 0e8e 0ef4 0f02 0f20 0f30 0f3e 0f8a 0f9c 0fa0 0fcc 1024 1058
108a 10ca 10ec 10f4 1116 1118 111a 111c 1120 1122 1128 1130 1132 1134 113a 114c 114e 1164
1166 1168 116a 116c 1170 1182 118c 1192 11b8 11ca 11ee 11f0 1200 1206 120a 120c 1212 1214
1216 1224 1236 1246 125a 1278 12a6 12ba 12e0 12fc 1302 1312 1328 1332 1334 134a 1352 13b2
13d4 13da 13e2 13ec 13f0 13f2 13f8 140a 1418 1428 1440 1454 1470 14ba 14ce 14e2 14e6 1500
1506 150c 154c 1572 1574 15a0 15fa 1622 1648 1684 16a4 16c8 16ca 16ce 16d0 16da 16e2 1710
173e 1744 1766 176a 176c 1770 1784 17a0 17b2 17d6 17fe 188e 18a2 18b6 18c0 18c2 18c6 18f6
18fc 1902 1938 193a 1968 196a 1990 19a0
"""

_IQ2_S = """
0000 0002 0004 0006 0008 000a 000c 000e 0010 0012 0014 0016 0018 001c 001e 0020 0022 0024
0026 0028 002a 002e 0030 0032 0034 0036 0038 003a 003c 0040 0042 0048 004c 0050 0052 0054
0056 0058 005a 005c 005e 0060 0064 0066 006c 006e 0070 0072 0076 0078 007a 007c 007e 0082
0084 0088 008a 0090 0092 0094 009a 009c 00a2 00a4 00a6 00a8 00ac 00ae 00b4 00bc 00be 00c0
00c2 00c4 00c6 00ca 00d8 00dc 00e0 00e4 00ec 00f4 00f6 00f8 00fa 00fc 00fe 0100 0102 0106
0108 010a 010c 010e 0110 0112 0114 0116 0118 011a 011c 011e 0120 0122 0124 012a 012c 012e
0130 0132 0136 0138 013c 013e 0144 0146 0148 014a 014c 014e 0150 0152 0154 0156 015a 015c
0160 0162 0164 0166 0168 016a 016c 016e 0172 0174 017a 017c 017e 0180 0184 0186 018c 0196
0198 019a 019c 019e 01a2 01b0 01b4 01b6 01ba 01bc 01c2 01cc 01ce 01d4 01e6 01e8 01ea 01ec
01f0 01f2 01f4 01f6 01f8 01fc 0200 0202 0204 0206 0208 020a 020c 020e 0210 0214 0216 021c
0220 0228 0236 0238 023a 0240 0242 0244 0246 024a 0252 0256 0258 025c 025e 0264 026e 0276
0288 0292 0294 029c 02a0 02a2 02ac 02ce 02da 02dc 02de 02e0 02e2 02e4 02e6 02e8 02ec 02ee
02f0 02f4 02f6 02f8 02fa 02fe 0300 0302 0304 0306 0308 030a 030c 0310 0312 0314 0318 031c
031e 0322 0324 032a 032c 032e 0330 0332 0334 0336 0338 033a 033c 033e 0340 0342 0346 0348
034a 034c 034e 0350 0352 0354 0358 035a 0360 0362 0364 0366 036a 036c 037c 037e 0382 0384
0388 038e 0390 0396 039a 03a0 03a2 03b2 03b4 03ba 03cc 03ce 03d0 03d2 03d6 03d8 03da 03dc
03de 03e2 03e4 03e8 03ea 03ec 03ee 03f0 03f2 03f4 03f6 03fa 03fc 0402 0404 0406 0408 040c
040e 0414 041e 0420 0422 0424 0426 0428 042a 042c 0430 0432 0438 043a 043c 043e 0442 0444
044a 0454 0456 045c 046e 0472 0474 0478 047a 0480 048a 048c 0492 04a4 04be 04c0 04c2 04c4
04c6 04c8 04cc 04ce 04d2 04da 04dc 04de 04e0 04e4 04e6 04ec 04f6 04f8 0510 0512 0514 0516
051a 051c 0522 052c 052e 0534 0544 055a 0564 056a 057c 058a 05b2 05b4 05b6 05b8 05bc 05be
05c0 05c2 05c4 05c8 05cc 05ce 05d0 05d6 05d8 05da 05e2 05e8 05f0 05f4 0602 0604 0606 060c
060e 0610 0616 061e 0620 0622 0628 062a 0630 063a 063c 0642 0654 065c 0668 066c 066e 0672
0678 0690 0692 06a2 06a6 06a8 06aa 06ac 06ae 06b2 06b4 06b8 06ba 06c0 06c2 06c4 06c6 06ca
06cc 06d2 06dc 06de 06e4 06f6 06fa 06fc 0700 0702 0708 0712 0714 071a 0728 072c 0748 074a
0750 0762 0772 0798 079c 07a2 07a4 07b4 07b6 07bc 07d6 07e8 07ea 07ec 07f2 082c 0842 084e
086a 0876 0878 088c 088e 0890 0892 0894 0896 0898 089a 089c 089e 08a0 08a2 08a6 08a8 08aa
08ac 08ae 08b0 08b2 08b4 08b6 08b8 08ba 08bc 08c2 08c4 08ca 08ce 08d0 08d4 08d6 08dc 08de
08e0 08e2 08e6 08e8 08ea 08ec 08ee 08f0 08f2 08f8 08fa 08fc 08fe 0900 0902 0904 0906 090a
090c 0912 0914 0916 0918 091c 091e 0924 092e 0930 0936 0938 093a 093c 0942 0948 094c 094e
0952 0954 095a 0964 0966 097e 0980 0982 0984 0986 0988 098a 098c 098e 0990 0992 0994 0996
099a 099c 099e 09a0 09a2 09a4 09a6 09a8 09ac 09ae 09b4 09b6 09b8 09ba 09be 09c0 09c6 09d0
09d2 09d4 09d6 09d8 09da 09dc 09de 09e2 09e4 09ea 09ec 09ee 09f0 09f4 09f6 09fc 0a04 0a06
0a08 0a0e 0a20 0a22 0a24 0a26 0a2a 0a2c 0a32 0a3c 0a3e 0a44 0a56 0a6c 0a72 0a74 0a78 0a7a
0a7c 0a7e 0a80 0a84 0a86 0a8c 0a8e 0a90 0a92 0a96 0a98 0a9e 0aaa 0ab0 0ac2 0ac4 0ac6 0ac8
0acc 0ace 0ad4 0ade 0ae0 0ae6 0af8 0b06 0b14 0b16 0b1c 0b2e 0b64 0b66 0b68 0b6a 0b6e 0b70
0b72 0b74 0b76 0b78 0b7a 0b7c 0b80 0b82 0b84 0b86 0b88 0b8a 0b8c 0b8e 0b92 0b94 0b9a 0b9c
0b9e 0ba0 0ba4 0ba6 0bb6 0bb8 0bba 0bbc 0bbe 0bc0 0bc2 0bc4 0bc8 0bca 0bd0 0bd2 0bd4 0bd6
0bda 0bdc 0be2 0bec 0bee 0bf4 0c06 0c0a 0c0c 0c10 0c12 0c18 0c22 0c24 0c2a 0c3a 0c3c 0c58
0c5a 0c5c 0c5e 0c60 0c62 0c64 0c66 0c6a 0c6c 0c72 0c74 0c76 0c78 0c7c 0c7e 0c84 0c8e 0c90
0c96 0ca8 0caa 0cac 0cae 0cb2 0cb4 0cba 0cc4 0cc6 0ccc 0cde 0cfa 0cfc 0d02 0d10 0d14 0d4a
0d4c 0d4e 0d50 0d54 0d56 0d5c 0d66 0d68 0d6e 0d76 0d80 0d9c 0d9e 0da4 0db6 0dec 0dfc 0e26
0e3a 0e3e 0e40 0e42 0e46 0e48 0e4a 0e4c 0e50 0e52 0e58 0e5c 0e5e 0e62 0e64 0e6a 0e76 0e7c
0e8e 0e90 0e92 0e94 0e98 0e9a 0ea0 0eaa 0eac 0eb2 0ec4 0ed4 0ee2 0ee8 0efa 0f08 0f28 0f30
0f34 0f36 0f3a 0f3c 0f42 0f4c 0f4e 0f54 0f66 0f82 0f84 0f8a 0f9c 0fa4 0fb4 0fc2 0fd2 1014
1024 1026 102c 1054 1068 1074 108e 10e2 110e 1116 1118 111a 111c 1120 1122 1126 1128 112c
1132 1134 113a 113c 113e 1140 1144 114c 1150 1156 1158 1168 116a 116e 1170 1172 1174 1176
117a 117c 1182 1184 1186 1188 118c 118e 119e 11a0 11a6 11b6 11b8 11bc 11c0 11c2 11c4 11d4
11d6 11dc 120a 120c 120e 1210 1212 1214 1216 1218 121c 1224 1226 1228 122a 122e 1230 1236
1240 1242 1248 125a 125c 125e 1260 1264 1266 126c 1276 1278 127e 1290 1298 12ac 12ae 12b4
12c4 12c6 12fc 1300 1306 1308 1318 131a 1320 1346 134e 1350 1368 137e 13b2 13c8 13ca 13d6
13e8 13f0 13f2 13f6 13f8 13fa 13fc 13fe 1404 140a 140c 140e 1410 1414 1416 141c 1426 1428
142e 1440 1444 144a 144c 145c 145e 1464 146c 1492 1494 149a 14ac 14de 14e2 14e4 14e6 14e8
14ec 14ee 14f4 14fe 1500 1506 1518 1526 1534 1536 153c 154e 1578 157c 1584 15a4 15b4 15d6
15d8 15de 15ec 15f0 1624 1626 1648 164c 16b6 16c8 16cc 16d0 16d4 16dc 16e2 16e4 16e6 16ec
1712 1718 1734 174a 176c 1772 177e 1782 1784 17a2 17a6 17a8 17b8 17bc 17be 17c4 17d6 17f8
1806 180c 181c 1882 18b6 18c6 18f8 1926 193a 1956 1958 1962 1964 1968 198c 19a0
"""

_GRIDS = {GGMLType.IQ2_XXS: _IQ2_XXS, GGMLType.IQ2_XS: _IQ2_XS, GGMLType.IQ2_S: _IQ2_S}
# how many distinct distances of nearest grid points an off-grid point keeps
_NWANT = {GGMLType.IQ2_XXS: 2, GGMLType.IQ2_XS: 2, GGMLType.IQ2_S: 1}

LEVEL_BYTES = np.array([8, 25, 43], np.uint8)  # dequantized magnitude of level 0, 1, 2
N_ADDR = 4**8  # addresses: 2 bits a coordinate


@cache
def grid_levels(t: GGMLType) -> np.ndarray:
    """(n_points, 8) uint8: the level (0..2) of each coordinate of each grid point."""
    b3 = np.array([int(w, 16) for w in _GRIDS[t].split()], np.int64)
    out = (b3[:, None] // 3 ** np.arange(8)) % 3
    out = out.astype(np.uint8)
    out.flags.writeable = False
    return out


def grid_bytes(t: GGMLType) -> np.ndarray:
    """(n_points, 8) uint8: the magnitudes the dequantizer scales, per coordinate."""
    return LEVEL_BYTES[grid_levels(t)]


def address(levels: np.ndarray) -> np.ndarray:
    """ggml's 16-bit address of points given as levels (..., 8)."""
    lv = np.asarray(levels).astype(np.int64)
    return (lv << (2 * np.arange(8))).sum(axis=-1)


class SearchTables(NamedTuple):
    """`index[a]`: the grid index of the point at address a, or -1 when it is off the grid.
    For an off-grid a, `flat[start[a]]` is how many candidate grid points it has and the
    candidates follow it, in ggml's order (`start` is -1 on the grid)."""

    index: np.ndarray
    flat: np.ndarray
    start: np.ndarray


@cache
def search_tables(t: GGMLType) -> SearchTables:
    lv = grid_levels(t).astype(np.int32)
    n = lv.shape[0]
    index = np.full(N_ADDR, -1, np.int32)
    index[address(lv)] = np.arange(n, dtype=np.int32)
    # every point of the level cube; only those are ever looked up (levels are clamped to 0..2)
    cube = (np.arange(3**8)[:, None] // 3 ** np.arange(8)) % 3
    addr = address(cube)
    off = np.sort(addr[index[addr] < 0])
    off_lv = ((off[:, None] >> (2 * np.arange(8))) & 3).astype(np.int32)
    # squared distances between the odd lattice values 2l+1, as ggml measures them
    sq_off, sq_grid = (off_lv * off_lv).sum(axis=1), (lv * lv).sum(axis=1)
    d2 = 4 * (sq_off[:, None] + sq_grid[None, :] - 2 * (off_lv @ lv.T))
    order = np.argsort(d2, axis=1, kind="stable")  # by distance, then by grid index
    d2s = np.take_along_axis(d2, order, axis=1)
    # rank of each sorted distance among the distinct distances of its row
    rank = np.zeros(d2s.shape, np.int32)
    np.cumsum(d2s[:, 1:] > d2s[:, :-1], axis=1, out=rank[:, 1:])
    keep = rank < _NWANT[t]
    counts = keep.sum(axis=1).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(1 + counts)[:-1]]).astype(np.int32)
    flat = np.empty(int((1 + counts).sum()), np.int32)
    is_count = np.zeros(flat.size, bool)
    is_count[starts] = True
    flat[starts] = counts
    flat[~is_count] = order[keep]
    start = np.full(N_ADDR, -1, np.int32)
    start[off] = starts
    for arr in (index, flat, start):
        arr.flags.writeable = False
    return SearchTables(index, flat, start)


def signs_with_parity(s7: np.ndarray) -> np.ndarray:
    """The 8 sign bits stored as 7: bit 7 makes the number of set bits even."""
    s7 = np.asarray(s7).astype(np.int64) & 127
    par = np.zeros_like(s7)
    for j in range(7):
        par ^= (s7 >> j) & 1
    return (s7 | (par << 7)).astype(np.uint8)
