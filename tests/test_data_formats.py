"""Readers: every format from a fixture file, the real ml-latest-small, csv and Parquet with a column
mapping, implicit feedback, and precise errors on bad rows."""

from __future__ import annotations

import datetime
import hashlib
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from data import formats
from data.formats import (
    MAX_TIMESTAMP,
    Columns,
    FileSource,
    Format,
    IdType,
    MalformedFileError,
    ReadOptions,
    TextFile,
    detect_format,
    read_events,
    read_ratings,
    read_titles,
)
from data.interactions import COLUMNS
from serving import validation

FIXTURES = Path(__file__).parent / "fixtures"
FORMATS = FIXTURES / "formats"
SLICE = FIXTURES / "ml-latest-small"
HEADER = "userId,movieId,rating,timestamp\n"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-latest-small"


def test_movielens_csv_slice_reads_verbatim() -> None:
    interactions = FileSource(SLICE).load()
    frame = interactions.frame
    assert tuple(frame.columns) == COLUMNS
    assert [str(t) for t in frame.dtypes] == ["int64", "int64", "int64", "float64"]
    assert interactions.counts() == (699, 8, 503)
    # First and last data lines of the file, in file order.
    assert frame.iloc[0].tolist() == [1, 31, 1260759144, 2.5]
    assert frame.iloc[-1].tolist() == [8, 44004, 1154473017, 3.0]
    assert interactions.raw_item_kind == "movieId"
    assert interactions.source == f"movielens-csv:{SLICE / 'ratings.csv'}"
    # movies.csv beside it gives titles, commas inside quotes included.
    titles = interactions.titles.set_index("item")["title"]
    assert titles[31] == "Dangerous Minds (1995)"
    assert titles[50] == "Usual Suspects, The (1995)"
    assert len(titles) == 503


def test_checksum_covers_ratings_and_titles() -> None:
    source = FileSource(SLICE / "ratings.csv")
    expected = hashlib.sha256((SLICE / "ratings.csv").read_bytes() + (SLICE / "movies.csv").read_bytes())
    assert source.checksum() == expected.hexdigest()
    assert source.inputs == [SLICE / "ratings.csv", SLICE / "movies.csv"]


@pytest.mark.skipif(not (SHARED / "ratings.csv").is_file(), reason="no ../shared/data/ml-latest-small")
def test_full_ml_latest_small() -> None:
    interactions = FileSource(SHARED).load()
    assert interactions.counts() == (100_004, 671, 9_066)
    assert interactions.frame["rating"].isin(np.arange(0.5, 5.01, 0.5)).all()
    assert len(interactions.titles) == 9_125
    assert interactions.frame["timestamp"].between(789_000_000, 1_477_000_000).all()  # 1995 .. 2016


def test_movielens_dat_with_latin1_titles() -> None:
    interactions = FileSource(FORMATS / "movielens-dat").load()
    frame = interactions.frame
    assert interactions.source.startswith("movielens-dat:")
    assert len(frame) == 10
    assert frame.iloc[5].tolist() == [3, 10, 300, 1.0]
    titles = interactions.titles.set_index("item")["title"]
    assert titles[20] == "Misérables, Les (1995)"  # Latin-1 byte 0xE9 in the file
    assert titles[40] == "Star Wars: Episode IV - A New Hope (1977)"  # ':' inside a '::' file


def test_amazon_csv_keeps_string_ids() -> None:
    frame = read_ratings(FORMATS / "amazon_ratings.csv", Format.AMAZON_CSV)
    assert frame["item"].tolist()[:3] == ["0000000001", "0000000002", "B00000ABCD"]  # leading zeros kept
    assert frame["user"].iloc[0] == "A1XYZ"
    assert frame["timestamp"].dtype == np.int64 and frame["rating"].dtype == np.float64


def test_recbole_inter_with_crlf_and_utf8() -> None:
    frame = read_ratings(FORMATS / "sample.inter", Format.RECBOLE_INTER)
    assert frame["user"].tolist() == ["1m_1", "1m_1", "1m_2", "1m_2"]
    assert frame["item"].iloc[3] == "Misérables, Les (1995)"
    assert frame["timestamp"].tolist() == [978300760, 978302109, 978300275, 978300100]


