"""`gguflab` subcommands, with llama.cpp's flag names where they exist."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import closing

from . import __version__
from .errors import UserError
from .signals import Interrupted


def tui_dirs(models_dir: list[str] | None) -> list[str] | None:
    """The folders the TUI scans: those given (plus the embedded model), else its default."""
    import os

    from .catalog import embedded_model

    if not models_dir:
        return None
    for d in models_dir:
        if not os.path.exists(d):
            raise UserError(f"--models-dir {d}: no such folder")
    try:
        return [*models_dir, embedded_model()]
    except UserError:
        return list(models_dir)


def cmd_tui(args: argparse.Namespace) -> int:
    dirs = tui_dirs(args.models_dir)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UserError("the TUI needs a terminal; see `gguflab --help` for the commands")
    from .tui.app import GgufLabApp

    GgufLabApp(dirs).run()
    return 0


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
    from .quant.mixes import (
        parse_mix,
        parse_prune_layers,
        parse_tensor_type,
        parse_tensor_type_file,
    )
    from .quant.pipeline import QuantizeOptions, parse_kv_override, quantize_model

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
    tensor_types = []  # in command-line order: the first matching pattern wins
    for kind, text in args.tensor_types:
        if kind == "file":
            tensor_types += parse_tensor_type_file(text)
        else:
            tensor_types.append(parse_tensor_type(text))
    if args.include_weights and args.exclude_weights:
        raise UserError("--include-weights and --exclude-weights cannot be used together")
    opts = QuantizeOptions(
        output_tensor_type=tensor_type(args.output_tensor_type),
        token_embedding_type=tensor_type(args.token_embedding_type),
        quantize_output_tensor=not args.leave_output_tensor, pure=args.pure,
        allow_requantize=args.allow_requantize, dry_run=args.dry_run, threads=args.threads,
        overwrite=args.force, stats=not args.no_stats, tensor_types=tensor_types,
        imatrix=args.imatrix, include_weights=args.include_weights,
        exclude_weights=args.exclude_weights,
        kv_overrides=[parse_kv_override(kv) for kv in args.override_kv],
        prune_layers=parse_prune_layers(args.prune_layers) if args.prune_layers else [])
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
                if ev.note:
                    line += " (fallback)" if "falling back" in ev.note else f" ({ev.note})"
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


def _load_model(args: argparse.Namespace):
    """(model, tokenizer, n_ctx) for run, chat and perplexity; the offload plan is printed."""
    from .catalog import embedded_model
    from .runner.load import load_model

    lm = load_model(args.model or embedded_model(), args.ctx_size,
                    getattr(args, "n_gpu_layers", 0), getattr(args, "threads", None),
                    getattr(args, "main_gpu", 0))
    lm.model.flash_attn = getattr(args, "flash_attn", "auto")
    from .runner import repack

    repack.REPACK = not getattr(args, "no_repack", False)
    if lm.plan is not None:
        print(f"gguflab: {lm.plan.summary()}", file=sys.stderr)
        args.offload_plan = lm.plan
    return lm.model, lm.tokenizer, lm.n_ctx


def _sampler(args: argparse.Namespace):
    from .runner.sampling import Sampler, SamplerParams

    return Sampler(SamplerParams(temp=args.temp, top_k=args.top_k, top_p=args.top_p,
                                 min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                                 repeat_last_n=args.repeat_last_n,
                                 seed=None if args.seed < 0 else args.seed))


def _read_prompt(args: argparse.Namespace) -> str:
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise UserError(f"{args.file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{args.file}: not UTF-8 text (byte {e.start}: "
                            f"{e.object[e.start:e.start + 1]!r})") from None
    return args.prompt or ""


def cmd_run(args: argparse.Namespace) -> int:
    from .runner.generate import Generation, Timings

    model, tok, n_ctx = _load_model(args)
    text = _read_prompt(args)
    ids = tok.encode(text, add_special=True, parse_special=True)
    gen = Generation.start(model, tok, n_ctx)
    t = Timings()
    sys.stdout.write(text)
    sys.stdout.flush()
    for piece in gen.stream(ids, _sampler(args), args.n_predict, stop=args.reverse_prompt,
                            timings=t):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(t.line(), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .gguf import Keys
    from .runner.chat import chat_prompt_ids, pick_template
    from .runner.generate import Generation, Timings

    model, tok, n_ctx = _load_model(args)
    template = pick_template(model.reader.get(Keys.CHAT_TEMPLATE), args.chat_template)
    sampler = _sampler(args)
    messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    print("chat with the model; an empty line or Ctrl-D ends, /new starts over", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/new":
            messages = messages[:1] if args.system_prompt else []
            continue
        messages.append({"role": "user", "content": line})
        ids = chat_prompt_ids(tok, template, messages)
        gen = Generation.start(model, tok, n_ctx)  # the whole conversation, re-evaluated
        t = Timings()
        reply = ""
        try:
            for piece in gen.stream(ids, sampler, args.n_predict, stop=args.reverse_prompt,
                                    timings=t):
                reply += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt as e:
            if isinstance(e, Interrupted):  # kill or hangup end the chat; Ctrl-C the reply
                raise
            t.stop_reason = "interrupted"
        print()
        print(f"[{t.line()}]", file=sys.stderr)
        messages.append({"role": "assistant", "content": reply})
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from .catalog import embedded_model
    from .gguf import GGUFReader
    from .runner.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(GGUFReader(args.model or embedded_model()))
    ids = tok.encode(_read_prompt(args), add_special=not args.no_bos,
                     parse_special=not args.no_parse_special)
    if args.ids:
        print("[" + ", ".join(map(str, ids)) + "]")
    else:
        for i in ids:
            piece = tok.token_to_piece(i, special=True).decode("utf-8", "replace")
            print(f"{i:6d} -> '{piece}'")
    return 0


def _cmd_task_scores(args: argparse.Namespace) -> int:
    """llama-perplexity's --hellaswag / --winogrande / --multiple-choice on the task file -f:
    its per-task lines on stdout, then the final score."""
    from .runner.tasks import HEADER, iter_task_scores

    kinds = [k for k in ("hellaswag", "winogrande", "multiple_choice") if getattr(args, k)]
    if len(kinds) > 1:
        raise UserError("choose one of --hellaswag, --winogrande, --multiple-choice")
    kind = kinds[0]
    if not args.file:
        raise UserError(f"--{kind.replace('_', '-')} needs its task file: -f FILE")
    try:
        with open(args.file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{args.file}: {e.strerror}") from None
    args.ctx_size = args.ctx_size or 512  # llama-perplexity's default
    model, tok, n_ctx = _load_model(args)
    n_tasks = {"hellaswag": args.hellaswag_tasks, "winogrande": args.winogrande_tasks,
               "multiple_choice": args.multiple_choice_tasks}[kind]
    steps = iter_task_scores(model, lambda s: tok.encode(s, add_special=True,
                                                         parse_special=False),
                             kind.replace("_", "-"), data, n_ctx, n_tasks, args.file,
                             on_note=lambda s: print(s, file=sys.stderr))
    header = HEADER.get(kind.replace("_", "-"))
    if header:
        print(f"\n{header}")
    while True:
        try:
            _, _, line = next(steps)
        except StopIteration as stop:
            res = stop.value
            break
        print(line, flush=True)
    print()
    for line in res.final:
        print(line)
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    if args.hellaswag or args.winogrande or args.multiple_choice:
        return _cmd_task_scores(args)
    import time

    from .catalog import default_eval_text
    from .runner import perplexity as ppl_mod
    from .runner.kldbase import BaseReader

    if args.kl_divergence and not args.kl_divergence_base:
        raise UserError("--kl-divergence needs the base file: --kl-divergence-base FILE")
    kld = bool(args.kl_divergence)
    base = BaseReader(args.kl_divergence_base) if kld else None
    # with a base, as llama-perplexity: its context and (without a text) its tokens
    args.ctx_size = args.ctx_size or (base.n_ctx if base else 512)  # 512: llama's default
    model, tok, n_ctx = _load_model(args)
    if base is not None and not args.file and not args.prompt:
        tokens = base.tokens.tolist()
    else:
        if not args.file and not args.prompt:
            args.file = default_eval_text()
        tokens = tok.encode(_read_prompt(args), add_special=True, parse_special=False)
    if base is not None:
        base.close()
    print(f"perplexity: {len(tokens)} tokens, chunks of {n_ctx}", file=sys.stderr)

    running: dict = {}
    t0 = time.perf_counter()

    def progress(i, n, ppl):  # llama-perplexity's running estimate, after an ETA
        if i == 1:
            print(ppl_mod.format_eta(time.perf_counter() - t0, n), file=sys.stderr,
                  flush=True)
            if kld:
                print(f"\n{ppl_mod.KLD_CHUNK_HEADER}")
        if kld:
            print(ppl_mod.format_kld_chunk(i, running), flush=True)
        else:
            print(f"[{i}]{ppl:.4f},", end="" if i < n else "\n", flush=True)

    res = ppl_mod.perplexity(model, tokens, n_ctx, add_bos=tok.add_bos, bos_id=tok.bos_id,
                             n_chunks=args.chunks,
                             base_path=args.kl_divergence_base if kld else None,
                             save_base=None if kld else args.kl_divergence_base,
                             on_chunk=progress, running=running, n_batch=args.batch_size,
                             n_ubatch=args.ubatch_size)
    if res.kld:
        print()
        print(ppl_mod.format_kld_statistics(res.kld))
    else:
        print(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.ppl_err:.5f}")
    return 0


def cmd_imatrix(args: argparse.Namespace) -> int:
    from .events import Finished, Log, Measured, Progress, Started
    from .imatrix import combine, load
    from .imatrix.collect import collect_imatrix, format_statistics

    if args.show_statistics and not args.file:  # llama-imatrix: statistics of the inputs only
        if not args.in_file:
            raise UserError("--show-statistics needs an imatrix (--in-file) or a text (-f)")
        im = combine([load(f) for f in args.in_file], args.ctx_size)
        print(format_statistics(im, ", ".join(args.in_file)))
        return 0
    done = 0
    try:
        for ev in collect_imatrix(
                args.model, args.file, args.output, args.ctx_size, args.chunks,
                args.process_output, args.output_frequency, args.in_file or (),
                args.output_format, args.threads, args.n_gpu_layers, not args.no_ppl):
            if isinstance(ev, Started):
                print(f"imatrix: {ev.source} -> {ev.target}, {ev.total} chunk(s)",
                      file=sys.stderr)
            elif isinstance(ev, Log):
                print(f"{ev.level}: {ev.text}", file=sys.stderr)
            elif isinstance(ev, Progress):
                done = ev.done
            elif isinstance(ev, Measured) and ev.values.get("ppl") is not None:
                i, n = ev.values["chunk"], ev.values["chunks"]
                print(f"[{i}]{ev.values['ppl']:.4f},", end="" if i < n else "\n", flush=True)
            elif isinstance(ev, Finished):
                s = ev.stats
                print(f"wrote {ev.path}: {s['entries']} entries, {s['chunks']} chunks",
                      file=sys.stderr)
    except KeyboardInterrupt:
        if done:
            print(f"\ngguflab: interrupted; kept {done} chunk(s) in {args.output}",
                  file=sys.stderr)
        raise
    if args.show_statistics:
        print(format_statistics(load(args.output), args.output))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from . import fmt
    from .catalog import embedded_model
    from .events import Finished, Log, Measured, Started
    from .sweep import help_line, parse_size, plot_rows, render_table, sweep_model

    vram = parse_size(args.vram) if args.vram else None
    if vram is None and args.n_gpu_layers:  # mark what fits the GPU that -ngl would use
        from .runner.offload import probe_gpu

        gpu, why = probe_gpu(getattr(args, "main_gpu", 0))
        if gpu:
            vram = gpu.free_bytes
            print(f"marking the types that fit GPU {gpu.index} ({gpu.name}): "
                  f"{fmt.size(vram)} free", file=sys.stderr)
        else:
            print(f"gguflab: no GPU to mark the types that fit ({why}); use --vram",
                  file=sys.stderr)
    model = args.model or embedded_model()
    events = sweep_model(model, args.types, args.file, n_ctx=args.ctx_size, chunks=args.chunks,
                         threads=args.threads, out_dir=args.out_dir, force=args.force,
                         n_gpu_layers=args.n_gpu_layers, vram_bytes=vram,
                         imatrix=args.imatrix, hellaswag=args.hellaswag,
                         hellaswag_tasks=args.hellaswag_tasks, flash_attn=args.flash_attn)
    # closed at once on Ctrl-C or a kill: its measuring thread stops and removes what it wrote
    with closing(events):
        for ev in events:
            if isinstance(ev, Started):
                i = ev.info
                imat = f"; imatrix {i['imatrix']}" if i.get("imatrix") else ""
                print(f"sweep of {ev.source} ({i['base_type']}): {', '.join(i['types'])}; "
                      f"{i['chunks']} chunks of {i['n_ctx']} tokens{imat}", file=sys.stderr)
            elif isinstance(ev, Log):
                print(f"{ev.level}: {ev.text}", file=sys.stderr, flush=True)
            elif isinstance(ev, Measured):
                print(help_line(ev.values), flush=True)
            elif isinstance(ev, Finished):
                rows = ev.stats["rows"]
                print()
                print(render_table(rows))
                if len(rows) > 1:
                    print()
                    print(plot_rows(rows, args.plot))
                print(f"\nwrote {ev.path} and {ev.stats['markdown']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .benchmark import BenchParams, bench, parse_int_range
    from .catalog import embedded_model

    def ints(flag: str, given: list[str] | None, default: list[int], neg: bool = False):
        return ([v for g in given for v in parse_int_range(flag, g, neg)] if given
                else list(default))

    pg = []
    for g in args.pg or []:
        parts = g.split(",")
        if len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
            raise UserError(f"-pg {g!r}: expected two counts, prompt and generated: 512,128")
        pg.append((int(parts[0]), int(parts[1])))
    p = BenchParams(
        models=[m for g in args.model or [] for m in g.split(",") if m] or [embedded_model()],
        n_prompt=ints("-p", args.n_prompt, [512]), n_gen=ints("-n", args.n_gen, [128]),
        n_pg=pg, n_batch=ints("-b", args.batch_size, [2048]),
        n_threads=ints("-t", args.threads, []),
        n_gpu_layers=ints("-ngl", args.n_gpu_layers, [0], neg=True),
        reps=args.repetitions, no_warmup=args.no_warmup, output=args.output,
        main_gpu=args.main_gpu)
    bench(p)
    return 0


def _add_model_flags(s: argparse.ArgumentParser, sampling: bool = True) -> None:
    s.add_argument("-m", "--model", help="GGUF model (default: the embedded SmolLM2)")
    s.add_argument("-c", "--ctx-size", type=int, default=0,
                   help="context size (default: the model's, at most 4096)")
    s.add_argument("-t", "--threads", type=int, default=None)
    from .runner.offload import parse_n_gpu_layers

    s.add_argument("-ngl", "--n-gpu-layers", type=parse_n_gpu_layers, default=0,
                   metavar="N|auto",
                   help="offload the last N layers to the GPU (N > layers: the output layer "
                        "too, 999: all; auto: as many as fit)")
    s.add_argument("--main-gpu", type=int, default=0, help="the GPU to use (default 0)")
    s.add_argument("-fa", "--flash-attn", choices=["on", "off", "auto"], default="auto",
                   help="attention as llama.cpp's CPU flash attention computes it, or as its "
                        "non-FA path (default auto: on, as llama.cpp resolves it on the CPU)")
    s.add_argument("-nr", "--no-repack", action="store_true",
                   help="products in the order of llama.cpp's --no-repack run (Q4_0, Q4_K "
                        "and IQ4_NL weights not through its repacked kernels)")
    if sampling:
        s.add_argument("-n", "--n-predict", type=int, default=-1,
                       help="tokens to generate (-1: until end of generation)")
        s.add_argument("--temp", type=float, default=0.8)
        s.add_argument("--top-k", type=int, default=40)
        s.add_argument("--top-p", type=float, default=0.95)
        s.add_argument("--min-p", type=float, default=0.05)
        s.add_argument("--repeat-penalty", type=float, default=1.0)
        s.add_argument("--repeat-last-n", type=int, default=64)
        s.add_argument("-s", "--seed", type=int, default=-1, help="-1: random")
        s.add_argument("-r", "--reverse-prompt", action="append", default=[], metavar="TEXT",
                       help="stop when the model writes TEXT (not printed; may repeat)")


def _quantize_help() -> str:
    from .quant.mixes import ALL_MIXES

    lines = ["Allowed quantization types (sizes and ppl as llama.cpp measured them):"]
    for m in ALL_MIXES:
        lines.append(f"  {int(m.ftype):3d}  or  {m.name:8s}: {m.hint}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gguflab",
        description=(
            "Convert, quantize, test and chat with GGUF models. With no command, "
            "opens the terminal UI (`gguflab inspect` shows the embedded model)."
        ),
    )
    p.add_argument("--models-dir", action="append", dest="top_models_dir", metavar="DIR",
                   help="with no command: a folder of models for the TUI (repeatable)")
    p.add_argument("--version", action="version", version=f"gguflab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("tui", help="the terminal UI: browse, quantize, measure, chat "
                                   "(the default command)")
    s.add_argument("--models-dir", action="append", metavar="DIR",
                   help="a folder of models (repeatable; default ~/models and the current "
                        "folder); the embedded SmolLM2 is always listed")
    s.set_defaults(func=cmd_tui)

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
    s.add_argument("--imatrix", metavar="FILE",
                   help="importance matrix (from llama-imatrix or gguflab imatrix) for the "
                        "quantizers that use one; the lowest-bit i-quants need it")
    s.add_argument("--include-weights", action="append", default=[], metavar="NAME",
                   help="use the importance matrix only for tensors whose name contains NAME "
                        "(repeatable)")
    s.add_argument("--exclude-weights", action="append", default=[], metavar="NAME",
                   help="do not use the importance matrix for tensors whose name contains "
                        "NAME (repeatable; not with --include-weights)")
    s.add_argument("--tensor-type", action="append", dest="tensor_types", default=[],
                   type=lambda text: ("pattern", text), metavar="REGEX=TYPE",
                   help="quantize the tensors whose name matches REGEX to TYPE, e.g. "
                        "attn_q=q8_0 (repeatable; the first match wins)")
    s.add_argument("--tensor-type-file", action="append", dest="tensor_types",
                   type=lambda path: ("file", path), metavar="FILE",
                   help="REGEX=TYPE items separated by spaces or newlines")
    s.add_argument("--override-kv", action="append", default=[], metavar="KEY=TYPE:VALUE",
                   help="set metadata KEY in the output (TYPE: int, float, bool or str; "
                        "repeatable)")
    s.add_argument("--prune-layers", metavar="L0,L1,...",
                   help="drop these layers (the rest are renumbered, block_count updated)")
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

    s = sub.add_parser("run", help="generate text from a prompt (like llama-cli -p)")
    _add_model_flags(s)
    s.add_argument("-p", "--prompt", default="")
    s.add_argument("-f", "--file", help="read the prompt from a file")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("chat", help="chat with a model in the terminal")
    _add_model_flags(s)
    s.add_argument("-sys", "--system-prompt", default="")
    s.add_argument("--chat-template", help="chatml, llama2, llama3 or zephyr instead of the "
                                           "model's own")
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("tokenize", help="show the tokens of a text (like llama-tokenize)")
    s.add_argument("-m", "--model", help="GGUF model (default: the embedded SmolLM2)")
    s.add_argument("-p", "--prompt", default="")
    s.add_argument("-f", "--file")
    s.add_argument("--ids", action="store_true", help="only the ids, as a list")
    s.add_argument("--no-bos", action="store_true", help="do not add BOS/EOS")
    s.add_argument("--no-parse-special", action="store_true",
                   help="treat <|special|> texts as plain text")
    s.set_defaults(func=cmd_tokenize)

    s = sub.add_parser("perplexity", help="perplexity and KL-divergence (like llama-perplexity)")
    _add_model_flags(s, sampling=False)
    s.add_argument("-f", "--file", help="text to evaluate (default: the shipped eval.txt)")
    s.add_argument("-p", "--prompt", default="")
    s.add_argument("--chunks", type=int, default=-1, help="at most this many chunks")
    s.add_argument("-b", "--batch-size", type=int, default=2048, metavar="N",
                   help="tokens a batch holds: batch-size / ctx-size chunks go side by side, "
                        "as in llama-perplexity (default %(default)s)")
    s.add_argument("-ub", "--ubatch-size", type=int, default=512, metavar="N",
                   help="tokens a ubatch holds (default %(default)s)")
    s.add_argument("--kl-divergence-base", metavar="FILE",
                   help="save this model's log-probs to FILE, llama-perplexity's format (or, "
                        "with --kl-divergence, compare against FILE, made by either tool)")
    s.add_argument("--kl-divergence", action="store_true",
                   help="compare with the base saved in --kl-divergence-base")
    s.add_argument("--hellaswag", action="store_true",
                   help="HellaSwag score (acc_norm) over random tasks of the file -f")
    s.add_argument("--hellaswag-tasks", type=int, default=400, metavar="N",
                   help="HellaSwag tasks to score (default %(default)s)")
    s.add_argument("--winogrande", action="store_true",
                   help="Winogrande score over the tasks of the CSV file -f")
    s.add_argument("--winogrande-tasks", type=int, default=0, metavar="N",
                   help="Winogrande tasks to score, picked at random (default 0: all)")
    s.add_argument("--multiple-choice", action="store_true",
                   help="multiple-choice score over the tasks of the binary file -f "
                        "(llama-perplexity's -bf format)")
    s.add_argument("--multiple-choice-tasks", type=int, default=0, metavar="N",
                   help="multiple-choice tasks to score, picked at random (default 0: all)")
    s.set_defaults(func=cmd_perplexity)

    s = sub.add_parser("imatrix", help="collect an importance matrix (like llama-imatrix)")
    s.add_argument("-m", "--model", help="GGUF model (default: the embedded SmolLM2)")
    s.add_argument("-f", "--file", help="text to run the model over")
    s.add_argument("-o", "--output", default="imatrix.gguf",
                   help="output file (default %(default)s; rewritten as chunks are done)")
    s.add_argument("-c", "--ctx-size", type=int, default=512,
                   help="tokens per chunk (default %(default)s)")
    s.add_argument("--chunks", type=int, default=-1, help="at most this many chunks")
    s.add_argument("--process-output", action="store_true",
                   help="collect output.weight's inputs too")
    s.add_argument("--output-frequency", type=int, default=10, metavar="N",
                   help="save every N chunks (default %(default)s)")
    s.add_argument("--in-file", action="append", metavar="FILE",
                   help="an imatrix to add to (repeatable; alone: combine them)")
    s.add_argument("--output-format", choices=["gguf", "dat"], default="gguf",
                   help="gguf (default) or the legacy dat")
    s.add_argument("--show-statistics", action="store_true",
                   help="print per-tensor statistics (of --in-file, or of the result)")
    s.add_argument("--no-ppl", action="store_true", help="skip the perplexity estimate")
    s.add_argument("-t", "--threads", type=int, default=None)
    from .runner.offload import parse_n_gpu_layers

    s.add_argument("-ngl", "--n-gpu-layers", type=parse_n_gpu_layers, default=0,
                   metavar="N|auto", help="accepted for llama.cpp's sake: collecting runs on "
                                          "the CPU")
    s.set_defaults(func=cmd_imatrix)

    s = sub.add_parser("sweep", help="quantize a model to several types and measure each: "
                                     "size, ppl, KLD, speed",
                           description="-c defaults to 512 here, halved while the text is "
                                       "shorter than two chunks.")
    _add_model_flags(s, sampling=False)
    s.add_argument("--types", default="Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K",
                   help="comma-separated types (default: %(default)s)")
    s.add_argument("-f", "--file", help="text to evaluate (default: the shipped eval.txt)")
    s.add_argument("--chunks", type=int, default=-1, help="at most this many chunks")
    s.add_argument("--vram", help="GPU memory to mark the types that fit (e.g. 8G, 512M)")
    s.add_argument("--out-dir", help="folder for the quantized files, the table and the cache "
                                     "(default: the model's)")
    s.add_argument("--force", action="store_true", help="requantize and re-measure everything")
    s.add_argument("--imatrix", metavar="FILE",
                   help="also measure each type quantized with this importance matrix "
                        "(rows TYPE+imat beside TYPE)")
    s.add_argument("--hellaswag", metavar="FILE",
                   help="also score each type on this HellaSwag task file (column HellaSwag, "
                        "as llama-perplexity --hellaswag)")
    s.add_argument("--hellaswag-tasks", type=int, default=400, metavar="N",
                   help="HellaSwag tasks to score (default %(default)s)")
    s.add_argument("--plot", choices=["kld", "ppl"], default="kld",
                   help="y axis of the plot: mean KLD or delta ppl (default kld)")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("bench", help="prompt and generation speed, as llama-bench measures it",
                       description="llama-bench's tests on gguflab's runner: ppN (N random "
                                   "prompt tokens in batches of -b), tgN (N tokens one at a "
                                   "time), each warmed up then run -r times; t/s is the mean "
                                   "± stddev over the runs. Numeric flags take comma lists "
                                   "and ranges (128,512 or 1-8*2) and may be repeated; every "
                                   "combination is tested.")
    s.add_argument("-m", "--model", action="append", metavar="FILE",
                   help="GGUF model(s) (default: the embedded SmolLM2)")
    s.add_argument("-p", "--n-prompt", action="append", metavar="N", help="default 512")
    s.add_argument("-n", "--n-gen", action="append", metavar="N", help="default 128")
    s.add_argument("-pg", action="append", metavar="PP,TG",
                   help="a prompt of PP tokens then TG generated, timed together")
    s.add_argument("-b", "--batch-size", action="append", metavar="N", help="default 2048")
    s.add_argument("-t", "--threads", action="append", metavar="N",
                   help="default: all cores")
    s.add_argument("-ngl", "--n-gpu-layers", action="append", metavar="N",
                   help="layers on the GPU (default 0; -1: all)")
    s.add_argument("-mg", "--main-gpu", type=int, default=0, help="the GPU to use")
    s.add_argument("-r", "--repetitions", type=int, default=5, metavar="N",
                   help="runs of each test (default %(default)s)")
    s.add_argument("-o", "--output", choices=["md", "json", "jsonl", "csv"], default="md",
                   help="output format on stdout (default md)")
    s.add_argument("--no-warmup", action="store_true", help="skip the warm-up runs")
    s.set_defaults(func=cmd_bench)
    return p


def keep_freed_memory() -> None:
    """Have glibc keep freed blocks of up to 64 MiB (and a free heap top of up to 256 MiB)
    for reuse. By default it hands blocks past an adaptive threshold (128 KiB at first)
    back to the kernel, and the next one comes as fresh zeroed pages: a perplexity run,
    whose activations and logits are freed and made again every batch, took 0.49M page
    faults and 1.3 s of kernel time that way (SmolLM2 F16, 1 thread; 27K and 0.17 s
    after). Where there is no mallopt (not glibc), nothing changes."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD (fixed: no longer adaptive)


