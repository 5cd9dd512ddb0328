"""Raw readers: Amazon (2014 / 2018 / 2023), Douban, and plain table files.

Each reader turns a folder of source files into :class:`RawDomain` objects whose
frames have exactly the columns of :data:`RAW_SCHEMA`. Parsing is done by
Polars (no Python loop over rows); Python only looks at a small sample to
recognise a format, and at the file again after Polars has failed, to name the
bad line. Every problem the user can cause ends as a one-line
:class:`DataError` naming the file (and the line where it can be found).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import itertools
import json
import math
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from uclr_cli.data.raw import RAW_SCHEMA, RawDomain
from uclr_cli.errors import DataError
from uclr_cli.layout import is_domain_name

# Polars turns internal panics into pyo3's PanicException, a BaseException.
_PanicException = getattr(pl.exceptions, "PanicException", Exception)
_CAUGHT = (Exception, _PanicException)

_CSV_LAYOUTS = ("auto", "user-item", "item-user")
_NAME_ALIASES = {"movies_and_tv": "movies"}
_MAX_NAME = 64
_I64_LIMIT = 9.0e18  # floats beyond this do not round-trip through Int64

# Files that are obviously not interaction data: skipped when their content is
# not recognised (they are still read when it is).
_DOC_SUFFIXES = {
    ".md",
    ".txt",
    ".rst",
    ".pdf",
    ".html",
    ".htm",
    ".py",
    ".ipynb",
    ".sh",
    ".log",
    ".yaml",
    ".yml",
    ".toml",
    ".ini",
    ".cfg",
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".svg",
    ".doc",
    ".docx",
    ".xml",
    ".sha256",
    ".md5",
}
_DOC_PREFIXES = ("readme", "license", "licence", "meta_", "changelog", "citation")

_ASIN_RE = re.compile(r"^(?:\d{9}[\dX]|B0[A-Z0-9]{8})$")
_AMAZON_USER_RE = re.compile(r"^A[A-Z0-9]{9,21}$")

_DATE_FORMATS = (
    "%Y-%m-%d",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%dT%H:%M:%S%#z",
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%#z",
    "%Y/%m/%d",
    "%Y/%m/%d %H:%M:%S",
)
_TEXT_COLUMNS = ("comment", "comments", "text", "review", "reviewtext", "content")
_TIME_COLUMNS = ("time", "timestamp", "date", "rating_time", "datetime", "created_at")


# --------------------------------------------------------------------------- names


def safe_domain_name(name: str, where) -> str:
    """Normalise a domain name so it is safe as a file-name part.

    Lower-case; whitespace becomes ``_``; ``movies_and_tv`` becomes ``movies``;
    every character outside ``[a-z0-9_-]`` is dropped (so no separator, no
    leading dot), leading ``_``/``-`` are dropped and the result is cut to 64
    characters. The result matches ``^[a-z0-9][a-z0-9_-]*$``; a name with
    nothing usable left raises :class:`DataError`.
    """
    s = re.sub(r"\s+", "_", str(name).strip().lower())
    s = _NAME_ALIASES.get(s, s)
    s = re.sub(r"[^a-z0-9_-]", "", s)
    s = _NAME_ALIASES.get(s, s)
    s = s.lstrip("_-")[:_MAX_NAME]
    if not is_domain_name(s):
        raise DataError(f"bad domain name {_short(name)!r}", where)
    return s


def _amazon_domain(filename: str, where) -> str:
    """Category from an Amazon file name: ratings_Books.csv, reviews_Books_5.json.gz -> books."""
    s = filename
    if s.lower().endswith(".gz"):
        s = s[:-3]
    for suf in (".jsonl", ".json", ".csv", ".tsv", ".txt", ".dat"):
        if s.lower().endswith(suf):
            s = s[: -len(suf)]
            break
    if s.endswith("_5"):
        s = s[:-2]
    for pre in ("ratings_", "reviews_"):
        if s.lower().startswith(pre):
            s = s[len(pre) :]
            break
    return safe_domain_name(s, where)


# --------------------------------------------------------------------------- helpers


def _short(value, limit: int = 40) -> str:
    s = str(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _first_line(exc: BaseException) -> str:
    for ln in str(exc).splitlines():
        if ln.strip():
            return _short(ln.strip(), 160)
    return type(exc).__name__


def _folder(raw: Path) -> list[Path]:
    """The files directly in ``raw``, sorted by name."""
    p = Path(raw)
    if not p.exists():
        raise DataError("folder not found", where=p)
    if not p.is_dir():
        raise DataError("not a folder", where=p)
    try:
        return sorted(p.iterdir(), key=lambda x: x.name)
    except OSError as e:
        raise DataError(f"cannot list folder: {e.strerror or e}", where=p) from e


def _guard(path: Path, fn: Callable[[], RawDomain | None]) -> RawDomain | None:
    """Run one file's reader; any exception that is not a DataError becomes one."""
    try:
        return fn()
    except DataError:
        raise
    except RecursionError as e:
        raise DataError("cannot read file: nested too deeply", where=path) from e
    except _CAUGHT as e:
        raise DataError(f"cannot read file: {_first_line(e)}", where=path) from e


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _open_binary(path: Path):
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")


_GZ_ERRORS = (EOFError, OSError, zlib.error, gzip.BadGzipFile)


