"""Collecting an importance matrix as llama-imatrix does: the text cut into chunks of n_ctx
tokens (the first of each made BOS), each chunk run through the model, and for every
product with a `blk.*` weight (and `output.weight` when asked) the squares of its input
activations summed per column, with the number of tokens; stacked experts per expert, over
the tokens routed to it. The running perplexity of each chunk's second half is the
progress line, as llama-imatrix prints it."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence

import numpy as np

from ..errors import UserError
from ..events import Event, Finished, Log, Measured, Progress, Started
from .file import DEFAULT_CHUNK_SIZE, Entry, Imatrix, combine, load, save


class Collector:
    """Per weight: float32 sums of x^2 (n_mat, n_in) and integer token counts (n_mat,),
    added to in the order llama-imatrix's callback adds (row after row, in float32)."""

    def __init__(self, chunk_size: int, n_expert: int = 0, process_output: bool = False,
                 start: Imatrix | None = None):
        self.chunk_size = chunk_size
        self.n_expert = n_expert
        self.process_output = process_output
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.datasets: list[str] = []
        if start is not None:  # --in-file: collection adds onto the loaded sums
            for name, e in start.entries.items():
                self.sums[name] = np.array(e.in_sum2, np.float32)
                self.counts[name] = np.round(np.asarray(e.counts, np.float64)).astype(np.int64)
            self.datasets = list(start.datasets)
        self._saved: tuple[dict, dict] | None = None

    def wants(self, name: str) -> bool:
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def __call__(self, name: str, x: np.ndarray, expert: int | None) -> None:
        if not self.wants(name) or len(x) == 0:
            return
        n_in = x.shape[-1]
        if expert is None:
            sums = self.sums.get(name)
            counts = self.counts.get(name)
            if counts is not None and len(counts) > 1 and (counts == counts[0]).all():
                counts = self.counts[name] = counts[:1].copy()  # one count for a dense weight
            if sums is None:
                sums = self.sums[name] = np.zeros((1, n_in), np.float32)
                counts = self.counts[name] = np.zeros(1, np.int64)
            elif sums.size != n_in:
                raise UserError(f"inconsistent size for {name} ({sums.size} vs {n_in})")
            row = sums.reshape(-1)
            counts += len(x)
        else:
            n_as = self.n_expert
            sums = self.sums.get(name)
            if sums is None:
                sums = self.sums[name] = np.zeros((n_as, n_in), np.float32)
                self.counts[name] = np.zeros(n_as, np.int64)
            elif sums.size != n_as * n_in:
                raise UserError(f"inconsistent size for {name} ({sums.size} vs {n_as * n_in})")
            sums = self.sums[name] = sums.reshape(n_as, n_in)
            if len(self.counts[name]) == 1 and n_as > 1:  # broadcast an old file's count
                self.counts[name] = np.full(n_as, self.counts[name][0], np.int64)
            row = sums[expert]
            self.counts[name][expert] += len(x)
        # acc[j] += x[j]^2 token after token: numpy reduces over rows in that order
        x = np.asarray(x, np.float32)
        row[:] = np.add.reduce(np.concatenate([row[None], x * x]), axis=0)
        if not np.isfinite(row).all():
            raise UserError(f"non-finite values detected in {name}")

    def checkpoint(self) -> None:
        """Remember the state after a whole chunk (a cut-short chunk is rolled back)."""
        self._saved = ({k: v.copy() for k, v in self.sums.items()},
                       {k: v.copy() for k, v in self.counts.items()})

    def rollback(self) -> None:
        if self._saved is not None:
            self.sums, self.counts = self._saved

    def result(self, datasets: Sequence[str] = ()) -> Imatrix:
        entries = {}
        max_count = 0
        for name in sorted(self.sums):
            c = self.counts[name]
            entries[name] = Entry(self.sums[name].reshape(len(c), -1).copy(),
                                  c.astype(np.float32))
            max_count = max(max_count, int(c.max()) if len(c) else 0)
        return Imatrix(entries, [*self.datasets, *datasets], max_count // self.chunk_size,
                       self.chunk_size)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None


def chunk_log_probs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) under each row's softmax, as llama-imatrix's log_softmax (float64
    sum of exponentials)."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(-1))
    return x[np.arange(len(targets)), targets] - m[:, 0] - lse


