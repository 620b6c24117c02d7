"""Task scores the way llama-perplexity computes them (`--hellaswag`, `--winogrande`,
`--multiple-choice`): the same task files, the same choice of tasks (its Mersenne twister
seeded with 1), the same tokenization (context + ending, with BOS when the model adds one),
the same log-probs summed and the same printed lines.

llama.cpp batches the endings of several tasks as sequences that share the common prefix;
here each task runs its common prefix once and then each ending from the end of that prefix
in one KV cache, which is the same function. The log-probs index the logits in llama.cpp's
per-task layout (last prefix token, then each ending's outputs) so that its quirks carry
over: Winogrande's first logit of the second choice when the choice is not skipped, and
its last CSV line, which it never reads because `-f` drops the file's final newline."""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from .model import Model

KINDS = ("hellaswag", "winogrande", "multiple-choice")
N_PARALLEL = 4  # llama-perplexity's minimum -np for tasks: its context is 4 * --ctx-size
WINOGRANDE_MIN_TRAILING = 3  # llama.cpp's k_min_trailing_ctx
MAX_ANSWERS = 100  # llama.cpp refuses more answers per multiple-choice task
HEADER = {"hellaswag": "task\tacc_norm\t95% confidence interval",  # printed before the tasks
          "multiple-choice": "task\tacc_norm"}


# -- llama.cpp's random choice of tasks --------------------------------------------------