def one_blas_thread() -> None:
    """numpy's OpenBLAS starts a thread per core, and after any BLAS call they spin for a
    while: on a machine whose cores our own kernels keep busy, that time is taken from
    them (0.1-0.3 s of a 10 s perplexity run on 2 cores). gguflab's products run in its
    own kernels, so one BLAS thread is plenty; read once, when numpy loads (a setting
    the user made is kept)."""
    import os

    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main(argv: Sequence[str] | None = None) -> int:
    one_blas_thread()
    keep_freed_memory()
    for stream in (sys.stdout, sys.stderr):
        try:  # metadata may hold bytes that are not UTF-8: show them, never crash on them
            stream.reconfigure(errors="backslashreplace")
        except AttributeError:
            pass
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `gguflab` alone opens the TUI
        args.models_dir, args.func = args.top_models_dir, cmd_tui
    from . import signals

    try:
        with signals.interrupt_on_signals():  # kill and a hangup end a run as Ctrl-C does
            return args.func(args)
    except UserError as e:
        print(f"gguflab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        from .partial import abort_all

        abort_all()  # a writer on a measuring thread may not have reached its own cleanup
        by = signals.signal_name(e)
        print(f"gguflab: interrupted{f' by {by}' if by else ''}", file=sys.stderr)
        return signals.exit_code(e)
    except BrokenPipeError:  # `gguflab inspect | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