def _check_gzip(path: Path) -> None:
    """Raise DataError if ``path`` is a gzip file that does not decompress to its end."""
    if not _is_gzip(path):
        return
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    except _GZ_ERRORS as e:
        raise DataError("truncated or corrupt gzip file", where=path) from e


def _iter_lines(path: Path) -> Iterator[str]:
    """Physical lines of a (possibly gzipped) file, decoded lossily, without line ends."""
    try:
        with _open_binary(path) as fh:
            for b in fh:
                yield b.decode("utf-8", "replace").rstrip("\r\n")
    except _GZ_ERRORS as e:
        if _is_gzip(path):
            raise DataError("truncated or corrupt gzip file", where=path) from e
        raise


def _sample_lines(path: Path, n: int = 1000, max_bytes: int = 8 << 20) -> list[str]:
    """The first ``n`` lines (at most ``max_bytes``), for recognising a format."""
    out: list[str] = []
    total = 0
    try:
        with _open_binary(path) as fh:
            while len(out) < n and total < max_bytes:
                b = fh.readline(max_bytes)
                if not b:
                    break
                total += len(b)
                out.append(b.decode("utf-8", "replace").rstrip("\r\n"))
    except _GZ_ERRORS as e:
        if _is_gzip(path):
            raise DataError("truncated or corrupt gzip file", where=path) from e
        raise
    return out


def _physical_line(path: Path, line: int) -> str | None:
    try:
        return next(itertools.islice(_iter_lines(path), line - 1, None), None)
    except DataError:
        raise
    except _CAUGHT:
        return None


def _is_number(v: str) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError, OverflowError):
        return False


