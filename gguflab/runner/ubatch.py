"""A prompt's batch of tokens through the CPU layers as one compiled `Program`.

`Model.forward` on a batch walks the layers from Python: per layer some fifteen products,
norms, roundings, rotations and additions, each handed to the thread team and waited for.
Between them the other threads idle while Python prepares the next call (the additions of
the residual ran in numpy on one thread). A `UBatch` lays the whole batch out once: every
product's job record (`kernels.prompt_job`), the roundings of their inputs, the norms, RoPE,
GLUs and additions as row-parallel jobs (`program.rows_job`), the KV cache writes and the
transposed keys of the tiled attention as serial steps, and the attention as one job; then
runs it per batch with only the position's words rewritten, as `ggml_graph_compute` runs a
graph. The kernels are the general route's, so the bits are the same (tested).

What the program does not lay out (experts, attention without flash attention, watched
products, offloaded layers, batches under one tile of queries) takes the general route.
"""

from __future__ import annotations

import ctypes

import numpy as np

from ..jit.parallel import JOB_WORDS, SLICES_PER_THREAD, JobTable, team
from . import kernels as K
from . import repack
from .attention import TILE, TILED
from .attention import _kernels as attn_kernels
from .kernels import data_address
from .program import Program, f32_bits, rows_job
from .program import kernels as program_kernels
from .rope import _kernels as rope_kernels

F32 = np.float32


