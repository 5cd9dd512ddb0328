"""Raw readers: every format is recognised, read exactly, and every bad input is a DataError."""

from __future__ import annotations

import gzip
import json
import re
import time
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uclr_cli.data.raw import RAW_SCHEMA, RawDomain
from uclr_cli.data.readers import read_amazon, read_douban, read_files, safe_domain_name, select_domains
from uclr_cli.errors import DataError

DOUBAN = Path(__file__).resolve().parents[1].parent / "shared/data/douban"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")

CSV_2014 = (
    "A2SUAM1J3GNN3B,0000013714,5.0,1382659200\n"
    "A14VAT5EAX3D9S,B000FA64PK,4.0,1363392000\n"
    "AO94DHGC771SJ,000100039X,3.0,1252800000\n"
)
ROWS_2014 = [
    ("A2SUAM1J3GNN3B", "0000013714", 5.0, 1382659200, 1),
    ("A14VAT5EAX3D9S", "B000FA64PK", 4.0, 1363392000, 2),
    ("AO94DHGC771SJ", "000100039X", 3.0, 1252800000, 3),
]
CSV_2018 = "".join(f"{i},{u},{r},{t}\n" for u, i, r, t, _ in ROWS_2014)


def review(user="A2SUAM1J3GNN3B", item="0000013714", overall=5.0, ts=1252800000) -> str:
    """One 2014/2018 review line with the usual extra keys."""
    return (
        json.dumps(
            {
                "reviewerID": user,
                "asin": item,
                "reviewerName": "J. McDonald",
                "helpful": [2, 3],
                "reviewText": 'I "bought" this, twice.',
                "overall": overall,
                "summary": "Heavenly",
                "unixReviewTime": ts,
                "reviewTime": "09 13, 2009",
                "style": {"Format:": " Hardcover"},
            }
        )
        + "\n"
    )


def write(folder: Path, name: str, content: str | bytes, gz: bool = False) -> Path:
    p = folder / name
    p.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode() if isinstance(content, str) else content
    p.write_bytes(gzip.compress(data) if gz else data)
    return p


def rows(d: RawDomain) -> list[tuple]:
    frame = d.frame.collect() if isinstance(d.frame, pl.LazyFrame) else d.frame
    assert frame.schema == pl.Schema(RAW_SCHEMA)
    return frame.rows()


def error(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kw)
    return str(info.value)


# ---------------------------------------------------------------- amazon


def test_amazon_2014_ratings_csv(tmp_path):
    write(tmp_path, "ratings_Books.csv", CSV_2014)
    [d] = read_amazon(tmp_path)
    assert d.name == "books"
    assert d.meta["format"] == "amazon-2014-csv"
    assert d.path == tmp_path / "ratings_Books.csv"
    assert rows(d) == ROWS_2014


def test_amazon_2018_ratings_csv_item_first(tmp_path):
    write(tmp_path, "ratings_Movies_and_TV.csv", CSV_2018)
    [d] = read_amazon(tmp_path)
    assert d.name == "movies"
    assert d.meta["format"] == "amazon-2018-csv"
    assert rows(d) == ROWS_2014


def test_amazon_csv_layout_can_be_forced(tmp_path):
    write(tmp_path, "ratings_Books.csv", CSV_2014)
    [d] = read_amazon(tmp_path, csv_layout="item-user")
    assert [r[:2] for r in rows(d)] == [(i, u) for u, i, *_ in ROWS_2014]
    [d] = read_amazon(tmp_path, csv_layout="user-item")
    assert rows(d) == ROWS_2014


def test_amazon_undecidable_layout_asks_for_the_option(tmp_path):
    write(tmp_path, "ratings_Books.csv", "u1,i1,5,1\nu2,i2,4,2\n")
    msg = error(read_amazon, tmp_path)
    assert "--amazon-layout" in msg and "ratings_Books.csv" in msg
    [d] = read_amazon(tmp_path, csv_layout="user-item")
    assert rows(d) == [("u1", "i1", 5.0, 1, 1), ("u2", "i2", 4.0, 2, 2)]
    assert "--amazon-layout" in error(read_amazon, tmp_path, csv_layout="users-first")


def test_amazon_gzipped_csv_blank_lines_keep_their_numbers(tmp_path):
    text = "\n" + CSV_2014.replace("\n", "\n\n", 1).replace("1363392000", "1363392000.0")
    write(tmp_path, "ratings_Books.csv.gz", text, gz=True)
    [d] = read_amazon(tmp_path)
    assert d.name == "books"
    assert [r[4] for r in rows(d)] == [2, 4, 5]
    assert [r[3] for r in rows(d)] == [1382659200, 1363392000, 1252800000]


