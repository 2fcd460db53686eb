"""The authors' text format: round trip, fitting to seq_len, validation hold-out, errors."""

import numpy as np
import pytest

from duet_jax.data import authors_format
from duet_jax.data.samples import SampleConfig, build_samples
from duet_jax.errors import DataError


def small_splits():
    rng = np.random.default_rng(0)
    sequences = [rng.permutation(np.arange(1, 40))[:n] for n in (8, 12, 15)]
    return build_samples(
        sequences,
        np.array([4, 6, 9]),
        np.array([6, 9, 12]),
        39,
        SampleConfig(seq_len=5, sync_every=2),
        seed=0,
    )


def test_write_then_read_round_trips_exactly(tmp_path):
    splits = small_splits()
    path = str(tmp_path / "train.txt")
    authors_format.write_samples(path, splits.train)
    back = authors_format.read_samples(path, seq_len=5)
    for field in back.FIELDS:
        np.testing.assert_array_equal(getattr(back, field), getattr(splits.train, field))
        assert getattr(back, field).dtype == getattr(splits.train, field).dtype


def test_one_line_parses_as_the_authors_loader_reads_it(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("17;532;12,40,7,0,0;12,40,7,9,0;1\n3;8;;5,0,0,0,0;0.0\n")
    s = authors_format.read_samples(str(path), seq_len=5)
    assert s.user.tolist() == [17, 3] and s.target.tolist() == [532, 8]
    assert s.trigger_seq.tolist() == [[12, 40, 7, 0, 0], [0, 0, 0, 0, 0]]
    assert s.click_seq.tolist() == [[12, 40, 7, 9, 0], [5, 0, 0, 0, 0]]
    assert s.label.tolist() == [1.0, 0.0]


def test_sequences_are_fitted_to_seq_len_keeping_the_latest_items(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("1;9;1,2,3,4,0,0;1,2,3,4,5,6;1\n")
    s = authors_format.read_samples(str(path), seq_len=3)
    assert s.trigger_seq.tolist() == [[2, 3, 4]] and s.click_seq.tolist() == [[4, 5, 6]]
    s = authors_format.read_samples(str(path), seq_len=8)
    assert s.click_seq.tolist() == [[1, 2, 3, 4, 5, 6, 0, 0]]


@pytest.mark.parametrize(
    "line, message",
    [
        ("1;2;3,0;3,0", r"t.txt, line 2: expected 5 fields user;target;trigger_seq;click_seq;"),
        ("1;x;3,0;3,0;1", r"t.txt, line 2: target 'x' is not an integer"),
        ("1;2;3,a;3,0;1", r"t.txt, line 2: trigger_seq id 'a' is not an integer"),
        ("1;2;3,0;0,4;1", r"t.txt, line 2: click_seq is not right-padded: item id 4 follows"),
        ("1;2;3,0;3,0;2", r"t.txt, line 2: label '2' is not 0 or 1"),
        ("-1;2;3,0;3,0;1", r"t.txt, line 2: user -1 is below 0"),
    ],
)
def test_malformed_line_names_file_line_and_expectation(tmp_path, line, message):
    path = tmp_path / "t.txt"
    path.write_text("1;2;3,0;3,0;1\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        authors_format.read_samples(str(path), seq_len=2)


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.txt: file not found"):
        authors_format.read_samples(str(tmp_path / "nope.txt"), seq_len=2)
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(DataError, match=r"e.txt: no samples"):
        authors_format.read_samples(str(tmp_path / "e.txt"), seq_len=2)


def test_validation_holdout_takes_each_users_last_groups_whole(tmp_path):
    splits = small_splits()
    for name in ("train", "test"):
        authors_format.write_samples(str(tmp_path / f"{name}.txt"), getattr(splits, name))
    loaded = authors_format.load_splits(
        str(tmp_path / "train.txt"), "", str(tmp_path / "test.txt"), seq_len=5, val_frac=0.25
    )
    assert len(loaded.train) + len(loaded.val) == len(splits.train)
    # each positive travels with its num_negatives=1 negative
    assert loaded.val.label.sum() * 2 == len(loaded.val)
    for user in range(3):
        train_rows = np.flatnonzero(splits.train.user == user)
        groups = len(train_rows) // 2
        held = max(1, int(0.25 * groups)) * 2
        np.testing.assert_array_equal(
            loaded.val.target[loaded.val.user == user], splits.train.target[train_rows[-held:]]
        )
    assert loaded.num_items <= 39 and loaded.num_users == 3