def collect_imatrix(model: str | None = None, text_file: str | None = None,
                    output: str = "imatrix.gguf", n_ctx: int = DEFAULT_CHUNK_SIZE,
                    chunks: int = -1, process_output: bool = False,
                    output_frequency: int = 10, in_files: Sequence[str] = (),
                    output_format: str = "gguf", threads: int | None = None,
                    n_gpu_layers: int | str = 0, compute_ppl: bool = True) -> Iterator[Event]:
    """llama-imatrix as a job: load `in_files` (summed), then, given `text_file`, collect
    over it with `model` and save to `output` every `output_frequency` chunks and at the
    end. Closing the generator (a cancel) or Ctrl-C saves what whole chunks gave."""
    t0 = time.perf_counter()
    if n_ctx <= 0:
        raise UserError(f"--ctx-size {n_ctx}: imatrix needs a context size > 0")
    if output_format not in ("gguf", "dat"):
        raise UserError(f"--output-format {output_format!r}: use gguf or dat")
    if output_frequency <= 0:
        raise UserError(f"--output-frequency {output_frequency}: give 1 or more")
    loaded = [load(f) for f in in_files]
    start = combine(loaded, n_ctx) if loaded else None
    if start is not None:
        yield Log("info", f"loaded {len(loaded)} imatrix file(s): {len(start.entries)} entries,"
                          f" {start.chunk_count} chunks")
    if not text_file:
        if start is None:
            raise UserError("no text (-f) and no imatrix to combine (--in-file)")
        yield Started("imatrix", ", ".join(in_files), output, 1, 0, {"combine": True})
        save(start, output, output_format)
        yield Progress(1, 1)
        yield Finished(output, {"entries": len(start.entries), "chunks": start.chunk_count,
                                "seconds": time.perf_counter() - t0})
        return

    from ..catalog import embedded_model
    from ..runner.load import load_model
    from ..runner.model import observe_inputs

    text = _read_text(text_file)
    if n_gpu_layers:
        yield Log("warning", "imatrix collects on the CPU: the GPU path has no activation "
                             "hook yet, so -ngl is ignored")
    lm = load_model(model or embedded_model(), n_ctx, 0, threads)
    m, tok = lm.model, lm.tokenizer
    tokens = tok.encode(text, add_special=True, parse_special=False)
    if len(tokens) < 2 * n_ctx:
        raise UserError(f"{text_file}: you need at least {2 * n_ctx} tokens for a context of "
                        f"{n_ctx} tokens; the text tokenizes to only {len(tokens)}")
    n_chunk = len(tokens) // n_ctx
    if chunks is not None and chunks >= 0:
        n_chunk = min(n_chunk, chunks)
    col = Collector(n_ctx, m.hp.n_expert, process_output, start)
    yield Started("imatrix", m.path, output, n_chunk, 0,
                  {"n_tokens": len(tokens), "n_ctx": n_ctx, "text": text_file,
                   "format": output_format})
    yield Log("info", f"computing over {n_chunk} chunks, n_ctx={n_ctx}")
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    done = 0
    finished = False
    try:
        col.checkpoint()
        for i in range(n_chunk):
            t_chunk = time.perf_counter()
            chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
            if tok.add_bos and tok.bos_id is not None:
                chunk[0] = tok.bos_id
            with observe_inputs(col):
                logits = m.forward(chunk, m.new_cache(n_ctx), all_logits=True)
            col.checkpoint()
            done = i + 1
            if i == 0:
                secs = time.perf_counter() - t_chunk
                yield Log("info", f"{secs:.2f} seconds per pass - ETA "
                                  f"{secs * n_chunk / 60:.2f} minutes")
            ppl = None
            if compute_ppl:
                targets = np.asarray(tokens[i * n_ctx + first + 1:(i + 1) * n_ctx])
                lp = chunk_log_probs(logits[first:n_ctx - 1], targets)
                nll += float(-lp.sum())
                nll2 += float((lp * lp).sum())
                count += len(lp)
                ppl = math.exp(nll / count)
            if done % output_frequency == 0 and done < n_chunk:
                save(col.result([text_file]), output, output_format)
                yield Log("info", f"saved after {done} chunks to {output}")
            yield Progress(done, n_chunk)
            yield Measured("imatrix_chunk", {"chunk": done, "chunks": n_chunk, "ppl": ppl})
        finished = True
    finally:
        if not finished:  # cancelled or interrupted: keep the whole chunks
            col.rollback()
            if done:
                save(col.result([text_file]), output, output_format)
    im = col.result([text_file])
    save(im, output, output_format)
    stats = {"entries": len(im.entries), "chunks": n_chunk, "n_ctx": n_ctx,
             "seconds": time.perf_counter() - t0}
    if compute_ppl and count:
        mean = nll / count
        var = nll2 / count - mean * mean
        ppl = math.exp(mean)
        stats["ppl"] = ppl
        stats["ppl_err"] = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0
        yield Log("info", f"Final estimate: PPL = {ppl:.4f} +/- {stats['ppl_err']:.5f}")
    yield Finished(output, stats)