class MT19937:
    """std::mt19937: 32-bit outputs, seeded as its constructor seeds."""

    def __init__(self, seed: int = 5489):
        mt = [seed & 0xFFFFFFFF]
        for i in range(1, 624):
            mt.append((1812433253 * (mt[-1] ^ (mt[-1] >> 30)) + i) & 0xFFFFFFFF)
        self.mt, self.i = mt, 624

    def __call__(self) -> int:
        if self.i >= 624:
            mt = self.mt
            for k in range(624):
                y = (mt[k] & 0x80000000) | (mt[(k + 1) % 624] & 0x7FFFFFFF)
                mt[k] = mt[(k + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            self.i = 0
        y = self.mt[self.i]
        self.i += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        return y ^ (y >> 18)


def uniform_below(rng: MT19937, n: int) -> int:
    """std::uniform_int_distribution<size_t>(0, n - 1)(rng) as libstdc++ (GCC >= 11) draws it
    from a 32-bit engine: Lemire's multiply-and-shift with rejection."""
    product = rng() * n
    low = product & 0xFFFFFFFF
    if low < n:
        threshold = (0x100000000 - n) % n
        while low < threshold:
            product = rng() * n
            low = product & 0xFFFFFFFF
    return product >> 32


def hellaswag_order(n_available: int, n_tasks: int) -> list[int]:
    """The tasks llama-perplexity's HellaSwag scores, in its order: always shuffled, each
    drawn uniformly from those left."""
    rng = MT19937(1)
    left = list(range(n_available))
    return [left.pop(uniform_below(rng, len(left))) for _ in range(min(n_tasks, n_available))]


def random_subset(n_available: int, n_tasks: int) -> list[int]:
    """Winogrande's and multiple-choice's random pick of n_tasks < n_available: a float
    scale of each 32-bit draw indexes the indices left, the last one filling the hole."""
    rng = MT19937(1)
    aux = list(range(n_available))
    scale = np.float32(1.0) / (np.float32(1.0) + np.float32(0xFFFFFFFF))
    out = []
    for _ in range(n_tasks):
        j = int(scale * np.float32(rng()) * np.float32(len(aux)))
        j = min(j, len(aux) - 1)  # a draw rounding to 2**32 would read past the end there
        out.append(aux[j])
        aux[j] = aux[-1]
        aux.pop()
    return out


# -- task files ----------------------------------------------------------------------------


@dataclass
class HellaswagTask:
    context: str
    gold: int  # the index of the right ending
    endings: list[str]


@dataclass
class WinograndeTask:
    first: str  # the sentence before the blank
    second: str  # after it
    choices: list[str]
    answer: int  # 1 or 2


@dataclass
class ChoiceTask:
    question: str
    answers: list[str]  # mc1: one of them right
    labels: list[int]  # 1 marks the right answer
    mc2_answers: list[str] = field(default_factory=list)  # read, not scored (as llama.cpp)
    mc2_labels: list[int] = field(default_factory=list)


def _prompt_text(data: bytes | str, path: str) -> str:
    """The file's text as `-f` gives it to llama-perplexity: one final newline dropped."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return data[:-1] if data.endswith("\n") else data


def parse_hellaswag(data: bytes | str, path: str = "task file") -> list[HellaswagTask]:
    """Six lines per task: context, the right ending's index, four endings."""
    text = _prompt_text(data, path)
    lines = text.split("\n") if text else []
    if len(lines) % 6:
        raise UserError(f"{path}: {len(lines)} lines, not a multiple of 6 (HellaSwag has 6 "
                        "lines per task: context, label, 4 endings)")
    tasks = []
    for t in range(len(lines) // 6):
        label = re.match(r"\s*[+-]?\d+", lines[6 * t + 1])  # std::stoi's prefix
        if not label or not 0 <= int(label.group()) <= 3:
            raise UserError(f"{path}:{6 * t + 2}: the label must be 0-3, not "
                            f"{lines[6 * t + 1][:40]!r}")
        tasks.append(HellaswagTask(lines[6 * t], int(label.group()), lines[6 * t + 2:6 * t + 6]))
    if not tasks:
        raise UserError(f"{path}: no HellaSwag tasks")
    return tasks


def _split_winogrande(line: str) -> WinograndeTask | str:
    """One CSV row (index,sentence,choice1,choice2,answer) as llama.cpp cuts it, or why not."""
    commas, quoted = [], False
    for i, c in enumerate(line):
        if quoted:
            quoted = c != '"'
        elif c == ",":
            commas.append(i)
            if len(commas) == 4:
                break
        elif c == '"':
            quoted = True
    if len(commas) != 4:
        return "failed to find comma separators"
    c0, c1, c2, c3 = commas
    sentence = (line[c0 + 2:c1 - 1] if line[c0 + 1] == '"' else line[c0 + 1:c1])
    where = sentence.find("_")
    if where < 0:
        return "no _ in the sentence"
    answer = re.match(r"\s*[+-]?\d+", line[c3 + 1:])  # istream >> int
    if not answer or int(answer.group()) not in (1, 2):
        return f"failed to parse answer {line[c3 + 1:][:20]!r}"
    return WinograndeTask(sentence[:where], sentence[where + 1:],
                          [line[c1 + 1:c2], line[c2 + 1:c3]], int(answer.group()))


def parse_winogrande(data: bytes | str, path: str = "task file"
                     ) -> tuple[list[WinograndeTask], list[str]]:
    """The CSV rows as llama-perplexity reads them, and a note per row it skips (the header
    is one). Like it, the last line is never read: `-f` drops the final newline and its
    reader stops at a line without one."""
    text = _prompt_text(data, path)
    tasks, skipped = [], []
    for n, line in enumerate(text.split("\n")[:-1], 1):
        row = _split_winogrande(line)
        if isinstance(row, str):
            skipped.append(f"{path}:{n}: {row}")
        else:
            tasks.append(row)
    if not tasks:
        raise UserError(f"{path}: no Winogrande tasks (CSV rows index,sentence with _,choice1,"
                        "choice2,answer 1|2)")
    return tasks, skipped


class _Reader:
    def __init__(self, data: bytes, pos: int):
        self.data, self.pos = data, pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise EOFError
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def string(self) -> str:
        return self.take(self.u32()).decode("utf-8", "replace")

    def answers(self) -> tuple[list[str], list[int]]:
        n = self.u32()
        if n > MAX_ANSWERS:
            raise EOFError
        answers = [self.string() for _ in range(n)]
        return answers, list(struct.unpack(f"<{n}i", self.take(4 * n)))

    def task(self) -> ChoiceTask:
        q = self.string()
        a1, l1 = self.answers()
        a2, l2 = self.answers()
        return ChoiceTask(q, a1, l1, a2, l2)


def parse_multiple_choice(data: bytes, n_tasks: int = 0, path: str = "task file"
                          ) -> tuple[list[ChoiceTask], int]:
    """(the tasks llama-perplexity scores, how many the file has). Its binary format: u32
    task count, u32 byte offset of each task, then per task a string question and two answer
    sets (u32 count, that many strings, that many i32 labels); a string is a u32 length and
    its bytes. All tasks in file order when n_tasks is 0 or not below the count, else a
    random pick read at the offsets."""
    rd = _Reader(data, 0)
    try:
        n_avail = rd.u32()
        if n_avail == 0:
            raise EOFError
        offsets = [rd.u32() for _ in range(n_avail)]
    except EOFError:
        raise UserError(f"{path}: not a multiple-choice task file (no tasks or no task "
                        "offsets)") from None
    tasks = []
    if n_tasks <= 0 or n_tasks >= n_avail:
        for i in range(n_avail):
            try:
                tasks.append(rd.task())
            except EOFError:
                raise UserError(f"{path}: failed to read task {i + 1} of {n_avail}") from None
    else:
        for idx in random_subset(n_avail, n_tasks):
            try:
                tasks.append(_Reader(data, offsets[idx]).task())
            except EOFError:
                raise UserError(f"{path}: failed to read task {idx} at offset "
                                f"{offsets[idx]}") from None
    for i, t in enumerate(tasks):
        if not t.question or not t.answers or not all(t.answers):
            raise UserError(f"{path}: task {i + 1} has an empty question or answer")
    return tasks, n_avail


def write_multiple_choice(tasks: Sequence[ChoiceTask]) -> bytes:
    """The binary file `parse_multiple_choice` (and llama-perplexity) reads."""
    def string(s: str) -> bytes:
        b = s.encode("utf-8")
        return struct.pack("<I", len(b)) + b

    def answers(a: list[str], labels: list[int]) -> bytes:
        return (struct.pack("<I", len(a)) + b"".join(map(string, a))
                + struct.pack(f"<{len(labels)}i", *labels))

    bodies = [string(t.question) + answers(t.answers, t.labels)
              + answers(t.mc2_answers, t.mc2_labels) for t in tasks]
    pos, offsets = 4 + 4 * len(tasks), []
    for b in bodies:
        offsets.append(pos)
        pos += len(b)
    return struct.pack(f"<I{len(tasks)}I", len(tasks), *offsets) + b"".join(bodies)


# -- scoring -------------------------------------------------------------------------------


@dataclass
class TaskScores:
    kind: str
    n_available: int  # tasks in the file
    correct: list[bool] = field(default_factory=list)  # per task, in the order scored
    running: list[float] = field(default_factory=list)  # accuracy in % after each task
    margins: list[float] = field(default_factory=list)  # best score minus the runner-up
    lines: list[str] = field(default_factory=list)  # per task, as llama-perplexity prints
    acc: float = 0.0  # final accuracy in %
    err: float = 0.0  # its standard error in % (HellaSwag: half the 95% interval)
    interval: tuple[float, float] | None = None  # HellaSwag's 95% Wilson interval in %
    chance: tuple[float, float] | None = None  # multiple-choice's random chance ± err in %
    header: str = ""  # llama-perplexity's column header, if it prints one
    final: list[str] = field(default_factory=list)  # its closing lines


def _common_prefix(seqs: list[list[int]]) -> int:
    n = 0
    for column in zip(*seqs):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def _layout_logits(model: Model, seqs: list[list[int]], cp: int, all_outputs: bool
                   ) -> np.ndarray:
    """Logits in llama.cpp's per-task order: the last prefix token's, then each sequence's
    tokens after the prefix (without its last token unless `all_outputs`)."""
    cache = model.new_cache(max(len(s) for s in seqs))
    rows = [model.forward(seqs[0][:cp], cache)[None]]
    for s in seqs:
        toks = s[cp:] if all_outputs else s[cp:len(s) - 1]
        if toks:
            cache.n = cp  # the next ending continues from the shared prefix
            rows.append(model.forward(toks, cache, all_logits=True))
    return np.concatenate(rows).astype(np.float32, copy=False)


def _token_logprob(row: np.ndarray, tok: int) -> np.float32:
    """compute_logprobs' log-prob of one token, in float as it does."""
    m = row.max()
    s = np.exp(row - m).sum(dtype=np.float32)
    return np.float32(row[tok] - m - np.log(s))


def _first_logprob(row: np.ndarray, tok: int) -> np.float32:
    """log(softmax(row)[tok]) as its softmax gives it: a double sum, float probabilities."""
    m = row.max()
    e = np.exp(row - m)
    return np.float32(np.log(np.float32(float(e[tok]) / float(e.sum(dtype=np.float64)))))


def _check_fits(i: int, required: int, n_ctx: int) -> None:
    if required > N_PARALLEL * n_ctx:
        raise UserError(f"task {i} does not fit in the context window (requires {required} "
                        f"tokens, the context holds {N_PARALLEL} x {n_ctx}): raise --ctx-size")


def _prefix_endings(i: int, seqs: list[list[int]]) -> int:
    cp = _common_prefix(seqs)
    if cp == 0:
        raise UserError(f"task {i}: its sequences share no first token (an empty context "
                        "and no BOS); llama-perplexity cannot score it either")
    if any(len(s) <= cp for s in seqs):
        raise UserError(f"task {i}: an ending adds no token after the common prefix")
    return cp


def _ending_scores(model: Model, seqs: list[list[int]], cp: int, acc_dtype) -> list:
    """HellaSwag's and multiple-choice's mean log-prob of each ending: first token from the
    prefix's softmax, the rest from compute_logprobs, summed in `acc_dtype`."""
    logits = _layout_logits(model, seqs, cp, all_outputs=False)
    scores, li = [], 1
    for s in seqs:
        total = acc_dtype(_first_logprob(logits[0], s[cp]))
        for j in range(cp, len(s) - 1):
            total = acc_dtype(total + acc_dtype(_token_logprob(logits[li], s[j + 1])))
            li += 1
        scores.append(acc_dtype(total / acc_dtype(len(s) - cp)))
    return scores


def _best(scores: list) -> tuple[int, float]:
    """The first maximum, as a strict > scan finds it, and its lead over the runner-up."""
    best = 0
    for s in range(1, len(scores)):
        if scores[s] > scores[best]:
            best = s
    rest = [float(x) for k, x in enumerate(scores) if k != best]
    return best, float(scores[best]) - max(rest) if rest else math.inf


def iter_hellaswag(model: Model, encode: Callable[[str], list[int]],
                   tasks: list[HellaswagTask], n_ctx: int, n_tasks: int = 400
                   ) -> Generator[tuple[int, int, str], None, TaskScores]:
    """Yields (task, tasks, printed line) after each task; returns the scores (acc_norm)."""
    order = hellaswag_order(len(tasks), n_tasks)
    res = TaskScores("hellaswag", len(tasks), header=HEADER["hellaswag"])
    seqs = [[encode(tasks[k].context + " " + e) for e in tasks[k].endings] for k in order]
    cps = []
    for i, ss in enumerate(seqs):
        cps.append(_prefix_endings(i, ss))
        _check_fits(i, cps[-1] + sum(len(s) - cps[-1] for s in ss), n_ctx)
    za = 1.95996398454
    n_right = 0
    for i, k in enumerate(order):
        scores = _ending_scores(model, seqs[i], cps[i], np.float64)
        best, margin = _best(scores)
        n_right += best == tasks[k].gold
        n = i + 1
        freq = n_right / n
        z = za * za / n
        cnf = z * math.sqrt(n * (4.0 * freq * (1 - freq) + z)) / (za + za)
        lo, hi = (freq + z * 0.5 - cnf) / (1.0 + z), (freq + z * 0.5 + cnf) / (1.0 + z)
        res.correct.append(best == tasks[k].gold)
        res.running.append(100.0 * freq)
        res.margins.append(margin)
        res.lines.append(f"{n}\t{freq * 100.0:3.8f}%\t[{lo * 100.0:3.4f}%, {hi * 100.0:3.4f}%]")
        res.acc, res.interval, res.err = 100.0 * freq, (100.0 * lo, 100.0 * hi), 50.0 * (hi - lo)
        yield n, len(order), res.lines[-1]
    return res


def iter_winogrande(model: Model, encode: Callable[[str], list[int]],
                    tasks: list[WinograndeTask], n_ctx: int, n_tasks: int = 0
                    ) -> Generator[tuple[int, int, str], None, TaskScores]:
    """Each choice scored by the mean log-prob of the words after it (all of them, the
    choice too, when either ending is short), without the final token."""
    picked = (random_subset(len(tasks), n_tasks) if 0 < n_tasks < len(tasks)
              else range(len(tasks)))
    chosen = [tasks[k] for k in picked]
    res = TaskScores("winogrande", len(tasks))
    prepared = []
    for i, t in enumerate(chosen):
        seqs = [encode(t.first + c + t.second) for c in t.choices]
        cp = _common_prefix(seqs)
        if cp == 0:
            raise UserError(f"task {i}: its sequences share no first token")
        _check_fits(i, cp + sum(len(s) - cp for s in seqs), n_ctx)
        bases = [len(encode(t.first + c)) for c in t.choices]
        prepared.append((seqs, cp, bases))
    f32 = np.float32
    n_right = 0
    for i, (t, (seqs, cp, bases)) in enumerate(zip(chosen, prepared)):
        logits = _layout_logits(model, seqs, cp, all_outputs=True)
        skip = all(len(s) - cp > WINOGRANDE_MIN_TRAILING for s in seqs)
        scores = []
        for c, s in enumerate(seqs):
            base = bases[c] if skip else cp
            last = 1 if len(s) - base > 1 else 0
            # llama.cpp's index of position base-1 in its layout (for the second choice it
            # is off by one sequence when base == cp: its FIXME, kept)
            li = base - cp if c == 0 else len(seqs[0]) - cp + base - cp
            total = f32(0.0)
            for j in range(base - 1, len(s) - 1 - last):
                total = f32(total + _token_logprob(logits[li], s[j + 1]))
                li += 1
            with np.errstate(divide="ignore", invalid="ignore"):
                scores.append(f32(total / f32(len(s) - base - last)))
        result = 1 if scores[0] > scores[1] else 2
        n_right += result == t.answer
        n = i + 1
        res.correct.append(result == t.answer)
        res.running.append(100.0 * n_right / n)
        res.margins.append(abs(float(scores[0]) - float(scores[1])))
        res.lines.append(f"{n}\t{100.0 * n_right / n:.4f}\t{float(scores[0]):10.6f}  "
                         f"{float(scores[1]):10.6f}  {result}  {t.answer}")
        yield n, len(chosen), res.lines[-1]
    n = len(chosen)
    p = f32(n_right) / f32(n)
    sigma = f32(100.0) * f32(math.sqrt(p * (1 - p) / (n - 1))) if n > 1 else f32(0.0)
    res.acc, res.err = 100.0 * float(p), float(sigma)
    res.final = [f"Final Winogrande score({n} tasks): {100 * float(p):.4f} +/- "
                 f"{float(sigma):.4f}"]
    return res


def iter_multiple_choice(model: Model, encode: Callable[[str], list[int]],
                         tasks: list[ChoiceTask], n_ctx: int, n_available: int
                         ) -> Generator[tuple[int, int, str], None, TaskScores]:
    """Each answer scored by the mean log-prob of its tokens after the question (mc1)."""
    res = TaskScores("multiple-choice", n_available, header=HEADER["multiple-choice"])
    seqs, cps = [], []
    for i, t in enumerate(tasks):
        seqs.append([encode(t.question + " " + a) for a in t.answers])
        cps.append(_prefix_endings(i, seqs[-1]))
        _check_fits(i, cps[-1] + sum(len(s) - cps[-1] for s in seqs[-1]), n_ctx)
    n_right = n_answers = 0
    for i, t in enumerate(tasks):
        scores = _ending_scores(model, seqs[i], cps[i], np.float32)
        best, margin = _best(scores)
        n_answers += len(scores)
        n_right += t.labels[best] == 1
        n = i + 1
        res.correct.append(t.labels[best] == 1)
        res.running.append(100.0 * n_right / n)
        res.margins.append(margin)
        res.lines.append(f"{n}\t{100.0 * n_right / n:.8f}")
        yield n, len(tasks), res.lines[-1]
    n = len(tasks)
    f32 = np.float32
    p = f32(n_right) / f32(n)
    sigma = f32(math.sqrt(p * (1 - p) / (n - 1))) if n > 1 else f32(0.0)
    q = f32(n) / f32(n_answers)
    q_sigma = f32(math.sqrt(q * (1 - q) / (n - 1))) if n > 1 else f32(0.0)
    res.acc, res.err = 100.0 * float(p), 100.0 * float(sigma)
    res.chance = (100.0 * float(q), 100.0 * float(q_sigma))
    res.final = [f"Final result: {float(f32(100) * p):.4f} +/- {float(f32(100) * sigma):.4f}",
                 f"Random chance: {float(f32(100) * q):.4f} +/- {float(f32(100) * q_sigma):.4f}"]
    return res


def iter_task_scores(model: Model, encode: Callable[[str], list[int]], kind: str,
                     data: bytes, n_ctx: int, n_tasks: int | None = None,
                     path: str = "task file", on_note: Callable[[str], None] | None = None
                     ) -> Generator[tuple[int, int, str], None, TaskScores]:
    """Parse task file `data` of `kind` and score it; `n_tasks` None: llama-perplexity's
    default (400 HellaSwag tasks, all others). `encode(text)` tokenizes as common_tokenize
    does: special tokens added (BOS), not parsed."""
    if kind == "hellaswag":
        tasks = parse_hellaswag(data, path)
        n = 400 if n_tasks is None else n_tasks if n_tasks >= 0 else len(tasks)
        if on_note:
            on_note(f"hellaswag_score : loaded {len(tasks)} tasks from prompt.")
            on_note(f"hellaswag_score : selecting {min(n, len(tasks))} randomized tasks.")
        return (yield from iter_hellaswag(model, encode, tasks, n_ctx, n))
    if kind == "winogrande":
        wtasks, skipped = parse_winogrande(data, path)
        if on_note:
            for s in skipped:
                on_note(f"skipped {s}")
            on_note(f"winogrande_score : loaded {len(wtasks)} tasks from prompt.")
        return (yield from iter_winogrande(model, encode, wtasks, n_ctx, n_tasks or 0))
    if kind == "multiple-choice":
        ctasks, n_avail = parse_multiple_choice(data, n_tasks or 0, path)
        if on_note:
            on_note(f"multiple_choice_score: there are {n_avail} tasks in prompt, "
                    f"scoring {len(ctasks)}")
        return (yield from iter_multiple_choice(model, encode, ctasks, n_ctx, n_avail))
    raise UserError(f"unknown task kind {kind!r}: use one of {', '.join(KINDS)}")


def task_scores(model: Model, encode: Callable[[str], list[int]], kind: str, data: bytes,
                n_ctx: int, n_tasks: int | None = None, path: str = "task file",
                on_task: Callable[[int, int, str], None] | None = None,
                on_note: Callable[[str], None] | None = None) -> TaskScores:
    """`iter_task_scores` run to the end; `on_task(i, n, line)` after each task."""
    steps = iter_task_scores(model, encode, kind, data, n_ctx, n_tasks, path, on_note)
    while True:
        try:
            step = next(steps)
        except StopIteration as stop:
            return stop.value
        if on_task:
            on_task(*step)
