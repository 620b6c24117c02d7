"""Task scores (HellaSwag, Winogrande, multiple choice) against llama-perplexity on the same
files: task files generated here from the shipped eval text, the same flags, and every
printed per-task line and final line equal. Also the parsers, llama.cpp's random choice of
tasks, the CLI and the sweep column."""

from __future__ import annotations

import random
import re

import pytest
from llama_tools import run_tool

from gguflab import cli
from gguflab.catalog import default_eval_text
from gguflab.errors import UserError
from gguflab.runner.model import Model
from gguflab.runner.tasks import (
    ChoiceTask,
    hellaswag_order,
    iter_task_scores,
    parse_hellaswag,
    parse_multiple_choice,
    parse_winogrande,
    random_subset,
    task_scores,
    write_multiple_choice,
)
from gguflab.runner.tokenizer import Tokenizer

NAMES = ["Sarah", "Maria", "John", "Peter", "Alice", "Robert", "Emma", "David", "Lucy", "Tom"]
WINO = [  # a blank for one of two names, with short and long endings after it
    "{a} was a much better surgeon than {b} so _ always got the easier cases.",
    "{a} lent money to {b} because _ was rich.",
    "{a} could not lift the box that {b} carried easily, because _ was weak.",
    "{a} asked {b} for directions since _ had lived in the city for many years.",
    "{a} beat {b} at chess so _ smiled.",
    "{a} was taller than {b}, so _ reached the top shelf without a ladder or a chair.",
    "{a} thanked {b} for the gift because _ was grateful.",
    "{a} called {b} late at night, but _ was asleep.",
    "{a} taught {b} to swim, so _ was the teacher of the two friends that summer.",
    "{a} envied {b} because _ had won the race.",
    "{a} gave {b} a book since _ loved reading stories about the old sea.",
    "{a} was angry at {b} because _ had broken the vase.",
]


def sentences(n: int) -> list[str]:
    text = open(default_eval_text(), encoding="utf-8").read().replace("\n", " ")
    out = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    return [s for s in out if 8 <= len(s.split()) <= 24][:n]