def imatrix_statistics(im: Imatrix) -> list[dict]:
    """Per-tensor statistics as llama-imatrix --show-statistics computes them (float32, on
    sums over counts, experts with no tokens left out), sorted as it sorts them."""
    rows = []
    for name in sorted(im.entries):
        e = im.entries[name]
        counts = np.round(np.asarray(e.counts, np.float64)).astype(np.int64)
        if im.legacy:
            sums = [np.asarray(e.in_sum2, np.float32).reshape(-1)]
            cnts = [counts[0]]
        else:
            sums = list(np.asarray(e.in_sum2, np.float32).reshape(len(counts), -1))
            cnts = list(counts)
        acts = [s / np.float32(c) for s, c in zip(sums, cnts) if c != 0]
        if not acts:
            continue
        a = np.concatenate(acts).astype(np.float32)
        total = np.float32(np.cumsum(a, dtype=np.float32)[-1])  # std::accumulate's order
        mean = np.float32(total / np.float32(a.size))
        sq = np.float32(np.cumsum(a * a, dtype=np.float32)[-1])
        var = np.float32(sq / np.float32(a.size)) - mean * mean
        dev = np.float32(np.sqrt(max(np.float32(0), var)))
        n32 = np.float32(a.size)
        active = 1 - np.float32(np.count_nonzero(np.abs(a) <= np.float32(1e-5))) / n32
        entropy = 0.0
        if total > 0:
            p = a / total
            p = p[p > 0]
            entropy = float(-np.cumsum(p * np.log2(p), dtype=np.float32)[-1]) if p.size else 0.0
        zd = np.float32(np.count_nonzero((a - mean) / dev > 1)) / n32 if dev > 0 else 0.0
        rows.append({"tensor": name, "values": np.asarray(e.in_sum2, np.float32).reshape(-1),
                     "sum": float(total), "min": float(a.min()), "max": float(a.max()),
                     "mean": float(mean), "std": float(dev), "active": float(active),
                     "n": int(a.size), "entropy": entropy, "zd": float(zd), "cossim": 0.0})
    by_name = {r["tensor"]: r for r in rows}
    for r in rows:  # cosine similarity with the same tensor one layer up
        layer, short = _layer_and_name(r["tensor"])
        if layer.isdigit():
            prev = by_name.get(r["tensor"].replace(f"blk.{layer}.", f"blk.{int(layer) - 1}.", 1))
            if prev is not None and prev["values"].size == r["values"].size:
                a, b = r["values"], prev["values"]
                dp, ma, mb = (_dot32(a, b), np.sqrt(_dot32(a, a)), np.sqrt(_dot32(b, b)))
                r["cossim"] = float(dp / (ma * mb))
    rows.sort(key=lambda r: (_layer_and_name(r["tensor"])[1], -r["sum"]))
    return rows


def _dot32(a: np.ndarray, b: np.ndarray) -> np.float32:
    """std::inner_product in float32: one product after another."""
    return np.cumsum(a * b, dtype=np.float32)[-1]


def _layer_and_name(tensor: str) -> tuple[str, str]:
    """("3", "attn_q") for blk.3.attn_q.weight, as llama-imatrix splits names ("-" when
    there is no block)."""
    parts = tensor.split(".")
    layer = next((parts[i + 1] for i in range(len(parts) - 1) if parts[i] == "blk"), "-")
    short = next((parts[i - 1] for i in range(1, len(parts)) if parts[i] == "weight"), "")
    return layer, short or tensor


def format_statistics(im: Imatrix, source: str) -> str:
    """llama-imatrix's statistics tables: per tensor, then weighted per layer."""
    rows = imatrix_statistics(im)
    out = [f"Computing statistics for {source} ({len(rows)} tensors)", "",
           "\t".join([" Layer", "       Tensor", "          Σ(Act²)", "  Min",
                      "            Max", "           μ", "   σ", " % Active", "N",
                      "   Entropy", "E (norm)", "ZD", "  CosSim"]),
           "=" * 171]
    layers: dict[int, list] = {}  # float32 sums, as llama-imatrix keeps them
    for r in rows:
        layer, name = _layer_and_name(r["tensor"])
        norm = 100 * r["entropy"] / math.log2(r["n"]) if r["n"] > 1 else 0.0
        out.append(f"{layer:>5s}\t{name:<20s}\t{r['sum']:10.2f}\t{r['min']:8.4f}\t"
                   f"{r['max']:11.4f}\t{r['mean']:6.2f}\t{r['std']:6.2f}\t"
                   f"{100 * r['active']:8.2f}%\t{r['n']:6d}\t{r['entropy']:10.4f}\t"
                   f"{norm:6.2f}%\t{100 * r['zd']:10.2f}%\t{r['cossim']:8.4f}")
        blk = int(layer) if layer.isdigit() else -1
        w = layers.setdefault(blk, [np.float32(0)] * 3 + [0])
        n32 = np.float32(r["n"])
        for i, key in enumerate(("sum", "zd", "cossim")):
            w[i] = np.float32(w[i] + n32 * np.float32(r[key]))
        w[3] += r["n"]
    n_layers = sum(1 for k in layers if k >= 0)
    out += ["", f"Computing weighted average statistics per layer ({n_layers} layers)", "",
            "\t".join(["  Layer", "     μΣ(Act²)", "      μZD", "μCosSim"]), "=" * 48]
    for blk in sorted(layers):
        b, zd, cs, n = layers[blk]
        if blk >= 0 and n:
            n32 = np.float32(n)
            out.append(f"{blk:5d}\t{b / n32:14.2f}\t{100 * (zd / n32):10.4f}%\t"
                       f"{cs / n32:6.4f}")
    return "\n".join(out)