def test_amazon_review_json_plain_and_gzipped(tmp_path):
    lines = review() + review("A14VAT5EAX3D9S", "B000FA64PK", 4, 1363392000.0)
    write(tmp_path, "reviews_Electronics_5.json.gz", lines, gz=True)
    write(tmp_path, "Books_5.json", "\n" + lines)
    books, electronics = read_amazon(tmp_path)
    assert (books.name, electronics.name) == ("books", "electronics")
    assert books.meta["format"] == electronics.meta["format"] == "amazon-review-json"
    expected = [("A2SUAM1J3GNN3B", "0000013714", 5.0, 1252800000), ("A14VAT5EAX3D9S", "B000FA64PK", 4.0, 1363392000)]
    assert rows(electronics) == [e + (i,) for e, i in zip(expected, [1, 2])]
    assert rows(books) == [e + (i,) for e, i in zip(expected, [2, 3])]


def test_amazon_2023_jsonl_and_csv(tmp_path):
    rec = {
        "rating": 4.0,
        "title": "ok",
        "text": "fine",
        "images": [],
        "asin": "B00YQ6X8EO",
        "parent_asin": "B00YQ6X8EP",
        "user_id": "AGKHLEW2SOWHNMFQIJGBECAF7INQ",
        "timestamp": 1588687728923,
        "helpful_vote": 0,
        "verified_purchase": True,
    }
    write(tmp_path, "Books.jsonl.gz", json.dumps(rec) + "\n", gz=True)
    write(
        tmp_path,
        "Clothing_Shoes_and_Jewelry.csv",
        "user_id,parent_asin,rating,timestamp\nAGKHLEW2SOWHNMFQIJGBECAF7INQ,B00YQ6X8EP,5.0,1588687728999\n",
    )
    books, clothing = read_amazon(tmp_path)
    assert books.name == "books" and books.meta["format"] == "amazon-2023-jsonl"
    assert rows(books) == [("AGKHLEW2SOWHNMFQIJGBECAF7INQ", "B00YQ6X8EP", 4.0, 1588687728, 1)]
    assert clothing.name == "clothing_shoes_and_jewelry"
    assert rows(clothing) == [("AGKHLEW2SOWHNMFQIJGBECAF7INQ", "B00YQ6X8EP", 5.0, 1588687728, 2)]


@pytest.mark.parametrize(
    ("filename", "name"),
    [
        ("ratings_Books.csv", "books"),
        ("ratings_Movies_and_TV.csv", "movies"),
        ("Books.csv", "books"),
        ("Clothing_Shoes_and_Jewelry.csv", "clothing_shoes_and_jewelry"),
        ("reviews_Electronics_5.json.gz", "electronics"),
        ("Books_5.json.gz", "books"),
        ("Books.jsonl", "books"),
    ],
)
def test_amazon_domain_names(tmp_path, filename, name):
    content = review() if ".json" in filename else CSV_2014
    write(tmp_path, filename, content, gz=filename.endswith(".gz"))
    assert [d.name for d in read_amazon(tmp_path)] == [name]


def test_amazon_skips_files_that_are_not_data(tmp_path):
    write(tmp_path, "ratings_Books.csv", CSV_2014)
    write(tmp_path, "README.md", "# Amazon reviews\n")
    write(tmp_path, "notes.txt", "downloaded 2024\n")
    write(tmp_path, "meta_Books.json.gz", json.dumps({"asin": "0000013714", "title": "x"}) + "\n", gz=True)
    (tmp_path / "subfolder").mkdir()
    assert [d.name for d in read_amazon(tmp_path)] == ["books"]


def test_amazon_missing_folder(tmp_path):
    msg = error(read_amazon, tmp_path / "nope")
    assert "folder not found" in msg and "nope" in msg


def test_amazon_no_recognised_file(tmp_path):
    write(tmp_path, "README.md", "# nothing here\n")
    assert "no recognised Amazon file" in error(read_amazon, tmp_path)


def test_amazon_unrecognised_data_file_is_an_error(tmp_path):
    write(tmp_path, "ratings_Books.csv", CSV_2014)
    write(tmp_path, "dump.bin", "hello world\n")
    msg = error(read_amazon, tmp_path)
    assert "dump.bin" in msg and "line 1" in msg


