import json
import os

import numpy as np
import pytest

from keras_ft import data, text_sources
from keras_ft.text_sources import load_text_source


def write_text_folder(root, counts):
    """Writes `counts[class]` files `NNN.txt` holding "CLASS text N" per class."""
    for name, n in counts.items():
        os.makedirs(root / name, exist_ok=True)
        for i in range(n):
            (root / name / f"{i:03d}.txt").write_text(f"{name} text {i}\n")
    return root


def _file(path, content):
    os.makedirs(path.parent, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------ folders


def test_folder_texts_labels_classes_and_report(tmp_path):
    write_text_folder(tmp_path, {"spam": 2, "ham": 1})
    _file(tmp_path / "ham" / "2019" / "deep.TXT", "\ufeff  nested, any depth \n\n")  # BOM, case
    _file(tmp_path / "ham" / "notes.md", "not a text example")
    _file(tmp_path / "spam" / "logo.png", b"\x89PNG")
    _file(tmp_path / "spam" / ".hidden.txt", "skipped")
    _file(tmp_path / "spam" / ".ipynb_checkpoints" / "000.txt", "a copy")
    os.symlink(tmp_path / "ham", tmp_path / "spam" / "linked")  # a folder link: not followed
    texts, report = load_text_source(f"folder:{tmp_path}")
    assert texts.class_names == ["ham", "spam"]  # sorted, whatever the order written
    assert texts.texts == ["ham text 0", "nested, any depth", "spam text 0", "spam text 1"]
    assert texts.labels.dtype == np.int32 and texts.labels.tolist() == [0, 0, 1, 1]
    assert [os.path.relpath(o, tmp_path) for o in texts.origins] == [
        "ham/000.txt", "ham/2019/deep.TXT", "spam/000.txt", "spam/001.txt",
    ]
    assert texts.val_mask is None and len(texts) == 4
    assert report.counts == {"ham": 2, "spam": 2} and report.num_examples == 4
    assert (report.files_scanned, report.ignored_files, report.latin1_records) == (7, 3, 0)


@pytest.mark.parametrize("val_name", ["val", "validation"])
def test_train_and_val_folders_are_the_own_split(tmp_path, val_name):
    write_text_folder(tmp_path / "train", {"neg": 3, "pos": 2})
    write_text_folder(tmp_path / val_name, {"neg": 1, "pos": 2})
    write_text_folder(tmp_path / "test", {"neg": 1, "pos": 1})  # not read
    texts, report = load_text_source(f"folder:{tmp_path}")
    assert texts.val_mask.tolist() == [False] * 5 + [True] * 3
    assert texts.labels.tolist() == [0, 0, 0, 1, 1, 0, 1, 1]
    assert report.num_examples == 8 and report.files_scanned == 8
    train, val = data.split_as_given(texts)
    assert train.val_mask is None and val.val_mask is None
    assert val.texts == ["neg text 0", "pos text 0", "pos text 1"]
    assert {o.split(os.sep)[-3] for o in val.origins} == {val_name}
    assert {o.split(os.sep)[-3] for o in train.origins} == {"train"}


@pytest.mark.parametrize(
    "files, message",
    [
        ({"b/x.txt": b"ok \xff\xfe here"}, r"^.*/b/x\.txt is not UTF-8 \(byte 0xff at offset 3\); "
         r"re-save it as UTF-8\.$"),
        ({"b/x.txt": b""}, r"^.*/b/x\.txt is empty; write its text or remove it\.$"),
        ({"b/x.txt": b" \n\t\n"}, r"/b/x\.txt is empty \(only white space\)"),
        ({"b/x.txt": b"PK\x03\x04\x00\x00"}, r"/b/x\.txt has a NUL byte \(at offset 4\): a binary file"),
        ({"b/x.md": b"no text file"}, r"Class folder '.*/b' has no \.txt files \(1 other file\(s\) "
         r"ignored\); add \.txt files or remove the folder\."),
        ({}, r"has 1 class sub-folder\(s\); put the \.txt files of each class \(at least 2\)"),
    ],
)
def test_bad_folder_files_fail_naming_the_file(tmp_path, files, message):
    write_text_folder(tmp_path, {"a": 2})
    for name, content in files.items():
        _file(tmp_path / name, content)
    with pytest.raises(ValueError, match=message):
        load_text_source(f"folder:{tmp_path}")


def test_a_link_leaving_the_folder_is_refused(tmp_path):
    write_text_folder(tmp_path / "data", {"a": 1, "b": 1})
    _file(tmp_path / "secret.txt", "outside")
    os.symlink(tmp_path / "secret.txt", tmp_path / "data" / "b" / "leak.txt")
    with pytest.raises(ValueError, match=r"/b/leak\.txt: link leaving the data folder"):
        load_text_source(f"folder:{tmp_path / 'data'}")


@pytest.mark.parametrize(
    "val, message",
    [
        ({"neg": 1}, r"Class folder 'pos' is in .*/train but not in .*/val"),
        (None, r"has a train/ folder and no val/ or validation/ folder"),
    ],
)
def test_train_and_val_folders_must_agree(tmp_path, val, message):
    write_text_folder(tmp_path / "train", {"neg": 1, "pos": 1})
    if val is not None:
        write_text_folder(tmp_path / "val", val)
    with pytest.raises(ValueError, match=message):
        load_text_source(f"folder:{tmp_path}")


def test_missing_folder_unknown_source_and_num_classes(tmp_path):
    with pytest.raises(ValueError, match=r"Data folder '.*/nope' does not exist"):
        load_text_source(f"folder:{tmp_path}/nope")
    with pytest.raises(ValueError, match=r"Unknown text data.source 'tfds:imdb'. Use one of: "
                       r"folder:..., csv:..., tsv:..., fortunes:..."):
        load_text_source("tfds:imdb")
    write_text_folder(tmp_path, {"a": 1, "b": 1})
    assert load_text_source(f"folder:{tmp_path}", num_classes=2)[0].class_names == ["a", "b"]
    with pytest.raises(ValueError, match=r"data.num_classes=3 but it has 2 classes \(a, b\)"):
        load_text_source(f"folder:{tmp_path}", num_classes=3)


# ------------------------------------------------------------------ CSV, TSV


def test_csv_with_class_names_quoted_newlines_and_extra_columns(tmp_path):
    path = _file(tmp_path / "reviews.csv", (
        "\ufeffid,label,text\n"  # a byte-order mark, columns in any order, an extra column
        '1, pos ,"Great, really\ngreat."\n'  # a quoted comma and newline: one row on lines 2-3
        "\n"  # blank lines are skipped
        "2,neg,  Dull  \n"
        "3,pos,Fine\n"
    ))
    texts, report = load_text_source(f"csv:{path}")
    assert texts.class_names == ["neg", "pos"]
    assert texts.texts == ["Great, really\ngreat.", "Dull", "Fine"]
    assert texts.labels.tolist() == [1, 0, 1]
    assert texts.origins == [f"{path}:line 2", f"{path}:line 5", f"{path}:line 6"]
    assert (report.files_scanned, report.num_examples) == (1, 3)


def test_tsv_separates_by_tabs(tmp_path):
    path = _file(tmp_path / "t.tsv", "text\tlabel\na, b, c\tx\nd\ty\n")
    texts, _ = load_text_source(f"tsv:{path}")
    assert texts.texts == ["a, b, c", "d"] and texts.class_names == ["x", "y"]
    # The same file read as CSV has no `text` column: "text\tlabel" is one name.
    with pytest.raises(ValueError, match=r"no 'text' or 'label' column; the header has 'text\\tlabel'"):
        load_text_source(f"csv:{path}")


def test_csv_with_integer_labels_and_num_classes(tmp_path):
    path = _file(tmp_path / "ints.csv", "text,label\na,0\nb,2\nc,1\nd,2\n")
    texts, _ = load_text_source(f"csv:{path}")
    assert texts.class_names == ["0", "1", "2"] and texts.labels.tolist() == [0, 2, 1, 2]
    assert load_text_source(f"csv:{path}", num_classes=3)[0].labels.tolist() == [0, 2, 1, 2]
    with pytest.raises(ValueError, match=r"ints.csv line 3: label 2 is out of range "
                       r"\(data.num_classes=2 allows 0..1\)"):
        load_text_source(f"csv:{path}", num_classes=2)
    with pytest.raises(ValueError, match=r"no row has label 3, but data.num_classes=4"):
        load_text_source(f"csv:{path}", num_classes=4)
    names = _file(tmp_path / "names.csv", "text,label\na,x\nb,y\n")
    with pytest.raises(ValueError, match=r"names.csv: data.num_classes=3 but its labels name 2 "
                       r"classes \(x, y\)"):
        load_text_source(f"csv:{names}", num_classes=3)


@pytest.mark.parametrize(
    "content, message",
    [
        ("body,class\nhi,a\n", r"bad.csv line 1: no 'text' or 'label' column; the header has "
         r"'body', 'class'\. The first line must name the columns once each, e.g\. `text,label`\."),
        ("text,kind\nhi,a\n", r"bad.csv line 1: no 'label' column; the header has 'text', 'kind'"),
        ("text,label,text\nhi,a,b\n", r"bad.csv line 1: more than one 'text' column"),
        ("", r"bad.csv line 1: no header"),
        ("text,label\n", r"bad.csv has a header but no rows"),
        ("text,label\nhi,a\n  ,b\n", r"^\S*bad.csv line 3: empty text; give every row its text"),
        ('text,label\nhi,a\n"",b\n', r"bad.csv line 3: empty text"),
        ("text,label\nhi,a\nho, \n", r"bad.csv line 3: empty label; give every text its class\.$"),
        ("text,label\nhi,a\nho,b,c\n", r"bad.csv line 3: 3 field\(s\) but the header has 2; "
         "quote fields that contain commas"),
        ('text,label\nhi,a\n"ho,b\n', r"bad.csv line 3: unexpected end of data; check its quotes"),
        (b"text,label\nhi,a\nh\xe9,b\n", r"^\S*bad.csv line 3 is not UTF-8 \(byte 0xe9 at offset 17\); "
         r"re-save it as UTF-8\.$"),
        (b"text,label\nhi,a\nh\x00,b\n", r"bad.csv line 3 has a NUL byte \(at offset 17\)"),
        ("text,label\nhi,a\nho,1\n", r"bad.csv: line 3 has the integer label '1' but line 2 the "
         r"class name 'a'; use class names throughout or integers 0..K-1 throughout\."),
        ("text,label\nhi,-1\nho,0\n", r"bad.csv line 2: label -1 is out of range"),
        ("text,label\nhi,a\nho,a\n", r"bad.csv: every row has the label 'a'; a classifier needs "
         "at least 2 classes"),
    ],
)
def test_csv_errors_name_the_file_line_and_fix(tmp_path, content, message):
    path = _file(tmp_path / "bad.csv", content)
    with pytest.raises(ValueError, match=message):
        load_text_source(f"csv:{path}")


def test_tsv_errors_speak_of_tabs(tmp_path):
    path = _file(tmp_path / "bad.tsv", "text\tlabel\nhi\ta\tz\n")
    with pytest.raises(ValueError, match=r"bad.tsv line 2: 3 field\(s\).*contain tabs"):
        load_text_source(f"tsv:{path}")
    with pytest.raises(ValueError, match=r"Text file '.*/nope.tsv' does not exist"):
        load_text_source(f"tsv:{tmp_path}/nope.tsv")


# ------------------------------------------------------------------ fortunes


@pytest.fixture
def fortunes_dir(tmp_path, monkeypatch):
    """A fortunes folder of two topics, with strfile's index files beside them."""
    root = tmp_path / "fortunes"
    _file(root / "zen", b"Be here now.\n%\n\n%\n  Let go.  \n%\nCaf\xe9 koan.\n%\n")
    _file(root / "cats", "Cats nap.\n%\nCats\n%\u00e9tude\n%\nPurr.")  # no final %
    _file(root / "cats.dat", b"\x00\x00\x00\x02")
    os.symlink(root / "cats", root / "cats.u8")
    monkeypatch.setattr(text_sources, "FORTUNES_DIR", str(root))
    return root


def test_fortunes_topics_are_classes_and_records_examples(fortunes_dir):
    texts, report = load_text_source("fortunes:zen,cats")
    assert texts.class_names == ["cats", "zen"]  # sorted, not in the order given
    assert texts.texts == [
        "Cats nap.", "Cats\n%\u00e9tude", "Purr.", "Be here now.", "Let go.", "Caf\u00e9 koan.",
    ]
    assert texts.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert texts.origins[1] == f"{fortunes_dir}/cats:line 3"
    assert texts.origins[5] == f"{fortunes_dir}/zen:line 7"
    assert (report.latin1_records, report.files_scanned) == (1, 2)  # "Caf\xe9" is latin-1
    assert report.counts == {"cats": 3, "zen": 3}
    assert any("1 fortune record(s) are not UTF-8" in line for line in report.lines())


def test_fortunes_errors_name_the_topic_and_the_choices(fortunes_dir, monkeypatch):
    with pytest.raises(ValueError, match=r"Unknown fortunes topic 'dogs'\. Choose from: cats, zen\.$"):
        load_text_source("fortunes:cats,dogs")
    with pytest.raises(ValueError, match=r"fortunes:cats names 1 topic; a classifier needs at least 2"):
        load_text_source("fortunes:cats")
    with pytest.raises(ValueError, match=r"names 'cats' twice"):
        load_text_source("fortunes:cats,zen,cats")
    with pytest.raises(ValueError, match=r"data.num_classes=3 but it has 2 classes \(cats, zen\)"):
        load_text_source("fortunes:cats,zen", num_classes=3)
    monkeypatch.setattr(text_sources, "FORTUNES_DIR", str(fortunes_dir / "gone"))
    with pytest.raises(ValueError, match=r"^A fortunes: source needs Debian's fortunes package: "
                       r"apt-get install fortunes \(there is no folder .*/gone\)\.$"):
        load_text_source("fortunes:cats,zen")


def test_real_fortunes_package():
    if not os.path.isdir(text_sources.FORTUNES_DIR):
        pytest.skip(f"no {text_sources.FORTUNES_DIR}: apt-get install fortunes")
    topics = text_sources.fortune_topics()
    if not {"computers", "food"} <= set(topics):
        pytest.skip(f"the fortunes package here lacks computers or food: {topics}")
    texts, report = load_text_source("fortunes:food,computers")
    assert texts.class_names == ["computers", "food"]
    assert not any(t.endswith(".dat") or t.endswith(".u8") for t in topics)
    counts = np.bincount(texts.labels)
    assert counts.min() > 100 and report.num_examples == len(texts) == counts.sum()
    assert all(t and t == t.strip() and "\n%\n" not in t for t in texts.texts)
    train, val = data.split(texts, 0.1, seed=0)
    assert len(val) == sum(round(n * 0.1) for n in counts)


# ------------------------------------------------------------------ splits


def test_keras_ft_data_splits_a_text_set_stratified_and_seeded(tmp_path):
    write_text_folder(tmp_path, {"a": 10, "b": 20})
    texts, _ = load_text_source(f"folder:{tmp_path}")
    train, val = data.split(texts, 0.2, seed=3)
    again_train, again_val = data.split(texts, 0.2, seed=3)
    other_train, _ = data.split(texts, 0.2, seed=4)
    assert isinstance(train, text_sources.TextSet)
    assert train.texts == again_train.texts and val.texts == again_val.texts
    assert train.texts != other_train.texts
    assert np.bincount(val.labels).tolist() == [2, 4]
    assert sorted(train.texts + val.texts) == sorted(texts.texts)
    # Texts, labels and origins stay aligned through the split.
    for part in (train, val):
        for text, label, origin in zip(part.texts, part.labels, part.origins):
            assert text == open(origin).read().strip()
            assert text.startswith(part.class_names[label])
    few = data.per_class(train, 3, seed=0)
    assert np.bincount(few.labels).tolist() == [3, 3]
    assert set(few.texts) <= set(train.texts)


# ------------------------------------------------------------------ report


def test_report_lines_and_json(tmp_path):
    write_text_folder(tmp_path, {"a": 1, "b": 3})
    _file(tmp_path / "a" / "x.csv", "ignored")
    _, report = load_text_source(f"folder:{tmp_path}")
    lines = report.lines()
    assert lines[0].startswith(
        f"Read 4 texts in 2 classes from folder:{tmp_path} (5 files scanned, 1 ignored (not .txt); "
    )
    assert lines[1] == "Texts per class: a 1, b 3 (largest/smallest 3.0x)."
    assert len(lines) == 2  # no latin-1 line
    loaded = json.loads(report.to_json())
    assert loaded["counts"] == {"a": 1, "b": 3} and loaded["ignored_files"] == 1
    assert loaded["class_names"] == ["a", "b"] and loaded["num_examples"] == 4