def _is_integral(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    try:
        return int(str(v).strip()) is not None
    except (TypeError, ValueError):
        pass
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return False
    return math.isfinite(f) and f == math.floor(f) and abs(f) < _I64_LIMIT


def _int_expr(e: pl.Expr) -> pl.Expr:
    """String -> Int64: integers, or floats with an integral value; null otherwise."""
    f = e.cast(pl.Float64, strict=False)
    as_float = pl.when(f.is_finite() & (f == f.floor()) & (f.abs() < _I64_LIMIT)).then(f.cast(pl.Int64, strict=False))
    return pl.coalesce(e.cast(pl.Int64, strict=False), as_float)


def _dates_to_seconds(s: pl.Series) -> pl.Series:
    """ISO dates / datetimes (several layouts, optional zone) -> Int64 seconds; null if none fits."""
    out = pl.Series(s.name, [None] * len(s), dtype=pl.Int64)
    for fmt in _DATE_FORMATS:
        try:
            if "%H" in fmt:
                v = s.str.to_datetime(fmt, strict=False, time_unit="us")
            else:
                v = s.str.to_date(fmt, strict=False).cast(pl.Datetime("us"))
            secs = v.dt.epoch("s").cast(pl.Int64)
        except _CAUGHT:
            continue
        out = pl.select(pl.coalesce(pl.lit(out), pl.lit(secs))).to_series()
        if out.null_count() == s.null_count():
            break
    return out


def _first_bad(mask: pl.Series) -> int | None:
    idx = mask.fill_null(False).arg_true()
    return int(idx[0]) if len(idx) else None


def _raw_frame(df: pl.DataFrame) -> pl.DataFrame:
    return df.select(pl.col(c).cast(t) for c, t in RAW_SCHEMA.items())


# --------------------------------------------------------------------------- delimited, no header


@dataclass(frozen=True)
class _Delimited:
    """A delimited layout read without quote handling (one row per physical line)."""

    sep: str
    names: tuple[str, ...]  # field labels, for messages
    user: int
    item: int
    rating: int | None
    ts: int | None
    ts_ms: bool = False
    skip_lines: int = 0  # header lines

    @property
    def n(self) -> int:
        return len(self.names)


_SEP_NAMES = {",": "comma", "\t": "tab"}


def _explain_delimited(text: str | None, spec: _Delimited) -> str | None:
    """Why one line of a delimited file is bad (None if it looks fine)."""
    if text is None:
        return None
    fields = text.split(spec.sep)
    if len(fields) != spec.n:
        sep = _SEP_NAMES.get(spec.sep, repr(spec.sep))
        return f"expected {spec.n} {sep}-separated fields ({','.join(spec.names)}), found {len(fields)}"
    if fields[spec.user] == "":
        return "empty user id"
    if fields[spec.item] == "":
        return "empty item id"
    if spec.rating is not None and not _is_number(fields[spec.rating]):
        return f"rating is not a finite number: {_short(fields[spec.rating])!r}"
    if spec.ts is not None and not _is_integral(fields[spec.ts]):
        return f"timestamp is not an integer: {_short(fields[spec.ts])!r}"
    return None


_DELIM_CODES = {
    1: "wrong number of fields or an empty field",
    2: "empty user or item id",
    3: "rating is not a finite number",
    4: "timestamp is not an integer",
}


def _read_delimited(path: Path, spec: _Delimited) -> pl.DataFrame:
    """Read a headerless delimited file with Polars' CSV reader, strings first, cast strictly.

    One spare column catches lines with too many fields; lines with too few
    leave the last column null. Blank lines are skipped but keep their number.
    """
    n = spec.n
    cols = [f"c{i}" for i in range(n + 1)]
    c = lambda i: pl.col(f"c{i}")  # noqa: E731
    none_f, none_i = pl.lit(None, pl.Float64), pl.lit(None, pl.Int64)
    ts = none_i if spec.ts is None else _int_expr(c(spec.ts))
    if spec.ts is not None and spec.ts_ms:
        ts = ts // 1000
    lf = pl.scan_csv(
        path,
        has_header=False,
        separator=spec.sep,
        quote_char=None,
        schema={k: pl.String for k in cols},
        truncate_ragged_lines=True,
        missing_columns="insert",
        skip_lines=spec.skip_lines,
        encoding="utf8-lossy",
    )
    # Two steps, so each cast is computed once and the checks reuse the results.
    lf = lf.with_row_index("_row").select(
        (pl.col("_row").cast(pl.Int64) + 1 + spec.skip_lines).alias("line"),
        c(spec.user).alias("user"),
        c(spec.item).alias("item"),
        (none_f if spec.rating is None else c(spec.rating).cast(pl.Float64, strict=False)).alias("rating"),
        ts.alias("ts"),
        (c(n).is_not_null() | c(n - 1).is_null()).alias("_count"),
        pl.all_horizontal([c(i).is_null() for i in range(n + 1)]).alias("_blank"),
    )
    user, item, rating = pl.col("user"), pl.col("item"), pl.col("rating")
    rating_bad = pl.lit(False) if spec.rating is None else rating.is_null() | ~rating.is_finite()
    ts_bad = pl.lit(False) if spec.ts is None else pl.col("ts").is_null()
    err = (
        pl.when(pl.col("_blank"))
        .then(None)
        .when(pl.col("_count"))
        .then(1)
        .when(user.is_null() | item.is_null())
        .then(2)
        .when(rating_bad)
        .then(3)
        .when(ts_bad)
        .then(4)
        .otherwise(None)
        .cast(pl.Int8)
    )
    lf = lf.with_columns(err.alias("_err")).drop("_count")
    try:
        df = lf.collect(engine="streaming")
    except _CAUGHT as e:
        _check_gzip(path)
        raise DataError(f"cannot read file: {_first_line(e)}", where=path) from e
    bad = _first_bad(df.get_column("_err").is_not_null())
    if bad is not None:
        line = int(df.get_column("line")[bad])
        msg = _explain_delimited(_physical_line(path, line), spec)
        raise DataError(msg or _DELIM_CODES[int(df.get_column("_err")[bad])], where=path, line=line)
    if df.get_column("_blank").any():
        df = df.filter(~pl.col("_blank"))
    if df.height == 0:
        raise DataError("no rows", where=path)
    return _raw_frame(df)


# --------------------------------------------------------------------------- JSON lines


@dataclass(frozen=True)
class _JsonKeys:
    user: str
    item: str
    rating: str
    ts: str
    ts_ms: bool = False


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _explain_json(text: str, keys: _JsonKeys) -> str | None:
    """Why one JSON line is bad (None if it is fine or blank)."""
    if not text.strip():
        return None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        return "JSON nested too deeply"
    except ValueError:
        if text.lstrip().startswith("{'"):
            return "not valid JSON (Python-literal lines are not supported; convert them to JSON)"
        return "not valid JSON"
    if not isinstance(obj, dict):
        return "not a JSON object"
    for key in (keys.user, keys.item):
        v = obj.get(key)
        if v is None or v == "":
            return f"missing key '{key}'"
        if isinstance(v, (dict, list)):
            return f"'{key}' is not a string"
    v = obj.get(keys.rating)
    if v is None:
        return f"missing key '{keys.rating}'"
    if isinstance(v, (bool, dict, list)) or not _is_number(v):
        return f"'{keys.rating}' is not a finite number: {_short(v)!r}"
    v = obj.get(keys.ts)
    if v is None:
        return f"missing key '{keys.ts}'"
    if isinstance(v, (dict, list)) or not _is_integral(v):
        return f"'{keys.ts}' is not an integer: {_short(v)!r}"
    return None


def _read_jsonl(path: Path, keys: _JsonKeys) -> pl.DataFrame:
    """Read JSON lines: Polars reads each physical line as a string and decodes the four keys.

    Reading lines first keeps exact line numbers (blank lines are skipped but
    counted) and streams large gzipped review files without keeping the text.
    """
    wanted = (keys.user, keys.item, keys.rating, keys.ts)
    dtype = pl.Struct({k: pl.String for k in dict.fromkeys(wanted)})
    raw = pl.col("raw")
    ts = _int_expr(pl.col(keys.ts))
    if keys.ts_ms:
        ts = ts // 1000
    lf = (
        pl.scan_csv(
            path,
            has_header=False,
            separator="\x1f",  # a control character never raw inside valid JSON
            quote_char=None,
            schema={"raw": pl.String},
            truncate_ragged_lines=True,
            encoding="utf8-lossy",
        )
        .with_row_index("_row")
        .filter(raw.is_not_null() & raw.str.contains(r"\S"))
        .select((pl.col("_row").cast(pl.Int64) + 1).alias("_line"), raw.str.json_decode(dtype).alias("_s"))
        .unnest("_s")
        .select(
            pl.col("_line").alias("line"),
            pl.col(keys.user).alias("user"),
            pl.col(keys.item).alias("item"),
            pl.col(keys.rating).cast(pl.Float64, strict=False).alias("rating"),
            ts.alias("ts"),
        )
    )
    rating = pl.col("rating")
    err = (
        pl.when(pl.col("user").is_null() | pl.col("item").is_null())
        .then(1)
        .when(rating.is_null() | ~rating.is_finite())
        .then(2)
        .when(pl.col("ts").is_null())
        .then(3)
        .otherwise(None)
        .cast(pl.Int8)
    )
    lf = lf.with_columns(err.alias("_err"))
    try:
        df = lf.collect(engine="streaming")
    except _CAUGHT as e:
        _check_gzip(path)
        for i, text in enumerate(_iter_lines(path), start=1):
            msg = _explain_json(text, keys)
            if msg:
                raise DataError(msg, where=path, line=i) from e
        raise DataError(f"cannot read JSON lines: {_first_line(e)}", where=path) from e
    bad = _first_bad(df.get_column("_err").is_not_null())
    if bad is not None:
        line = int(df.get_column("line")[bad])
        text = _physical_line(path, line)
        msg = _explain_json(text, keys) if text is not None else None
        fallback = {
            1: "missing user or item key",
            2: f"'{keys.rating}' is not a finite number",
            3: f"'{keys.ts}' is not an integer",
        }[int(df.get_column("_err")[bad])]
        raise DataError(msg or fallback, where=path, line=line)
    if df.height == 0:
        raise DataError("no rows", where=path)
    return _raw_frame(df)


# --------------------------------------------------------------------------- amazon


def _doc_like(path: Path) -> bool:
    """True for files that are obviously not interaction data (README, notes, meta files)."""
    name = path.name.lower()
    suffix = Path(name[:-3] if name.endswith(".gz") else name).suffix
    return name.startswith(".") or name.startswith(_DOC_PREFIXES) or suffix in _DOC_SUFFIXES


def _csv_layout(path: Path, rows: list[list[str]], forced: str) -> str:
    """Decide which of the first two columns holds users: 'user-item' (2014) or 'item-user' (2018)."""
    if forced != "auto":
        return forced
    if rows:
        m = len(rows)
        asin0 = sum(bool(_ASIN_RE.match(r[0])) for r in rows) / m
        asin1 = sum(bool(_ASIN_RE.match(r[1])) for r in rows) / m
        user0 = sum(bool(_AMAZON_USER_RE.match(r[0])) for r in rows) / m
        user1 = sum(bool(_AMAZON_USER_RE.match(r[1])) for r in rows) / m
        score = (asin1 - asin0) + (user0 - user1)  # > 0: users first
        if score >= 0.5:
            return "user-item"
        if score <= -0.5:
            return "item-user"
    raise DataError(
        "cannot tell the user column from the item column; pass --amazon-layout user-item or item-user",
        where=path,
    )


def _read_amazon_file(path: Path, csv_layout: str) -> RawDomain | None:
    """Recognise one file by content and read it; None for files that are not interaction data."""
    doc = _doc_like(path)
    lines = _sample_lines(path)
    first_no = next((i for i, t in enumerate(lines) if t.strip()), None)
    if first_no is None:
        if doc:
            return None
        raise DataError("empty file", where=path)
    first = lines[first_no].lstrip("\ufeff").strip()
    lineno = first_no + 1

    if first.startswith("{"):
        try:
            obj = json.loads(first)
        except ValueError:
            if doc:
                return None
            raise DataError(
                _explain_json(first, _JsonKeys("", "", "", "")) or "not valid JSON", where=path, line=lineno
            ) from None
        if not isinstance(obj, dict):
            return None
        if "reviewerID" in obj and "asin" in obj:
            keys, fmt = _JsonKeys("reviewerID", "asin", "overall", "unixReviewTime"), "amazon-review-json"
        elif "user_id" in obj and ("parent_asin" in obj or "asin" in obj):
            item = "parent_asin" if "parent_asin" in obj else "asin"
            keys, fmt = _JsonKeys("user_id", item, "rating", "timestamp", ts_ms=True), "amazon-2023-jsonl"
        else:
            return None  # JSON without user ids (e.g. product metadata)
        name = _amazon_domain(path.name, path)
        return RawDomain(name, _read_jsonl(path, keys), path, {"format": fmt})

    fields = first.split(",")
    header = [f.strip().strip('"').lower() for f in fields]
    if len(fields) == 4 and _is_number(fields[2]) and _is_number(fields[3]):
        rows = [r for r in (t.split(",") for t in lines if t.strip()) if len(r) == 4]
        layout = _csv_layout(path, rows, csv_layout)
        if layout == "user-item":
            spec = _Delimited(",", ("user", "item", "rating", "timestamp"), 0, 1, 2, 3, skip_lines=first_no)
            fmt = "amazon-2014-csv"
        else:
            spec = _Delimited(",", ("item", "user", "rating", "timestamp"), 1, 0, 2, 3, skip_lines=first_no)
            fmt = "amazon-2018-csv"
        name = _amazon_domain(path.name, path)
        return RawDomain(name, _read_delimited(path, spec), path, {"format": fmt, "layout": layout})
    if (
        "user_id" in header
        and ("parent_asin" in header or "asin" in header)
        and "rating" in header
        and "timestamp" in header
    ):
        item = "parent_asin" if "parent_asin" in header else "asin"
        spec = _Delimited(
            ",",
            tuple(header),
            header.index("user_id"),
            header.index(item),
            header.index("rating"),
            header.index("timestamp"),
            ts_ms=True,
            skip_lines=lineno,
        )
        name = _amazon_domain(path.name, path)
        return RawDomain(name, _read_delimited(path, spec), path, {"format": "amazon-2023-csv"})
    if doc:
        return None
    raise DataError(
        "not a recognised Amazon file (expected a ratings CSV or reviews JSON lines)", where=path, line=lineno
    )


def read_amazon(raw: Path, *, csv_layout: str = "auto") -> list[RawDomain]:
    """Read every Amazon ratings / reviews file in the folder ``raw``, recognised by content.

    Formats: 2014 ratings CSV (user,item,rating,timestamp), 2018 ratings CSV
    (item,user,rating,timestamp), 2014/2018 review JSON lines, 2023 JSONL or
    CSV (timestamps in ms -> s); any of them may be gzipped. Which CSV column
    holds users is decided per file from the look of the ids, unless
    ``csv_layout`` ("user-item" / "item-user") forces it. Files that are
    obviously not data (README, *.md, *.txt, meta_*, product-metadata JSON)
    are skipped; any other file that cannot be read is an error. Bytes that
    are not UTF-8 are replaced (Amazon ids are ASCII).
    """
    if csv_layout not in _CSV_LAYOUTS:
        raise DataError(f"bad layout {_short(csv_layout)!r}; use auto, user-item or item-user", where="--amazon-layout")
    out = []
    for f in _folder(raw):
        if f.is_file():
            d = _guard(f, lambda f=f: _read_amazon_file(f, csv_layout))
            if d is not None:
                out.append(d)
    if not out:
        raise DataError("no recognised Amazon file", where=raw)
    return out


# --------------------------------------------------------------------------- string-valued tables


def _finish(df: pl.DataFrame, path: Path, labels: dict[str, str]) -> pl.DataFrame:
    """Validate and convert a frame of ``line, user, item[, rating][, ts]`` to RAW_SCHEMA.

    ``user``/``item`` are strings or integers; ``rating`` and ``ts`` strings
    (parsed here) or already typed (Parquet). The first bad row, in file
    order, is reported with its line.
    """
    problems: list[tuple[int, str]] = []  # (row index, message)

    def note(mask: pl.Series, message: Callable[[int], str]) -> None:
        i = _first_bad(mask)
        if i is not None:
            problems.append((i, message(i)))

    cols = {"line": df.get_column("line").cast(pl.Int64)}
    for role in ("user", "item"):
        s = df.get_column(role)
        if s.dtype.is_integer() or s.dtype in (pl.Categorical, pl.Enum):
            s = s.cast(pl.String)
        elif s.dtype != pl.String:
            raise DataError(f"column '{labels[role]}' has type {s.dtype}; expected strings or integers", where=path)
        note(s.is_null() | (s == ""), lambda i, r=role: f"empty value in column '{labels[r]}'")
        cols[role] = s

    if "rating" in df.columns:
        s = df.get_column("rating")
        if s.dtype == pl.String:
            x = s.str.strip_chars()
            r = x.cast(pl.Float64, strict=False)
            note(x.is_null() | (x == ""), lambda i: f"empty value in column '{labels['rating']}'")
            note(
                x.is_not_null() & (x != "") & (r.is_null() | ~r.is_finite()),
                lambda i: f"rating is not a finite number: {_short(x[i])!r}",
            )
        elif s.dtype.is_numeric():
            r = s.cast(pl.Float64, strict=False)
            note(s.is_null(), lambda i: f"empty value in column '{labels['rating']}'")
            note(
                s.is_not_null() & (r.is_null() | ~r.is_finite()),
                lambda i: f"rating is not a finite number: {_short(s[i])!r}",
            )
        else:
            raise DataError(f"column '{labels['rating']}' has type {s.dtype}; expected numbers", where=path)
        cols["rating"] = r
    else:
        cols["rating"] = pl.Series("rating", [None] * df.height, dtype=pl.Float64)

    if "ts" in df.columns:
        s = df.get_column("ts")
        empty = s.is_null()
        if s.dtype == pl.String:
            x = s.str.strip_chars()
            empty = x.is_null() | (x == "")
            t = pl.select(_int_expr(pl.lit(x))).to_series()
            if (t.is_null() & ~empty).any():
                t = pl.select(pl.coalesce(pl.lit(t), pl.lit(_dates_to_seconds(x)))).to_series()
            shown = x
        elif s.dtype.is_integer():
            t = s.cast(pl.Int64, strict=False)
            shown = s
        elif s.dtype.is_float():
            t = pl.select(_int_expr(pl.lit(s))).to_series()
            shown = s
        elif s.dtype == pl.Date or isinstance(s.dtype, pl.Datetime):
            t = s.cast(pl.Datetime("us")).dt.epoch("s") if s.dtype == pl.Date else s.dt.epoch("s")
            t = t.cast(pl.Int64)
            shown = s
        else:
            raise DataError(f"column '{labels['ts']}' has type {s.dtype}; expected integers or dates", where=path)
        note(empty, lambda i: f"empty value in column '{labels['ts']}'")
        note(~empty & t.is_null(), lambda i: f"timestamp is not an integer or date: {_short(shown[i])!r}")
        cols["ts"] = t
    else:
        cols["ts"] = pl.Series("ts", [None] * df.height, dtype=pl.Int64)

    if problems:
        i, msg = min(problems, key=lambda p: p[0])
        raise DataError(msg, where=path, line=int(cols["line"][i]))
    out = pl.DataFrame({k: cols[k].rename(k) for k in RAW_SCHEMA})
    return _raw_frame(out)


def _find_bad_utf8(path: Path) -> int | None:
    """Line number of the first invalid UTF-8 byte, or None."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    line = 1
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            try:
                dec.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                return line + chunk.count(b"\n", 0, e.start)
            if not chunk:
                return None
            line += chunk.count(b"\n")


def _locate_csv_error(path: Path, sep: str, quoted: bool, ncols: int) -> tuple[int, str] | None:
    """After Polars fails, find the first record with a wrong field count using Python's csv."""
    csv.field_size_limit(2**31 - 1)
    kw = {"delimiter": sep, "quotechar": '"'} if quoted else {"delimiter": sep, "quoting": csv.QUOTE_NONE}
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
        reader = csv.reader(fh, **kw)
        start = 1
        try:
            next(reader, None)
            start = reader.line_num + 1
            for rec in reader:
                if len(rec) > ncols:
                    return start, f"expected {ncols} fields as in the header, found {len(rec)}"
                start = reader.line_num + 1
        except csv.Error as e:
            return start, f"bad CSV: {_first_line(e)}"
    return None


def _resolve(found: list[str], wanted: str, path: Path, required: bool) -> str | None:
    if wanted in found:
        return wanted
    by_lower = [c for c in found if c.strip().lower() == wanted.strip().lower()]
    if len(by_lower) == 1:
        return by_lower[0]
    if required:
        shown = ", ".join(_short(c, 30) for c in found[:20]) + (", ..." if len(found) > 20 else "")
        raise DataError(f"missing column {_short(wanted)!r}; found: {shown}", where=path)
    return None


def _read_table_csv(path: Path, sep: str, names: dict[str, str]) -> pl.DataFrame:
    """A header CSV/TSV file read as strings by Polars; line = row + 2."""
    quote = '"' if sep == "," else None
    opts = dict(has_header=True, infer_schema=False, separator=sep, quote_char=quote, encoding="utf8")
    try:
        header = pl.read_csv(path, n_rows=0, **opts).columns
    except pl.exceptions.NoDataError as e:
        raise DataError("no rows", where=path) from e
    except _CAUGHT as e:
        bad = _find_bad_utf8(path)
        if bad is not None:
            raise DataError("file is not valid UTF-8", where=path, line=bad) from e
        raise DataError(f"cannot read header: {_first_line(e)}", where=path) from e
    try:
        use = {role: _resolve(header, names[role], path, role in ("user", "item")) for role in names}
    except DataError:
        bad = _find_bad_utf8(path)  # e.g. UTF-16: the header only looks garbled
        if bad is not None:
            raise DataError("file is not valid UTF-8", where=path, line=bad) from None
        raise
    use = {role: col for role, col in use.items() if col is not None}
    row = "__uclr_row__"  # not a name a user's column would have
    lf = pl.scan_csv(path, **opts).with_row_index(row)
    lf = lf.select(
        (pl.col(row).cast(pl.Int64) + 2).alias("line"),
        *[pl.col(col).alias(role) for role, col in use.items()],
        pl.all_horizontal([pl.col(c).is_null() for c in header]).alias("_blank"),
    )
    try:
        df = lf.collect()
    except _CAUGHT as e:
        bad = _find_bad_utf8(path)
        if bad is not None:
            raise DataError("file is not valid UTF-8", where=path, line=bad) from e
        found = _locate_csv_error(path, sep, quote is not None, len(header))
        if found:
            raise DataError(found[1], where=path, line=found[0]) from e
        raise DataError(f"cannot parse file: {_first_line(e)}", where=path) from e
    if df.get_column("_blank").any():
        df = df.filter(~pl.col("_blank"))
    if df.height == 0:
        raise DataError("no rows", where=path)
    return _finish(df.drop("_blank"), path, {role: names[role] for role in names} | use)


def _read_table_parquet(path: Path, names: dict[str, str]) -> pl.DataFrame:
    """A Parquet file; line = row + 1."""
    try:
        header = list(pl.read_parquet_schema(path).keys())
    except _CAUGHT as e:
        raise DataError(f"cannot read Parquet file: {_first_line(e)}", where=path) from e
    use = {role: _resolve(header, names[role], path, role in ("user", "item")) for role in names}
    use = {role: col for role, col in use.items() if col is not None}
    try:
        df = pl.read_parquet(path, columns=list(dict.fromkeys(use.values())))
    except _CAUGHT as e:
        raise DataError(f"cannot read Parquet file: {_first_line(e)}", where=path) from e
    if df.height == 0:
        raise DataError("no rows", where=path)
    df = df.select(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("line"),
        *[pl.col(col).alias(role) for role, col in use.items()],
    )
    return _finish(df, path, use)


def read_files(
    raw: Path,
    *,
    user_col: str = "user",
    item_col: str = "item",
    rating_col: str = "rating",
    time_col: str = "timestamp",
) -> list[RawDomain]:
    """Read every ``*.csv``, ``*.tsv`` and ``*.parquet`` directly in ``raw``; one domain per file.

    ``.csv.gz`` and ``.tsv.gz`` are read too (the domain is the name before
    ``.csv``); a table file compressed otherwise (``.bz2``, ``.xz``, ``.zip``…)
    is refused, never skipped, and so are two files that give one domain.

    A header row is required; user and item columns must exist, rating and
    time columns are optional (names matched exactly, else case-insensitively).
    Ids are kept as strings exactly as written. CSV uses ``"`` quoting, TSV
    none; hidden files are skipped. ``line`` is the data row + 1 after the
    header (the physical line unless a quoted field spans lines). Times may be integers, integral floats
    or ISO dates/datetimes
    (naive ones taken as UTC) -> seconds. Text must be valid UTF-8: a file
    that is not is refused with the line of the first bad byte (no lossy
    decoding, so ids are never silently changed).
    """
    names = {"user": user_col, "item": item_col, "rating": rating_col, "ts": time_col}
    out = []
    for f in _folder(raw):
        if f.name.startswith(".") or not f.is_file():
            continue  # hidden files (e.g. macOS ._x.csv) are never data
        kind = _table_kind(f)
        if kind is None:
            continue
        stem, fmt, packed = kind
        if packed not in (None, ".gz"):
            raise DataError(f"compressed with {packed[1:]}, which is not read (gzip it, or decompress it)", where=f)
        if fmt == ".parquet" and packed:
            raise DataError("a gzipped parquet file is not read (parquet is compressed already)", where=f)

        def one(f=f, stem=stem, fmt=fmt, packed=packed) -> RawDomain:
            name = safe_domain_name(stem, f)
            if fmt == ".parquet":
                frame = _read_table_parquet(f, names)
            elif packed:
                frame = _read_gzipped_table(f, "," if fmt == ".csv" else "\t", names)
            else:
                frame = _read_table_csv(f, "," if fmt == ".csv" else "\t", names)
            meta = {"format": fmt[1:]} if not packed else {"format": fmt[1:], "compression": "gzip"}
            return RawDomain(name, frame, f, meta)

        out.append(_guard(f, one))
    if not out:
        raise DataError("no .csv, .tsv or .parquet file (optionally .csv.gz, .tsv.gz)", where=raw)
    seen: dict[str, Path] = {}
    for rd in out:
        if rd.name in seen:
            raise DataError(f"two files give domain '{rd.name}': {seen[rd.name].name} and {rd.path.name}", where=raw)
        seen[rd.name] = rd.path
    return out


_TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
_PACKED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4", ".7z")


def _table_kind(f: Path) -> tuple[str, str, str | None] | None:
    """(stem, table suffix, compression suffix or None) of a table file name, None for other files."""
    name = f.name
    packed = next((p for p in _PACKED_SUFFIXES if name.lower().endswith(p)), None)
    if packed:
        name = name[: -len(packed)]
    fmt = Path(name).suffix.lower()
    if fmt not in _TABLE_SUFFIXES:
        return None
    return Path(name).stem, fmt, packed


def _read_gzipped_table(path: Path, sep: str, names: dict[str, str]) -> pl.DataFrame:
    """A gzipped CSV/TSV: decompressed into a temporary folder (removed after), then read like a plain one.

    Errors name the ``.gz`` file (and the line in the decompressed text).
    """
    import shutil
    import tempfile

    _check_gzip(path)  # a truncated or corrupt archive: one line before anything else
    with tempfile.TemporaryDirectory(prefix="uclr-gz-") as tmp:
        plain = Path(tmp) / path.name[: -len(".gz")]
        try:
            with _open_binary(path) as src, open(plain, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        except OSError as e:
            raise DataError(f"cannot decompress: {e.strerror or e}", where=path) from None
        try:
            return _read_table_csv(plain, sep, names)
        except DataError as e:
            raise DataError(e.message, where=path, line=e.line) from None


# --------------------------------------------------------------------------- douban


def _read_douban_reviews(path: Path, domain: str) -> pl.DataFrame:
    """A text-information release file: tab-separated with header, no quote handling.

    Fields are stripped of surrounding quotes. A free-text column (comment)
    may hold tabs, so columns after it are taken counting from the line's end.
    """
    head = next((t for t in _sample_lines(path, 1)), None)
    if head is None:
        raise DataError("no rows", where=path)
    header = [h.strip().strip('"').strip().lower() for h in head.lstrip("\ufeff").split("\t")]
    H = len(header)

    def need(name: str) -> int:
        if name in header:
            return header.index(name)
        raise DataError(f"missing column {name!r}; found: {', '.join(_short(h, 30) for h in header[:20])}", where=path)

    u = need("user_id")
    item_name = f"{domain}_id"
    if item_name not in header:
        ids = [h for h in header if h.endswith("_id") and h != "user_id"]
        item_name = ids[0] if len(ids) == 1 else item_name
    i = need(item_name)
    r = need("rating")
    t = next((header.index(n) for n in _TIME_COLUMNS if n in header), None)
    text = next((header.index(n) for n in _TEXT_COLUMNS if n in header), None)

    parts = pl.col("raw").str.split("\t")

    def field(k: int) -> pl.Expr:
        idx = k if text is None or k <= text else k - H
        v = parts.list.get(idx, null_on_oob=True).str.strip_chars('" \r')
        return pl.when(v == "").then(None).otherwise(v)

    nf = parts.list.len()
    wrong = (nf < H) if text is not None else (nf != H)
    sel = [
        (pl.col("_row").cast(pl.Int64) + 2).alias("line"),
        nf.alias("_nf"),
        wrong.alias("_wrong"),
        field(u).alias("user"),
        field(i).alias("item"),
        field(r).alias("rating"),
    ]
    if t is not None:
        sel.append(field(t).alias("ts"))
    lf = (
        pl.scan_csv(
            path,
            has_header=False,
            separator="\x1f",
            quote_char=None,
            schema={"raw": pl.String},
            truncate_ragged_lines=True,
            skip_lines=1,
            encoding="utf8-lossy",
        )
        .with_row_index("_row")
        .filter(pl.col("raw").is_not_null() & pl.col("raw").str.contains(r"\S"))
        .select(sel)
    )
    try:
        df = lf.collect()
    except _CAUGHT as e:
        raise DataError(f"cannot read file: {_first_line(e)}", where=path) from e
    bad = _first_bad(df.get_column("_wrong"))
    if bad is not None:
        raise DataError(
            f"expected {H} tab-separated fields as in the header, found {df['_nf'][bad]}",
            where=path,
            line=int(df["line"][bad]),
        )
    if df.height == 0:
        raise DataError("no rows", where=path)
    labels = {"user": "user_id", "item": item_name, "rating": "rating", "ts": header[t] if t is not None else ""}
    return _finish(df.drop("_nf", "_wrong"), path, labels)


def read_douban(raw: Path) -> list[RawDomain]:
    """Read Douban data in the folder ``raw``.

    Release layout: ``douban_<domain>/ratings.dat`` (user, item, rating;
    tab-separated; no time, so ts is null and the line order is the time
    order). Text-information layout: ``<domain>reviews_cleaned.txt`` (in
    ``raw`` or one folder down), tab-separated with a header. A domain found
    in both layouts is an error, as the two would disagree.
    """
    entries = _folder(raw)
    found: list[tuple[str, Path, str]] = []
    for p in entries:
        if p.is_dir() and p.name.lower().startswith("douban_") and (p / "ratings.dat").is_file():
            found.append((safe_domain_name(p.name[len("douban_") :], p), p / "ratings.dat", "ratings"))
    for d in [Path(raw)] + [p for p in entries if p.is_dir()]:
        try:
            files = sorted(d.iterdir(), key=lambda x: x.name) if d != Path(raw) else entries
        except OSError:
            continue
        for f in files:
            low = f.name.lower()
            if f.is_file() and low.endswith("reviews_cleaned.txt") and len(low) > len("reviews_cleaned.txt"):
                prefix = f.name[: -len("reviews_cleaned.txt")]
                found.append((safe_domain_name(prefix, f), f, "reviews"))
    seen: dict[str, Path] = {}
    for name, path, _ in found:
        if name in seen:
            raise DataError(f"domain '{name}' is given by two files: {seen[name]} and {path}", where=raw)
        seen[name] = path
    if not found:
        hint = "; ratings.dat should sit in douban_<domain>/ folders" if (Path(raw) / "ratings.dat").exists() else ""
        raise DataError("no recognised Douban file" + hint, where=raw)
    ratings_spec = _Delimited("\t", ("user", "item", "rating"), 0, 1, 2, None)

    def one(name: str, path: Path, kind: str) -> RawDomain:
        if kind == "ratings":
            return RawDomain(name, _read_delimited(path, ratings_spec), path, {"format": "douban-ratings"})
        return RawDomain(name, _read_douban_reviews(path, name), path, {"format": "douban-reviews"})

    return [_guard(path, lambda: one(name, path, kind)) for name, path, kind in sorted(found)]


# --------------------------------------------------------------------------- selection


def select_domains(found: list[RawDomain], wanted: list[str] | None, where) -> list[RawDomain]:
    """Pick the domains to use: all (sorted by name) when ``wanted`` is None, else in its order.

    Names in ``wanted`` are normalised like file names. Two files giving the
    same selected domain are an error naming both (unselected duplicates are
    left alone).
    """
    by_name: dict[str, list[RawDomain]] = {}
    for d in found:
        by_name.setdefault(d.name, []).append(d)
    if wanted is None:
        names = sorted(by_name)
    else:
        if not wanted:
            raise DataError("no domain given", where=where)
        names = []
        for w in wanted:
            n = safe_domain_name(w, where)
            if n in names:
                raise DataError(f"domain '{n}' given twice", where=where)
            if n not in by_name:
                raise DataError(f"unknown domain '{n}'; available: {', '.join(sorted(by_name)) or 'none'}", where=where)
            names.append(n)
    out = []
    for n in names:
        ds = by_name[n]
        if len(ds) > 1:
            raise DataError(f"domain '{n}' is given by two files: {ds[0].path} and {ds[1].path}", where=where)
        out.append(ds[0])
    return out