class UBatch:
    """`n` tokens at any position of `cache` through the model's layers, the rows before
    `skip` dropped after the last layer's attention (their logits are not asked for), on
    `threads` threads. `program` is None where the model needs a step this does not take."""

    def __init__(self, m, cache, n: int, skip: int, threads: int):
        self.n, self.skip, self.threads = n, skip, threads
        hp = m.hp
        self.x = np.empty((n, hp.n_embd), F32)
        self.rope_rows: dict[bool, np.ndarray] = {}
        self.cache_shape = cache.k.shape  # (any cache of this shape: its address varies)
        self.program = self._build(m, cache)

    def run(self, m, x: np.ndarray, p0: int, cache) -> np.ndarray:
        """x (n, n_embd) at positions p0 .. p0 + n - 1 through the layers; returns the
        rows from `skip` on (a view of this batch's buffer, valid until the next run)."""
        n = self.n
        self.x[...] = x
        pos = np.arange(p0, p0 + n)
        for local, table in self.rope_rows.items():
            table[...] = m._rope_tables(pos, local, cache.n_ctx)
        t = p0 + n
        if cache.k.shape != self.cache_shape or cache.v.shape != self.cache_shape:
            raise ValueError(f"a batch laid out for a cache of {self.cache_shape}, given "
                             f"{cache.k.shape}")
        self.program.run(team(self.threads), p0=p0, t=t, tpad=-(-t // TILE) * TILE,
                         k=data_address(cache.k), v=data_address(cache.v))
        return self.x[self.skip:]

    def _build(self, m, cache) -> Program | None:
        hp = m.hp
        n, skip, threads = self.n, self.skip, self.threads
        # (the cache's dtype, -fa off, a watcher and short batches: `Model._ubatch` decides)
        if cache.k.shape[0] < hp.n_layer or any(L.experts is not None for L in m.layers):
            return None
        from .model import gelu_table

        E, hd, n_head, n_kv, n_ctx = hp.n_embd, hp.head_dim, hp.n_head, hp.n_head_kv, cache.n_ctx
        nq, nk = n_head * hd, n_kv * hd
        steps = program_kernels()
        prog = Program()
        keep = prog.keep
        eps = f32_bits(hp.rms_eps)
        parts = SLICES_PER_THREAD * threads if threads > 1 else 1

        def buf(*shape, dtype=F32):
            a = np.empty(shape, dtype)
            keep.append(a)
            return a

        def vec(a):  # a float32 vector the jobs read by address
            a = np.ascontiguousarray(a, F32)
            keep.append(a)
            return data_address(a)

        X = self.x
        H, A = buf(n, E), buf(n, E)
        Q, Kx, V = buf(n, nq), buf(n, nk), buf(n, nk)
        QR, KR, ATT = buf(n, n_head, hd), buf(n, n_kv, hd), buf(n, nq)
        n_ff = max(L.w_gate.data.shape[0] for L in m.layers)
        G, U, ACT = buf(n, n_ff), buf(n, n_ff), buf(n, n_ff)
        KT = buf(n_kv * hd * (-(-n_ctx // TILE) * TILE))
        rounded: dict[tuple, np.ndarray] = {}  # (x buffer, kind, integer form) -> rounded
        # float products' scratch: one a product in a phase (they run side by side)
        need = 0
        for L in m.layers:
            for W in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down):
                p = K._plan(W.type)
                if not p.int_dot:
                    n_in = W.data.shape[1] * W.data.itemsize // p.type_size * p.block
                    need = max(need, K.prompt_scratch_floats(p, n_in))
        scratch = [buf(need * parts) if need else None for _ in range(3)]

        def rows(fn, n_rows, ptrs, more=(), unit=1):
            prog.parallel([rows_job(fn, n_rows, ptrs, more, unit, parts)])

        def norm(src, w, dst, n_rows, width):
            rows(steps["rms_norm_step"], n_rows, [(data_address(src), 4 * width), (vec(w), 0),
                                                  (data_address(dst), 4 * width)], (width, eps))

        def add(dst, a, n_rows, width):
            rows(steps["add_step"], n_rows, [(data_address(dst), 4 * width), (data_address(a), 4 * width),
                                             (data_address(dst), 4 * width)], unit=width)

        def products(weights, x, ys, r0=0) -> bool:
            """The products of x's rows [r0:] with `weights` into `ys` (their rows [r0:]): a
            phase of x's roundings, then a phase of the products."""
            m_tok = n - r0
            rounds, packs, recs, done = [], [], [], set()
            for j, (W, y) in enumerate(zip(weights, ys)):
                p = K._plan(W.type)
                w = p.weight(W.data)
                n_out = w.shape[0]
                n_in = w.shape[1] * w.itemsize // p.type_size * p.block
                if n_in != x.shape[1] or n_out != y.shape[1] or n_in % K.FLOAT_GROUP:
                    return False
                yv = y[r0:]
                r = K.route(p, m_tok, n_out)
                kind, int_path = r.x_kind, r.int_x
                if not int_path and kind in K._Q8_KINDS:
                    return False  # (x rounded to Q8 levels as floats: a step not laid out)
                key = (id(x), kind, int_path)
                if key not in rounded:
                    rounded[key] = x if kind is None else buf(
                        n, K.xq_row_bytes(n_in), dtype=np.uint8) if int_path else buf(n, n_in)
                if kind is not None and key not in done:  # (rounded anew for each use)
                    done.add(key)
                    rounds.append(K.round_job(kind, data_address(x[r0:]), m_tok, n_in,
                                              data_address(rounded[key][r0:]), threads))
                xr = rounded[key][r0:]
                if r.gemv:
                    table = JobTable()
                    seen = {(p.act, int_path): xr}
                    K._add_gemv(table, p, w, xr, yv, n_out, m_tok, n_in, n_out, threads, seen)
                    keep.extend((xr, yv, w))  # (the records hold these objects' ids)
                    recs.extend(np.frombuffer(table.buf, np.int64, table.n * JOB_WORDS)
                                .reshape(-1, JOB_WORDS).tolist())
                    continue
                ldx = xr.shape[1] if int_path else n_in
                if r.repacked:  # x packed once per type
                    pkey = (id(x), "packed", p.t)
                    if pkey not in rounded:
                        rounded[pkey] = buf(max(1, repack.packed_bytes(p.t, n, n_in)),
                                            dtype=np.uint8)
                    pack, jobs = repack.prompt_jobs(w, p.t, data_address(xr), ldx, data_address(yv),
                                                    y.shape[1], m_tok, n_in, n_out, threads,
                                                    data_address(rounded[pkey]))
                    if pkey not in done:
                        done.add(pkey)
                        packs.extend(pack)
                    keep.append(w)
                    recs.extend(jobs)
                    continue
                if int_path:
                    rec = K.prompt_job(p, w, data_address(xr), ldx, data_address(yv), y.shape[1], m_tok, n_in,
                                       n_out, threads)
                else:
                    rec = K.prompt_job(p, w, data_address(xr), ldx, data_address(yv), y.shape[1], m_tok, n_in,
                                       n_out, threads, scratch=scratch[j])
                keep.append(w)
                recs.append(rec)
            for phase in (rounds, packs, recs):
                if phase:
                    prog.parallel(phase)
            return True

        rope_fn = ctypes.cast(rope_kernels()["rope_rotate"], ctypes.c_void_p).value
        attn = attn_kernels()["attn_f32"]
        floats = int(np.array([hp.q_scale, hp.attn_softcap], F32).view(np.int64)[0])
        glu = steps["geglu_step"] if hp.family.gelu else steps["swiglu_step"]
        last = len(m.layers) - 1
        for il, L in enumerate(m.layers):
            norm(X, L.attn_norm, H, n, E)
            if not products([L.wq, L.wk, L.wv], H, [Q, Kx, V]):
                return None
            if L.bq is not None:
                for y, bias, width in ((Q, L.bq, nq), (Kx, L.bk, nk), (V, L.bv, nk)):
                    rows(steps["bias_step"], n, [(data_address(y), 4 * width), (vec(bias), 0),
                                                 (data_address(y), 4 * width)], (width,))
            if L.q_norm is not None:
                norm(Q, L.q_norm, Q, n * n_head, hd)
                norm(Kx, L.k_norm, Kx, n * n_kv, hd)
            local = bool(hp.swa_layers) and hp.swa_layers[il]
            table = self.rope_rows.setdefault(local, np.empty((n, hp.rope_dim), F32))
            neox = int(hp.rope_neox)
            prog.parallel([rows_job(rope_fn, n, [(data_address(src), 4 * width), (data_address(dst), 4 * width),
                                                 (data_address(table), 4 * hp.rope_dim)],
                                    (heads, hd, hp.rope_dim, neox), 1, parts)
                           for src, dst, width, heads in ((Q, QR, nq, n_head),
                                                          (Kx, KR, nk, n_kv))])
            # the cache's layer: its address plus the layer's offset (any cache of the shape)
            layer = 4 * il * n_kv * n_ctx * hd
            for src, var in ((KR, "k"), (V, "v")):
                for j in range(n_kv):
                    w = prog.step(steps["store_f16_step"], data_address(src) + 4 * j * hd, 0, n, hd,
                                  hd, nk)
                    prog.vary("p0", w, 2, layer + 4 * j * n_ctx * hd, 4 * hd)
                    prog.vary(var, w, 2)
            w = prog.step(steps["keys_t_step"], 0, data_address(KT), n_kv, hd, n_ctx * hd, 0, 0)
            prog.vary("k", w, 1, layer)
            prog.vary("t", w, 6)
            prog.vary("tpad", w, 7)
            w = prog.job(attn, max(1, min(n * n_head, parts)), data_address(QR), 0, 0, data_address(KT),
                         data_address(ATT), n | TILED << 32, n_head, n_head // n_kv, hd, n_ctx * hd, 0,
                         0, hp.n_swa if local else 0, floats)
            prog.vary("k", w, 2 + 1, layer)
            prog.vary("v", w, 2 + 2, layer)
            prog.vary("tpad", w, 2 + 10)
            prog.vary("p0", w, 2 + 11)
            if not products([L.wo], ATT, [A]):
                return None
            r0 = skip if il == last else 0  # (the rows whose logits nobody asked for leave)
            rows_left = n - r0
            if L.attn_post_norm is not None:
                norm(A[r0:], L.attn_post_norm, A[r0:], rows_left, E)
            add(X[r0:], A[r0:], rows_left, E)
            norm(X[r0:], L.ffn_norm, H[r0:], rows_left, E)
            n_ff = L.w_gate.data.shape[0]
            g, u, act = G[:, :n_ff], U[:, :n_ff], ACT[:, :n_ff]
            if n_ff != G.shape[1]:  # (layers of another width: their own contiguous rows)
                g, u, act = (buf(n, n_ff) for _ in range(3))
            if not products([L.w_gate, L.w_up], H, [g, u], r0):
                return None
            rows(glu, rows_left, [(data_address(g[r0:]), 4 * n_ff), (data_address(u[r0:]), 4 * n_ff),
                                  (data_address(act[r0:]), 4 * n_ff)],
                 (data_address(gelu_table()),) if hp.family.gelu else (), unit=n_ff)
            if not products([L.w_down], act, [A], r0):
                return None
            if L.ffn_post_norm is not None:
                norm(A[r0:], L.ffn_post_norm, A[r0:], rows_left, E)
            add(X[r0:], A[r0:], rows_left, E)
        keep.append(gelu_table())
        return prog.build()