@pytest.mark.parametrize(("bad", "found"), [("A3BCDEFGHIJK,B000FA64PK,4.0", 3), ("A3BCDEFGHIJK,B000FA64PK,4.0,1,2", 5)])
def test_amazon_wrong_field_count_names_the_line(tmp_path, bad, found):
    write(tmp_path, "ratings_Books.csv", CSV_2014 + bad + "\n")
    msg = error(read_amazon, tmp_path)
    assert "ratings_Books.csv" in msg and "line 4" in msg and f"found {found}" in msg


@pytest.mark.parametrize("rating", ["five", "nan", "inf"])
def test_amazon_bad_rating_names_the_line(tmp_path, rating):
    write(tmp_path, "ratings_Books.csv", CSV_2014.replace("4.0", rating))
    msg = error(read_amazon, tmp_path)
    assert "ratings_Books.csv" in msg and "line 2" in msg and "rating" in msg


@pytest.mark.parametrize("ts", ["yesterday", "1363392000.5"])
def test_amazon_bad_time_names_the_line(tmp_path, ts):
    write(tmp_path, "ratings_Books.csv", CSV_2014.replace("1363392000", ts))
    msg = error(read_amazon, tmp_path)
    assert "ratings_Books.csv" in msg and "line 2" in msg and "timestamp" in msg


@pytest.mark.parametrize(
    ("name", "content"), [("ratings_Books.csv.gz", CSV_2014 * 500), ("Books_5.json.gz", review() * 50)]
)
def test_amazon_truncated_gzip(tmp_path, name, content):
    data = gzip.compress(
        "".join(c.replace("A2SUAM1J3GNN3B", f"A{i:013d}") for i, c in enumerate(content.splitlines(True))).encode()
    )
    write(tmp_path, name, data[: len(data) // 2])
    msg = error(read_amazon, tmp_path)
    assert "truncated or corrupt gzip file" in msg and name in msg


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ('{"reviewerID": "A1", "asin"\n', "not valid JSON"),
        ('{"reviewerID": "A1", "asin": "B000FA64PK", "unixReviewTime": 1}\n', "missing key 'overall'"),
        (review(overall="good"), "'overall' is not a finite number"),
        ('{"reviewerID": "A1", "asin": "B000FA64PK", "overall": NaN, "unixReviewTime": 1}\n', "not valid JSON"),
        (review(ts="soon"), "'unixReviewTime' is not an integer"),
    ],
)
def test_amazon_bad_json_line(tmp_path, bad, words):
    write(tmp_path, "Books_5.json", review() + review() + bad + review())
    msg = error(read_amazon, tmp_path)
    assert words in msg and "Books_5.json" in msg and "line 3" in msg


# ---------------------------------------------------------------- douban


def test_douban_release_layout(tmp_path):
    write(tmp_path, "douban_book/ratings.dat", "1\t1630\t4\n1\t1181\t4\n2\t1630\t5\n")
    write(tmp_path, "douban_book/ratings_200000.dat", "this file is ignored\n")
    write(tmp_path, "douban_music/ratings.dat", "2\t3601\t3\n\n2\t2171\t5\n")
    book, music = read_douban(tmp_path)
    assert (book.name, music.name) == ("book", "music")
    assert book.meta["format"] == "douban-ratings"
    assert rows(book) == [("1", "1630", 4.0, None, 1), ("1", "1181", 4.0, None, 2), ("2", "1630", 5.0, None, 3)]
    assert rows(music) == [("2", "3601", 3.0, None, 1), ("2", "2171", 5.0, None, 3)]


def test_douban_text_release(tmp_path):
    text = (
        '"user_id"\t"book_id"\t"rating"\t"labels"\t"comment"\t"time"\t"ID"\n'
        '"u1"\t"1000002"\t4\t"a,b"\t"he said "hi\tthere""\t"2009-12-19"\t1\n'
        '"u2"\t"1000003"\t5\t""\t"fine"\t"2010-01-02 12:00:00"\t2\n'
    )
    write(tmp_path, "bookreviews_cleaned.txt", text)
    write(tmp_path, "musicreviews_cleaned.txt", "user_id\tmusic_id\trating\nu9\tm1\t3\n")
    book, music = read_douban(tmp_path)
    assert (book.name, music.name) == ("book", "music")
    assert rows(book) == [("u1", "1000002", 4.0, 1261180800, 2), ("u2", "1000003", 5.0, 1262433600, 3)]
    assert rows(music) == [("u9", "m1", 3.0, None, 2)]