def hellaswag_text(n_tasks: int, seed: int = 0) -> str:
    """n_tasks tasks: a sentence's start, its true end among three ends of other sentences.
    The label names the true end in half the tasks only, else a wrong one: the model knows
    this text, so accuracy near 50% shows that tasks and answers line up."""
    rng = random.Random(seed)
    sents = sentences(4 * n_tasks)
    lines = []
    for i in range(n_tasks):
        words = sents[i].split()
        cut = len(words) // 2
        others = [sents[j].split() for j in rng.sample(range(len(sents)), 6) if j != i][:3]
        endings = [" ".join(o[len(o) // 2:]) for o in others]
        true = rng.randrange(4)
        endings.insert(true, " ".join(words[cut:]))
        gold = true if rng.random() < 0.5 else (true + rng.randrange(1, 4)) % 4
        lines += [f"Reading: {' '.join(words[:cut])}", str(gold), *endings]
    return "\n".join(lines) + "\n"


def winogrande_text(n_rows: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    rows = ["index,sentence,option1,option2,answer"]
    for i in range(n_rows):
        a, b = rng.sample(NAMES, 2)
        s = WINO[i % len(WINO)].format(a=a, b=b)
        if "," in s:
            s = f'"{s}"'
        rows.append(f"{i},{s},{a},{b},{rng.choice((1, 2))}")
    return "\n".join(rows) + "\n"


def choice_tasks(n_tasks: int, seed: int = 0) -> list[ChoiceTask]:
    """Questions of 3 to 5 answers, one of them the sentence's true end, which is labelled
    right in half the tasks (as in `hellaswag_text`)."""
    rng = random.Random(seed)
    sents = sentences(4 * n_tasks)
    tasks = []
    for i in range(n_tasks):
        words = sents[-1 - i].split()
        cut = len(words) // 2
        k = 2 + i % 3
        others = [sents[j].split() for j in rng.sample(range(len(sents)), k + 1)
                  if j != len(sents) - 1 - i][:k]
        answers = [" ".join(o[len(o) // 2:]) for o in others]
        true = rng.randrange(k + 1)
        answers.insert(true, " ".join(words[cut:]))
        right = true if rng.random() < 0.5 else (true + rng.randrange(1, k + 1)) % (k + 1)
        tasks.append(ChoiceTask(" ".join(words[:cut]), answers,
                                [int(j == right) for j in range(k + 1)], answers[:2], [1, 0]))
    return tasks


# -- against llama-perplexity ---------------------------------------------------------------


HS_LINE = re.compile(r"^\d+\t[\d.]+%\t\[[\d.]+%, [\d.]+%\]$")
WG_LINE = re.compile(r"^\d+\t[\d.]+\t *-?[\d.]+ +-?[\d.]+  [12]  [12]$")
MC_LINE = re.compile(r"^\d+\t[\d.]+$")
# A task whose best score leads the runner-up by less than this (mean log-prob, nats) is a
# near-tie: the two tools' logits differ enough on a quantized file (llama.cpp rounds the
# activations to Q8, gguflab does not yet) to flip it. Any other task must agree.
NEAR_TIE = 0.1


def llama_lines(out: str, pattern: re.Pattern) -> list[str]:
    return [ln for ln in out.splitlines() if pattern.match(ln)]


def llama_final(out: str, prefix: str) -> list[str]:
    return [ln[ln.index(prefix):] for ln in out.splitlines() if prefix in ln]


def correct_of(kind: str, lines: list[str]) -> list[bool]:
    """Whether each task was answered right, from the printed per-task lines."""
    if kind == "winogrande":
        return [ln.split()[-2] == ln.split()[-1] for ln in lines]
    counts = [round(float(ln.split("\t")[1].rstrip("%")) * (i + 1) / 100)
              for i, ln in enumerate(lines)]
    return [b > a for a, b in zip([0, *counts], counts)]


def assert_same_scores(res, lines: list[str], what: str) -> list[int]:
    """Every task scored alike, but near-ties (returned, and printed for the report); the
    printed lines equal up to the first flipped near-tie."""
    assert len(lines) == len(res.lines), (what, lines[-3:], res.lines[-3:])
    theirs_ = correct_of(res.kind, lines)
    assert correct_of(res.kind, res.lines) == res.correct
    flipped = [i for i, (a, b) in enumerate(zip(res.correct, theirs_)) if a != b]
    ties = [i for i, m in enumerate(res.margins) if m < NEAR_TIE]
    if flipped or ties:
        print(f"{what}: near-ties {[(i, round(res.margins[i], 4)) for i in ties]}, "
              f"flipped {flipped}")
    assert set(flipped) <= set(ties), (what, flipped, [res.margins[i] for i in flipped])
    first = flipped[0] if flipped else len(lines)
    key = (lambda ln: " ".join(ln.split()[:2] + ln.split()[4:])) if res.kind == "winogrande" \
        else (lambda ln: ln)
    assert [key(x) for x in res.lines[:first]] == [key(x) for x in lines[:first]], what
    return flipped


@pytest.fixture(scope="module")
def smol(smollm2):
    model = Model(smollm2)
    tok = Tokenizer.from_gguf(model.reader)
    return smollm2, model, lambda s: tok.encode(s, add_special=True, parse_special=False)


def ours(smol, kind, data, n_tasks=None, n_ctx=128):
    _, model, encode = smol
    return task_scores(model, encode, kind, data, n_ctx, n_tasks)


def theirs(path, flag, task_file, *extra, binary=False):
    return run_tool("llama-perplexity", "-m", path, "--" + flag, "-bf" if binary else "-f",
                    task_file, "-t", "1", "-c", "128", *extra)  # 1 thread: no OpenMP spinning


@pytest.mark.parametrize("quant", ["Q4_1", "Q8_0"])
def test_hellaswag_equals_llama_perplexity(smol, tmp_path, quant):
    """On the fixture (Q4_1) and on its Q8_0 requantization by llama.cpp."""
    if quant == "Q8_0":
        from ggml_oracle import llama_quantize

        q8 = tmp_path / "smol-q8_0.gguf"
        llama_quantize(smol[0], str(q8), 7, allow_requantize=True)  # LLAMA_FTYPE_MOSTLY_Q8_0
        model = Model(str(q8))
        smol = (str(q8), model, smol[2])
    path, _, _ = smol
    f = tmp_path / "hs.txt"
    f.write_text(hellaswag_text(8))
    res = ours(smol, "hellaswag", f.read_bytes(), 6)
    out = theirs(path, "hellaswag", f, "--hellaswag-tasks", "6")
    assert "loaded 8 tasks" in out and "selecting 6 randomized tasks" in out
    assert_same_scores(res, llama_lines(out, HS_LINE), f"hellaswag {quant}")


def test_winogrande_equals_llama_perplexity(smol, tmp_path):
    path, _, _ = smol
    f = tmp_path / "wg.csv"
    f.write_text(winogrande_text(10))
    res = ours(smol, "winogrande", f.read_bytes(), 7)
    out = theirs(path, "winogrande", f, "--winogrande-tasks", "7")
    # llama.cpp never reads the last row: 9 of the 10 (the header is skipped as malformed)
    assert "loaded 9 tasks" in out and res.n_available == 9
    lines = llama_lines(out, WG_LINE)
    assert_same_scores(res, lines, "winogrande")
    # the mean log-probs, to the two tools' logits (a few % on the rare tokens of Q4_1)
    for a, b in zip(lines, res.lines):
        for x, y in zip(a.split()[2:4], b.split()[2:4]):
            assert abs(float(x) - float(y)) < 0.03 * abs(float(x)) + 0.05, (a, b)


def test_multiple_choice_equals_llama_perplexity(smol, tmp_path):
    path, _, _ = smol
    f = tmp_path / "mc.bin"
    f.write_bytes(write_multiple_choice(choice_tasks(6)))
    res = ours(smol, "multiple-choice", f.read_bytes())
    # 3 to 5 answers a task: llama.cpp needs that many parallel sequences
    out = theirs(path, "multiple-choice", f, "-np", "8", binary=True)
    flipped = assert_same_scores(res, llama_lines(out, MC_LINE), "multiple-choice")
    final = llama_final(out, "Final result:") + llama_final(out, "Random chance:")
    assert final[1] == res.final[1]
    if not flipped:
        assert final == res.final


# -- parsers, choice of tasks, errors ----------------------------------------------------


def test_parse_hellaswag_and_its_errors():
    tasks = parse_hellaswag(hellaswag_text(3).encode())
    assert len(tasks) == 3 and all(len(t.endings) == 4 and 0 <= t.gold <= 3 for t in tasks)
    assert tasks[0].context.startswith("Reading: ")
    with pytest.raises(UserError, match="not a multiple of 6"):
        parse_hellaswag("ctx\n0\na\nb\nc\n")
    with pytest.raises(UserError, match="label must be 0-3"):
        parse_hellaswag("ctx\nx\na\nb\nc\nd\n")
    with pytest.raises(UserError, match="label must be 0-3"):
        parse_hellaswag("ctx\n4\na\nb\nc\nd\n")
    with pytest.raises(UserError, match="no HellaSwag tasks"):
        parse_hellaswag(b"")
    with pytest.raises(UserError, match="not UTF-8"):
        parse_hellaswag(b"\xff\n0\na\nb\nc\nd\n")


def test_parse_winogrande_as_llama_cpp_cuts_rows():
    text = ("index,sentence,option1,option2,answer\n"
            '0,"Ann, not Bo, said _ won.",Ann,Bo,1\n'
            "1,Cy met Di so _ smiled.,Cy,Di,2\n"
            "2,no blank here,a,b,1\n"
            "3,last _ row,a,b,2\n")  # never read: -f drops the final newline
    tasks, skipped = parse_winogrande(text, "w.csv")
    assert [(t.first, t.second, t.choices, t.answer) for t in tasks] == [
        ("Ann, not Bo, said ", " won.", ["Ann", "Bo"], 1),
        ("Cy met Di so ", " smiled.", ["Cy", "Di"], 2)]
    assert [s.split(": ", 1)[1] for s in skipped] == ["no _ in the sentence"] * 2
    with pytest.raises(UserError, match="no Winogrande tasks"):
        parse_winogrande("index,sentence,option1,option2,answer\n0,a _ b,x,y,3\n\n")


def test_multiple_choice_file_round_trip_and_errors():
    tasks = choice_tasks(5)
    data = write_multiple_choice(tasks)
    back, n = parse_multiple_choice(data)
    assert n == 5 and back == tasks
    picked, n = parse_multiple_choice(data, 3)
    assert n == 5 and picked == [tasks[i] for i in random_subset(5, 3)]
    with pytest.raises(UserError, match="not a multiple-choice task file"):
        parse_multiple_choice(b"\x00\x00\x00\x00")
    with pytest.raises(UserError, match="failed to read task 5 of 5"):
        parse_multiple_choice(data[:-3])
    bad = write_multiple_choice([ChoiceTask("q", ["a", ""], [1, 0])])
    with pytest.raises(UserError, match="empty question or answer"):
        parse_multiple_choice(bad)


def test_choice_of_tasks_is_llama_cpps():
    """std::mt19937(1) with libstdc++'s uniform_int_distribution: the first draws of
    llama-perplexity's HellaSwag order over 20 tasks, and Winogrande's pick of 10 of 50,
    as a C++ program built with the oracle's compiler prints them."""
    assert hellaswag_order(20, 12) == [8, 19, 13, 17, 0, 2, 6, 18, 3, 5, 1, 10]
    assert hellaswag_order(5, 9) == hellaswag_order(5, 5) and sorted(hellaswag_order(5, 9)) \
        == list(range(5))  # more than there are: all of them, still shuffled
    assert random_subset(50, 10) == [20, 48, 34, 43, 0, 5, 13, 42, 6, 9]


# -- the CLI and the sweep on a tiny model --------------------------------------------------


@pytest.fixture(scope="module")
def tiny(module_tmp, smollm2):
    from gguflab.synth import SynthConfig, write_synthetic_llama

    folder = module_tmp("tasks")
    model = folder / "tiny.gguf"
    write_synthetic_llama(model, SynthConfig(tokenizer_from=smollm2, n_layer=2, n_embd=256,
                                             n_ff=512, n_head=4, n_head_kv=2, tied=True))
    m = Model(str(model))
    tok = Tokenizer.from_gguf(m.reader)
    return folder, str(model), m, lambda s: tok.encode(s, add_special=True,
                                                       parse_special=False)


@pytest.mark.parametrize("kind", ["hellaswag", "winogrande", "multiple-choice"])
def test_cli_prints_llama_perplexity_lines(tiny, capsys, kind):
    folder, path, m, encode = tiny
    f = folder / f"{kind}.task"
    data = {"hellaswag": hellaswag_text(4).encode(), "winogrande": winogrande_text(5).encode(),
            "multiple-choice": write_multiple_choice(choice_tasks(3))}[kind]
    f.write_bytes(data)
    res = task_scores(m, encode, kind, data, 512, 3)
    assert cli.main(["perplexity", "-m", path, f"--{kind}", "-f", str(f),
                     f"--{kind}-tasks", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln for ln in out if ln in res.lines] == res.lines and len(res.lines) == 3
    assert out[-len(res.final) or len(out):] == res.final
    if kind == "hellaswag":
        assert "task\tacc_norm\t95% confidence interval" in out


def test_generator_yields_each_task_and_stops(tiny):
    _, _, m, encode = tiny
    steps = iter_task_scores(m, encode, "hellaswag", hellaswag_text(5).encode(), 512, 5)
    assert next(steps)[:2] == (1, 5)
    steps.close()  # a cancelled job: nothing more runs


def test_task_too_long_for_the_context(tiny, capsys):
    _, _, m, encode = tiny
    with pytest.raises(UserError, match="does not fit in the context window"):
        task_scores(m, encode, "hellaswag", hellaswag_text(2).encode(), 8)
    assert cli.main(["perplexity", "-m", tiny[1], "--winogrande"]) != 0
    assert "--winogrande needs its task file: -f FILE" in capsys.readouterr().err


def test_sweep_hellaswag_column(tiny):
    from gguflab.events import Finished
    from gguflab.quant.mixes import parse_mix
    from gguflab.sweep import (
        OPTIONAL_FIELDS,
        ROW_FIELDS,
        quant_path,
        render_table,
        sweep_model,
    )

    folder, path, _, _ = tiny
    hs = folder / "hs.txt"
    hs.write_text(hellaswag_text(4))
    events = list(sweep_model(path, ["Q8_0"], None, n_ctx=64, chunks=1, hellaswag=str(hs),
                              hellaswag_tasks=3))
    rows = events[-1].stats["rows"]
    assert isinstance(events[-1], Finished) and len(rows) == 2
    assert all(set(ROW_FIELDS + OPTIONAL_FIELDS) <= set(r) for r in rows)
    for row in rows:  # each file's score is what `perplexity --hellaswag` gives it
        m = Model(row["file"])
        tok = Tokenizer.from_gguf(m.reader)
        res = task_scores(m, lambda s, t=tok: t.encode(s, add_special=True, parse_special=False),
                          "hellaswag", hs.read_bytes(), 64, 3)
        assert row["hellaswag"] == res.acc
    assert rows[1]["file"] == quant_path(path, parse_mix("Q8_0"), None)
    assert "HellaSwag" in render_table(rows) and "HellaSwag" in open(
        events[-1].stats["markdown"]).read()
    again = list(sweep_model(path, ["Q8_0"], None, n_ctx=64, chunks=1, hellaswag=str(hs),
                             hellaswag_tasks=3))[-1].stats["rows"]
    assert [r["cached"] for r in again] == [True, True]
    assert [r["hellaswag"] for r in again] == [r["hellaswag"] for r in rows]
    plain = list(sweep_model(path, ["Q8_0"], None, n_ctx=64, chunks=1))[-1].stats["rows"]
    assert all(r["hellaswag"] is None for r in plain) and "HellaSwag" not in render_table(plain)