def test_zip_member_reads_like_a_file(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(FORMATS / "movielens-dat" / "ratings.dat", "inner/ratings.dat")
    from_zip = read_ratings(TextFile(archive, "inner/ratings.dat"), Format.MOVIELENS_DAT)
    from_file = read_ratings(FORMATS / "movielens-dat" / "ratings.dat", "movielens-dat")
    pd.testing.assert_frame_equal(from_zip, from_file)


@pytest.mark.parametrize(
    ("path", "fmt"),
    [
        (SLICE / "ratings.csv", Format.MOVIELENS_CSV),
        (FORMATS / "movielens-dat" / "ratings.dat", Format.MOVIELENS_DAT),
        (FORMATS / "amazon_ratings.csv", Format.AMAZON_CSV),
        (FORMATS / "sample.inter", Format.RECBOLE_INTER),
    ],
)
def test_detect_format(path: Path, fmt: Format) -> None:
    assert detect_format(path) is fmt


# --- malformed rows -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "fmt", "message"),
    [
        (
            "ratings.csv",
            Format.MOVIELENS_CSV,
            "ratings.csv line 7: expected userId,movieId,rating,timestamp (4 fields), "
            "got 3 fields: '1,31,2.5'",
        ),
        (
            "ratings.dat",
            Format.MOVIELENS_DAT,
            "ratings.dat line 3: expected UserID::MovieID::Rating::Timestamp (4 fields); "
            "Timestamp '12O' is not an integer: '2::10::5::12O'",
        ),
        (
            "amazon_ratings.csv",
            Format.AMAZON_CSV,
            "amazon_ratings.csv line 3: expected user,item,rating,timestamp (4 fields); "
            "timestamp '1.5e9' is not an integer",
        ),
        (
            "sample.inter",
            Format.RECBOLE_INTER,
            "sample.inter line 3: expected user_id<tab>item_id<tab>rating<tab>timestamp (4 fields); "
            "rating '' is not a finite number",
        ),
    ],
)
def test_malformed_fixture_names_file_and_line(name: str, fmt: Format, message: str) -> None:
    path = FORMATS / "malformed" / name
    with pytest.raises(MalformedFileError) as error:
        read_ratings(path, fmt)
    assert str(error.value).startswith(str(path.parent) + "/")
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("fmt", "text", "line", "complaint"),
    [
        (Format.MOVIELENS_CSV, "userId,movieId,rating\n1,2,3.0\n", 1, "expected the header"),
        (Format.MOVIELENS_CSV, HEADER + "1,2,3.0,4\n\n1,3,3.0,5\n", 3, "got an empty line"),
        (Format.MOVIELENS_CSV, HEADER + "1,2,3.0,4\n1,3,nan,5\n", 3, "rating 'nan' is not a finite number"),
        (Format.MOVIELENS_CSV, HEADER + "1,2,3.0,4\n1,3,3.0,5,6\n", 3, "got 5 fields"),
        (Format.MOVIELENS_CSV, HEADER + "1,2,3.0,99999999999999999999\n", 2, "is not an integer"),
        (Format.MOVIELENS_CSV, HEADER + "1,2,3.0,4\nx,3,3.0,5\n", 3, "userId 'x' is not an integer"),
        (Format.MOVIELENS_CSV, HEADER + "1,2,3.0,4\n1,3,3.0,5.0\n", 3, "timestamp '5.0' is not an integer"),
        (Format.MOVIELENS_DAT, "1::2::3::4\n1::3:3::5\n", 2, "got 3 fields"),
        (Format.AMAZON_CSV, "A,1,3.0,4\n,2,3.0,5\n", 2, "user '' is not an id"),
        (Format.AMAZON_CSV, "A,1,3.0,4\nA,\xff,3.0,5\n", 2, "not UTF-8"),
        # Serving refuses times outside [0, 2**53) seconds, so preparation does too.
        (Format.MOVIELENS_CSV, HEADER + "1,2,3.0,4\n1,3,3.0,-5\n", 3, "timestamp '-5' is not a time"),
        (Format.MOVIELENS_DAT, "1::2::3::-1\n1::3::3::5\n", 1, "Timestamp '-1' is not a time"),
        (Format.AMAZON_CSV, f"A,1,3.0,4\nA,2,3.0,{2**53}\n", 2, f"timestamp '{2**53}' is not a time"),
    ],
)
def test_bad_rows_are_named(tmp_path: Path, fmt: Format, text: str, line: int, complaint: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(MalformedFileError) as error:
        read_ratings(path, fmt)
    assert f"bad.txt line {line}:" in str(error.value)
    assert complaint in str(error.value)


def test_timestamp_range_is_servings() -> None:
    assert MAX_TIMESTAMP == validation.MAX_TIMESTAMP


# Issue #20, item 9: a copy cut inside the last row's timestamp still parses (``10626``: a 1970 time).
CUT = HEADER + "380,6584,4.0,1062612345\n380,6585,3.5,1062612399\n380,6586,4.0,10626"


def test_a_file_cut_inside_its_last_timestamp_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text(CUT)
    with pytest.raises(MalformedFileError) as error:
        read_ratings(path, Format.MOVIELENS_CSV)
    assert str(error.value).startswith(f"{path} line 4: the file ends inside this row")
    assert "timestamp 10626 has 5 digits where every other row's has at least 10" in str(error.value)
    assert "'380,6586,4.0,10626'" in str(error.value)


@pytest.mark.parametrize(
    "text",
    [
        CUT + "\n",  # ends with a line break: the row is as written (the error's advice when it is right)
        CUT + "12345",  # no line break, but the timestamp is as long as the others'
        HEADER + "1,2,3.0,99999999\n1,3,3.0,1062612399\n1,4,3.0,12345678",  # another as short: no sign
        HEADER + "1,2,3.0,12",  # a single row: nothing to compare with
    ],
)
def test_files_not_cut_are_read(tmp_path: Path, text: str) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text(text)
    assert len(read_ratings(path, Format.MOVIELENS_CSV)) == len(text.rstrip("\n").split("\n")) - 1


def test_a_zip_member_cut_inside_its_last_timestamp_is_an_error(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ml/ratings.dat", "1::10::5::978300760\n1::20::4::978302109\n2::10::3::9783")
    with pytest.raises(MalformedFileError, match=r"a.zip!ml/ratings.dat line 3: the file ends inside"):
        read_ratings(TextFile(archive, "ml/ratings.dat"), Format.MOVIELENS_DAT)


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text("userId,movieId,rating,timestamp\n")
    with pytest.raises(MalformedFileError, match="ratings.csv: no interactions"):
        read_ratings(path, Format.MOVIELENS_CSV)


def test_malformed_titles_are_named(tmp_path: Path) -> None:
    path = tmp_path / "movies.dat"
    path.write_text("1::Toy Story (1995)::Comedy\n2::Jumanji (1995)\n")
    with pytest.raises(MalformedFileError, match=r"movies.dat line 2: expected MovieID::Title::Genres"):
        read_titles(path)


def test_unknown_format_and_missing_ratings_file(tmp_path: Path) -> None:
    (tmp_path / "log.txt").write_text("a;b;c\n")
    with pytest.raises(MalformedFileError, match="cannot tell its format from 'a;b;c'; pass --format"):
        FileSource(tmp_path / "log.txt")
    with pytest.raises(FileNotFoundError, match="neither ratings.csv nor ratings.dat"):
        FileSource(tmp_path)


# --- Arrow's reader threads ---------------------------------------------------------------------
class _ClosingSpy:
    """Stands for a CSVStreamingReader and notes whether it was closed."""

    def __init__(self, reader: pacsv.CSVStreamingReader, log: list[str]) -> None:
        self.reader, self.log = reader, log

    def __iter__(self):  # noqa: ANN204
        return iter(self.reader)

    def __enter__(self) -> _ClosingSpy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.log.append("closed")
        self.reader.close()


def test_arrow_reads_no_python_file_and_the_stream_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #20, item 8. Arrow reads ahead on its own threads: handed a Python file object, they
    call back into Python for every block, and one still reading when the interpreter exits waits
    for the GIL for ever (``python -m data.prepare`` hung after naming the bad line). So Arrow must
    get a native stream, and the streaming reader that failed on a later block must be closed."""
    monkeypatch.setattr(formats, "BLOCK_BYTES", 1 << 20)  # blocks of 1 MB: the bad row is in a later one
    inputs: list[object] = []
    log: list[str] = []
    real_read, real_open = pacsv.read_csv, pacsv.open_csv

    def read_csv(source: object, **kwargs: object) -> pa.Table:
        inputs.append(source)
        return real_read(source, **kwargs)

    def open_csv(source: object, **kwargs: object) -> _ClosingSpy:
        inputs.append(source)
        return _ClosingSpy(real_open(source, **kwargs), log)

    monkeypatch.setattr(pacsv, "read_csv", read_csv)
    monkeypatch.setattr(pacsv, "open_csv", open_csv)
    path = tmp_path / "ratings.csv"
    # The first 1 MB block is fine, so the streaming reader opens and fails later, while reading.
    rows = [f"{i % 50 + 1},{i % 300 + 1},4.0,{1_000_000_000 + i}\n" for i in range(60_000)]
    rows[50_000] = "1,2,3.0,4,5\n"
    path.write_text(HEADER + "".join(rows))
    with pytest.raises(MalformedFileError, match="ratings.csv line 50002: .* got 5 fields"):
        read_ratings(path, Format.MOVIELENS_CSV)
    assert len(inputs) == 1  # one streaming reader (the good path is no other read)
    python_files = [s for s in inputs if not isinstance(s, pa.NativeFile) or isinstance(s, pa.PythonFile)]
    assert python_files == []
    assert log == ["closed"]


# --- csv and Parquet with a column mapping ------------------------------------------------------
def test_a_csv_with_a_quoted_header_as_pyarrow_writes_it(tmp_path: Path) -> None:
    """Issue #14: the same events written by pyarrow's default csv writer (a quoted header line, valid
    csv) were refused: "rating 'rating' is not a finite number". Now it is the csv format, header
    unquoted, and a quoted MovieLens header is the MovieLens header."""
    table = pa.table({"user": [1, 1, 2, 2], "item": [10, 20, 10, 30], "rating": [4.0, 3.0, 5.0, 1.0],
                      "timestamp": [100, 200, 300, 400]})
    path = tmp_path / "events.csv"
    pacsv.write_csv(table, path)
    assert path.read_text().splitlines()[0] == '"user","item","rating","timestamp"'
    assert detect_format(path) is Format.CSV
    frame = FileSource(path).load().frame
    assert frame.values.tolist() == [["1", "10", 100, 4.0], ["1", "20", 200, 3.0], ["2", "10", 300, 5.0],
                                     ["2", "30", 400, 1.0]]  # ids as strings by default
    assert read_ratings(path, Format.CSV, ReadOptions(id_type=IdType.INT))["user"].tolist() == [1, 1, 2, 2]
    movielens = tmp_path / "ratings.csv"
    pacsv.write_csv(table.rename_columns(["userId", "movieId", "rating", "timestamp"]), movielens)
    assert detect_format(movielens) is Format.MOVIELENS_CSV
    assert read_ratings(movielens, Format.MOVIELENS_CSV)["item"].tolist() == [10, 20, 10, 30]


def test_csv_column_mapping_delimiter_and_quoting(tmp_path: Path) -> None:
    path = tmp_path / "log.tsv"
    path.write_text('ts;kind;uid;sku;stars;note\n'
                    '5;view;A1;007;4.5;"a; quoted field"\n'
                    '6;buy;"B;2";008;3;plain\n')
    columns = Columns(user="uid", item="sku", timestamp="ts", rating="stars", event_type="kind")
    options = ReadOptions(columns=columns, delimiter=";")
    assert detect_format(path, options) is Format.CSV
    (batch,) = list(read_events(path, Format.CSV, options))
    assert batch.schema.names == ["user", "item", "timestamp", "rating", "event_type"]
    assert batch.column("user").to_pylist() == ["A1", "B;2"]
    assert batch.column("item").to_pylist() == ["007", "008"]  # strings: leading zeros kept
    assert batch.column("timestamp").to_pylist() == [5, 6]
    assert batch.column("rating").to_pylist() == [4.5, 3.0]
    assert batch.column("event_type").to_pylist() == ["view", "buy"]
    with pytest.raises(MalformedFileError, match=r"log.tsv line 2: expected ts;kind;uid;sku;stars;note \(6 fields\); "
                                                 r"uid 'A1' is not an integer"):
        list(read_events(path, Format.CSV, replace(options, id_type=IdType.INT)))


def test_csv_without_a_header_line(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("u1,i1,10\nu1,i2,11\nu2,i1,12\n")
    options = ReadOptions(column_names=("user", "item", "timestamp"))
    assert detect_format(path, options) is Format.CSV
    frame = read_ratings(path, Format.CSV, options)
    assert frame["user"].tolist() == ["u1", "u1", "u2"] and len(frame) == 3  # line 1 is data
    assert frame["rating"].isna().all()  # no rating column: implicit feedback


def test_a_mapped_column_that_is_missing_is_named(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("uid,item,timestamp\n1,2,3\n")
    with pytest.raises(MalformedFileError, match=r"log.csv line 1: the header \['uid', 'item', 'timestamp'\] has "
                                                 r"no column 'user' for the users; map the columns"):
        read_ratings(path, Format.CSV)
    with pytest.raises(MalformedFileError, match="no rating column 'stars'"):
        read_ratings(path, Format.CSV, ReadOptions(columns=Columns(user="uid", rating="stars")))


def test_implicit_feedback(tmp_path: Path) -> None:
    """A file without a rating column has no ratings; implicit=True ignores one that is there."""
    path = tmp_path / "clicks.csv"
    path.write_text("user,item,timestamp,rating\na,x,1,5\na,y,2,4\n")
    assert "rating" in next(read_events(path, Format.CSV)).schema.names
    (batch,) = read_events(path, Format.CSV, ReadOptions(implicit=True))
    assert batch.schema.names == ["user", "item", "timestamp"]
    frame = read_ratings(path, Format.CSV, ReadOptions(implicit=True))
    assert frame["rating"].isna().all() and frame["rating"].dtype == np.float64


def write_parquet(path: Path, **columns: pa.Array) -> Path:
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_with_a_mapping_and_its_own_types(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "events.parquet",
        customer=pa.array([7, 7, 9], pa.int32()),
        product=pa.array(["p1", "p2", "p1"]).dictionary_encode(),
        when=pa.array([1_000_000, 2_500_000, 3_999_999], pa.timestamp("ms", tz="UTC")),
        score=pa.array([1, 2, 3], pa.int8()),
        extra=pa.array(["x", "y", "z"]),
    )
    options = ReadOptions(columns=Columns(user="customer", item="product", timestamp="when", rating="score"))
    assert detect_format(path) is Format.PARQUET
    (batch,) = read_events(path, Format.PARQUET, options)
    assert batch.schema.names == ["user", "item", "timestamp", "rating"]
    assert batch.column("user").type == pa.int64() and batch.column("user").to_pylist() == [7, 7, 9]
    assert batch.column("item").to_pylist() == ["p1", "p2", "p1"]
    assert batch.column("timestamp").to_pylist() == [1_000, 2_500, 3_999]  # whole seconds, floored
    assert batch.column("rating").to_pylist() == [1.0, 2.0, 3.0]
    dates = write_parquet(tmp_path / "dates.parquet", user=pa.array(["a"]), item=pa.array(["b"]),
                          timestamp=pa.array([datetime.date(1970, 1, 3)]))
    assert next(read_events(dates, Format.PARQUET)).column("timestamp").to_pylist() == [2 * 86_400]


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"user": pa.array(["a", None, "c"])}, "row 2: user (user) is null"),
        ({"user": pa.array(["a", "b", ""])}, "row 3: user '' is not an id"),
        ({"timestamp": pa.array([1, -5, 3])}, "row 2: timestamp -5 is not a time"),
        ({"rating": pa.array([1.0, 2.0, float("nan")])}, "row 3: rating nan is not a finite number"),
        ({"timestamp": pa.array([1.5, 2.5, 3.5])}, "column 'timestamp' (timestamp) is double: times must be"),
    ],
)
def test_bad_parquet_rows_are_named(tmp_path: Path, columns: dict[str, pa.Array], message: str) -> None:
    base = {"user": pa.array(["a", "b", "c"]), "item": pa.array(["x", "y", "z"]), "timestamp": pa.array([1, 2, 3]),
            "rating": pa.array([1.0, 2.0, 3.0])}
    path = write_parquet(tmp_path / "bad.parquet", **(base | columns))
    with pytest.raises(MalformedFileError) as error:
        read_ratings(path, Format.PARQUET)
    assert str(error.value).startswith(f"{path}")
    assert message in str(error.value)


def test_bad_rows_of_a_mapped_csv_are_named(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("uid,iid,t\nu1,i1,1\nu1,i2,-3\n")
    with pytest.raises(MalformedFileError, match=r"log.csv line 3: t '-3' is not a time"):
        read_ratings(path, Format.CSV, ReadOptions(columns=Columns(user="uid", item="iid", timestamp="t")))
    path.write_text("uid,iid,t\nu1,i1,1\nu1,i2\n")
    with pytest.raises(MalformedFileError, match=r"log.csv line 3: expected uid,iid,t \(3 fields\), got 2 fields"):
        read_ratings(path, Format.CSV, ReadOptions(columns=Columns(user="uid", item="iid", timestamp="t")))