def test_douban_both_layouts_is_ambiguous(tmp_path):
    write(tmp_path, "douban_book/ratings.dat", "1\t1630\t4\n")
    write(tmp_path, "bookreviews_cleaned.txt", "user_id\tbook_id\trating\nu1\tb1\t4\n")
    msg = error(read_douban, tmp_path)
    assert "ratings.dat" in msg and "bookreviews_cleaned.txt" in msg


def test_douban_nothing_found(tmp_path):
    write(tmp_path, "notes.md", "x\n")
    assert "no recognised Douban file" in error(read_douban, tmp_path)
    assert "folder not found" in error(read_douban, tmp_path / "nope")


def test_douban_bad_line(tmp_path):
    write(tmp_path, "douban_book/ratings.dat", "1\t1630\t4\n1\t1181\n")
    msg = error(read_douban, tmp_path)
    assert "ratings.dat" in msg and "line 2" in msg and "found 2" in msg
    write(tmp_path, "douban_book/ratings.dat", "1\t1630\t4\n1\t1181\tgood\n")
    msg = error(read_douban, tmp_path)
    assert "line 2" in msg and "rating" in msg


@pytest.mark.skipif(not DOUBAN.exists(), reason="shared Douban data not present")
def test_douban_real_data():
    found = {d.name: d for d in read_douban(DOUBAN)}
    assert {"book", "music"} <= set(found)
    for name, n_lines, n_users in [("book", 96_041, 2_110), ("music", 69_709, 1_672)]:
        f = found[name].frame
        assert f.height == n_lines
        assert f["user"].n_unique() == n_users
        assert f["line"].to_list() == list(range(1, n_lines + 1))
        assert f["ts"].null_count() == n_lines and f["rating"].null_count() == 0


# ---------------------------------------------------------------- files


def test_files_csv_tsv_parquet(tmp_path):
    write(
        tmp_path,
        "Books.csv",
        "user,item,rating,timestamp,extra\n"
        '1,007,5,1382659200,x\n"a b",B000FA64PK,4.5,2020-01-01,"say ""hi"""\nu3,i3,1,2020-01-01T02:00:00+02:00,\n',
    )
    write(tmp_path, "music.tsv", "item\tuser\nm1\tu1\n")
    pl.DataFrame(
        {
            "user": [10, 11],
            "item": ["a", "b"],
            "rating": [1, 2],
            "timestamp": pl.Series([0, 86_400_000_000]).cast(pl.Datetime("us")),
        }
    ).write_parquet(tmp_path / "movies.parquet")
    books, movies, music = read_files(tmp_path)
    assert [books.name, movies.name, music.name] == ["books", "movies", "music"]
    assert rows(books) == [
        ("1", "007", 5.0, 1382659200, 2),
        ("a b", "B000FA64PK", 4.5, 1577836800, 3),
        ("u3", "i3", 1.0, 1577836800, 4),
    ]
    assert rows(music) == [("u1", "m1", None, None, 2)]
    assert rows(movies) == [("10", "a", 1.0, 0, 1), ("11", "b", 2.0, 86400, 2)]


def test_files_custom_column_names(tmp_path):
    write(tmp_path, "b.csv", "uid,iid,score,when\nu,i,3,-5\n")
    [d] = read_files(tmp_path, user_col="uid", item_col="iid", rating_col="score", time_col="when")
    assert rows(d) == [("u", "i", 3.0, -5, 2)]


def test_files_missing_column(tmp_path):
    write(tmp_path, "Books.csv", "usr,item\n1,2\n")
    msg = error(read_files, tmp_path)
    assert "missing column 'user'; found: usr, item" in msg and "Books.csv" in msg


@pytest.mark.parametrize("content", ["", "user,item\n", "user,item\n\n"])
def test_files_no_rows(tmp_path, content):
    write(tmp_path, "Books.csv", content)
    assert "no rows" in error(read_files, tmp_path)


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ("1,3,NaN,5", "rating is not a finite number"),
        ("1,3,inf,5", "rating is not a finite number"),
        ("1,3,bad,5", "rating is not a finite number"),
        (",3,1,5", "empty value in column 'user'"),
        ("1,3,1,5.5", "timestamp"),
        ("1,3,1,soon", "timestamp"),
        ("1,3,1,5,9", "expected 4 fields"),
    ],
)
def test_files_bad_row_names_the_line(tmp_path, bad, words):
    write(tmp_path, "Books.csv", "user,item,rating,timestamp\n1,2,5,1\n" + bad + "\n")
    msg = error(read_files, tmp_path)
    assert words in msg and "Books.csv" in msg and "line 3" in msg


