"""`gguflab` subcommands, with llama.cpp's flag names where they exist."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .errors import UserError


def cmd_inspect(args: argparse.Namespace) -> int:
    from .catalog import embedded_model
    from .gguf import GGUFReader
    from .inspect import dumps, render_text

    r = GGUFReader(args.file or embedded_model())
    print(dumps(r, args.full) if args.json else render_text(r))
    return 0


def _ggml_name(type_name: str) -> str:
    """ggml's own spelling of a type in logs: q4_K, f16, q8_0."""
    n = type_name.lower()
    return n[:-2] + "_K" if n.endswith("_k") else n


def _shape(ne: list[int]) -> str:
    return ", ".join(f"{d:5d}" for d in (ne + [1] * 4)[:4])


def _parse_quantize_positionals(args: argparse.Namespace) -> None:
    """llama-quantize's forms: IN TYPE [NTHREADS] and IN OUT TYPE [NTHREADS]."""
    from .quant.mixes import is_mix_name

    pos = list(args.positionals)
    if len(pos) < 2:
        raise UserError("usage: gguflab quantize [options] IN.gguf [OUT.gguf] TYPE [NTHREADS]")
    args.input = pos.pop(0)
    if is_mix_name(pos[0]) or len(pos) == 1:
        args.output = None
    else:
        args.output = pos.pop(0)
        if not pos:
            raise UserError("missing quantization type (e.g. Q4_K_M); see gguflab quantize --help")
    args.type = pos.pop(0)
    if pos:
        try:
            args.threads = int(pos.pop(0))
        except ValueError:
            raise UserError("NTHREADS must be a number") from None
    if pos:
        raise UserError(f"unexpected arguments: {' '.join(pos)}")