def test_files_not_utf8(tmp_path):
    write(tmp_path, "Books.csv", b"user,item\n1,2\n1,\xff3\n")
    msg = error(read_files, tmp_path)
    assert "not valid UTF-8" in msg and "line 3" in msg


def test_files_none_found(tmp_path):
    write(tmp_path, "notes.md", "x")
    assert "no .csv, .tsv or .parquet file" in error(read_files, tmp_path)


_FIELDS = st.one_of(
    st.text(max_size=6),
    st.sampled_from(["NaN", "inf", "-1e400", "4.5", "-3", "1382659200.0", "2020-01-01", '"', 'a"b', "../x", " "]),
    st.integers().map(str),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    header=st.lists(st.sampled_from(["user", "item", "rating", "timestamp", "x", ""]), max_size=5),
    body=st.lists(st.lists(_FIELDS, max_size=6), max_size=5),
    sep=st.sampled_from([",", "\t"]),
    encoding=st.sampled_from(["utf-8", "latin-1", "utf-16"]),
)
def test_files_fuzz_only_data_errors(tmp_path_factory, header, body, sep, encoding):
    folder = tmp_path_factory.mktemp("fuzz")
    text = sep.join(header) + "\n" + "".join(sep.join(r) + "\n" for r in body)
    write(folder, "f.csv" if sep == "," else "f.tsv", text.encode(encoding, errors="replace"))
    try:
        found = read_files(folder)
    except DataError as e:
        assert "\n" not in str(e)
        return
    for d in found:
        f = d.frame
        assert f.schema == pl.Schema(RAW_SCHEMA) and f.height > 0
        assert f["user"].null_count() == 0 and f["item"].null_count() == 0


# ---------------------------------------------------------------- selection and names


def _dom(name: str, path: str) -> RawDomain:
    return RawDomain(name, pl.DataFrame(schema=RAW_SCHEMA), Path(path))


def test_select_domains():
    found = [_dom("movies", "b.csv"), _dom("books", "a.csv"), _dom("music", "c.csv")]
    assert [d.name for d in select_domains(found, None, "--domains")] == ["books", "movies", "music"]
    assert [d.name for d in select_domains(found, ["music", "Books"], "--domains")] == ["music", "books"]
    msg = error(select_domains, found, ["books", "games"], "--domains")
    assert "unknown domain 'games'; available: books, movies, music" in msg and "--domains" in msg


def test_select_domains_duplicate_files():
    found = [_dom("books", "ratings_Books.csv"), _dom("books", "Books_5.json.gz"), _dom("music", "m.csv")]
    msg = error(select_domains, found, None, "raw")
    assert "ratings_Books.csv" in msg and "Books_5.json.gz" in msg
    assert [d.name for d in select_domains(found, ["music"], "--domains")] == ["music"]


@pytest.mark.parametrize(
    ("name", "out"),
    [
        ("Movies_and_TV", "movies"),
        ("movies_and_tv", "movies"),
        ("Books", "books"),
        ("../x", "x"),
        ("/abs", "abs"),
        ("a/b", "ab"),
        ("a\\b", "ab"),
        (".hidden", "hidden"),
        ("Video Games", "video_games"),
    ],
)
def test_safe_domain_name_examples(name, out):
    assert safe_domain_name(name, "x") == out


@pytest.mark.parametrize("name", ["", ".", "..", "/", "../..", "__", "书"])
def test_safe_domain_name_refuses(name):
    with pytest.raises(DataError):
        safe_domain_name(name, "x")


@given(st.text())
def test_safe_domain_name_is_always_safe(name):
    try:
        out = safe_domain_name(name, "x")
    except DataError:
        return
    assert NAME_RE.match(out) and "/" not in out and "\\" not in out and not out.startswith(".")


# ---------------------------------------------------------------- size (excluded by default)


@pytest.mark.slow
def test_amazon_20m_rows_is_fast(tmp_path):
    n = 20_000_000
    pl.select(
        pl.format("A{}XYZ", pl.int_range(n).mod(7_000_000).cast(pl.String).str.zfill(10)).alias("u"),
        pl.int_range(n).mod(1_999_993).cast(pl.String).str.zfill(10).alias("i"),
        (pl.int_range(n).mod(5) + 1).cast(pl.Float64).alias("r"),
        (pl.int_range(n) + 900_000_000).alias("t"),
    ).write_csv(tmp_path / "ratings_Books.csv", include_header=False)
    start = time.perf_counter()
    [d] = read_amazon(tmp_path)
    assert time.perf_counter() - start < 30
    assert d.frame.height == n and d.frame["line"][-1] == n