def cmd_quantize(args: argparse.Namespace) -> int:
    import os

    from . import fmt
    from .events import Finished, Log, Progress, Started, TensorDone
    from .gguf import type_by_name
    from .progress import ProgressBar
    from .quant.mixes import parse_mix
    from .quant.pipeline import QuantizeOptions, quantize_model

    _parse_quantize_positionals(args)
    mix = parse_mix(args.type)

    def tensor_type(text: str | None):
        try:
            return None if text is None else type_by_name(text)
        except ValueError as e:
            raise UserError(str(e)) from None

    out = args.output
    if out is None and not args.dry_run:
        out = os.path.join(os.path.dirname(args.input), f"ggml-model-{mix.name}.gguf")
    opts = QuantizeOptions(
        output_tensor_type=tensor_type(args.output_tensor_type),
        token_embedding_type=tensor_type(args.token_embedding_type),
        quantize_output_tensor=not args.leave_output_tensor, pure=args.pure,
        allow_requantize=args.allow_requantize, dry_run=args.dry_run, threads=args.threads,
        overwrite=args.force, stats=not args.no_stats)
    bar = None
    done = 0
    for ev in quantize_model(args.input, out, mix, opts):
        if isinstance(ev, Started):
            print(f"quantizing '{ev.source}' to '{ev.target or '(dry run)'}' as {mix.name}"
                  f"{f' using {args.threads} threads' if args.threads else ''}")
            bar = ProgressBar(ev.total_bytes)
        elif isinstance(ev, Log):
            if bar:
                bar.clear()
            print(f"{ev.level}: {ev.text}", file=sys.stderr)
        elif isinstance(ev, Progress):
            bar.update(ev.bytes_done)
        elif isinstance(ev, TensorDone):
            bar.clear()
            line = (f"[{ev.index:4d}/{ev.total:4d}] {ev.name:36s} - [{_shape(ev.shape)}], "
                    f"type = {_ggml_name(ev.src_type):>6s}, ")
            mib_in, mib_out = ev.bytes_in / (1 << 20), ev.bytes_out / (1 << 20)
            if ev.converted:
                line += (f"converting to {_ggml_name(ev.dst_type)} .. size = {mib_in:8.2f} MiB"
                         f" -> {mib_out:8.2f} MiB")
                if ev.rmse is not None:
                    line += f" | rmse {ev.rmse:.4f}"
                if args.hist and ev.hist:
                    n = sum(ev.hist) or 1
                    line += " | hist: " + " ".join(f"{h / n:.3f}" for h in ev.hist)
            else:
                line += f"size = {mib_in:8.3f} MiB"
            print(line, flush=True)
            done += ev.bytes_in
            bar.update(done)
        elif isinstance(ev, Finished):
            bar.clear()
            s = ev.stats
            print(f"model size  = {s['model_bytes'] / (1 << 20):8.2f} MiB ({s['model_bpw']:.2f} BPW)")
            print(f"quant size  = {s['quant_bytes'] / (1 << 20):8.2f} MiB ({s['quant_bpw']:.2f} BPW)")
            if s["n_fallback"]:
                print(f"warning: {s['n_fallback']} of {s['n_tensors']} tensor(s) required "
                      "fallback quantization", file=sys.stderr)
            what = "dry run" if ev.path is None else f"wrote {ev.path}"
            print(f"{what} in {fmt.duration(s['seconds'])} ({s['seconds'] * 1e3:.0f} ms)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import time

    from . import fmt
    from .convert.pipeline import ConvertOptions, convert_model
    from .events import Finished, Log, Progress, Started, TensorDone
    from .progress import ProgressBar

    opts = ConvertOptions(outtype=args.outtype, vocab_only=args.vocab_only,
                          dry_run=args.dry_run, overwrite=args.force, threads=args.threads)
    bar, done, t0 = None, 0, time.perf_counter()
    for ev in convert_model(args.model_dir, args.outfile, opts):
        if isinstance(ev, Started):
            what = "vocab only" if ev.info["vocab_only"] else f"{ev.total} tensors"
            print(f"converting {ev.source} ({ev.info['arch']}, {fmt.count(ev.info['n_params'])} "
                  f"parameters, {what}) to {ev.target or '(dry run)'} as {ev.info['outtype']}")
            bar = ProgressBar(ev.total_bytes)
        elif isinstance(ev, Log):
            bar.clear()
            print(f"{ev.level}: {ev.text}", file=sys.stderr)
        elif isinstance(ev, Progress):
            bar.update(ev.bytes_done)
        elif isinstance(ev, TensorDone):
            bar.clear()
            dims = " x ".join(str(d) for d in ev.shape)
            print(f"[{ev.index:{len(str(ev.total))}d}/{ev.total}] Writing tensor {ev.name:32s} | "
                  f"size {dims:>16s} | type {ev.dst_type:4s} | T+{time.perf_counter() - t0:4.0f}",
                  flush=True)
            done += ev.bytes_in
            bar.update(done)
        elif isinstance(ev, Finished):
            bar.clear()
            s = ev.stats
            what = "dry run" if ev.path is None else f"wrote {ev.path}"
            print(f"{what}: {s['n_tensors']} tensors, {fmt.size(s['bytes'])} "
                  f"({s['bpw']:.2f} bits per weight) in {fmt.duration(s['seconds'])}")
    return 0


def _quantize_help() -> str:
    from .quant.mixes import MIXES

    lines = ["Allowed quantization types (sizes and ppl as llama.cpp measured them):"]
    for m in MIXES:
        lines.append(f"  {int(m.ftype):3d}  or  {m.name:8s}: {m.hint}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gguflab",
        description=(
            "Convert, quantize, test and chat with GGUF models. With no command, "
            "shows the embedded default model (SmolLM2-135M-Instruct)."
        ),
    )
    p.add_argument("--version", action="version", version=f"gguflab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("inspect", help="show a GGUF file's metadata and tensors (like gguf-dump)")
    s.add_argument("file", nargs="?", help="GGUF file (default: the embedded SmolLM2 model)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--full", action="store_true", help="with --json: every array item")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser(
        "quantize", help="quantize a GGUF model (like llama-quantize)",
        usage="gguflab quantize [options] IN.gguf [OUT.gguf] TYPE [NTHREADS]",
        epilog=_quantize_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("positionals", nargs="+", metavar="IN.gguf [OUT.gguf] TYPE [NTHREADS]")
    s.add_argument("--allow-requantize", action="store_true",
                   help="allow requantizing already quantized tensors (quality drops)")
    s.add_argument("--leave-output-tensor", action="store_true",
                   help="leave output.weight unquantized")
    s.add_argument("--pure", action="store_true",
                   help="every tensor in the default type: no mix of k-quant types")
    s.add_argument("--output-tensor-type", metavar="TYPE", help="type of output.weight")
    s.add_argument("--token-embedding-type", metavar="TYPE", help="type of token_embd.weight")
    s.add_argument("--dry-run", action="store_true",
                   help="print the per-tensor plan and the final size; write nothing")
    s.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    s.add_argument("-f", "--force", action="store_true", help="overwrite an existing output")
    s.add_argument("--no-stats", action="store_true",
                   help="skip the per-tensor RMSE and histogram (a little faster)")
    s.add_argument("--hist", action="store_true", help="print each tensor's level histogram")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("convert", help="convert a Hugging Face model folder to GGUF "
                                       "(like convert_hf_to_gguf.py)")
    s.add_argument("model_dir", metavar="MODEL_DIR")
    s.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0", "auto"],
                   help="type of the 2-D weights (default f16; auto: bf16 for bf16 "
                        "checkpoints, else f16)")
    s.add_argument("--outfile", help="output path (default MODEL_DIR/ggml-model-OUTTYPE.gguf)")
    s.add_argument("--vocab-only", action="store_true", help="write the tokenizer only")
    s.add_argument("--dry-run", action="store_true", help="plan only; write nothing")
    s.add_argument("-t", "--threads", type=int, default=None)
    s.add_argument("-f", "--force", action="store_true", help="overwrite an existing output")
    s.set_defaults(func=cmd_convert)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        try:  # metadata may hold bytes that are not UTF-8: show them, never crash on them
            stream.reconfigure(errors="backslashreplace")
        except AttributeError:
            pass
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["inspect", *(argv or [])])
    try:
        return args.func(args)
    except UserError as e:
        print(f"gguflab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gguflab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gguflab inspect | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
