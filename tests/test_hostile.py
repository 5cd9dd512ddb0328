"""Issue 16: hostile inputs that were silently wrong or ended in a traceback (docs/reliability.md §4).

Tampered prepared folders (edited, and edited then re-sealed with fresh
checksums and fingerprint), NaN checkpoints, config.json records, gzipped raw
files, byte-identical checkpoints, a real full disk, symbolic-link loops, huge
seeds and configs, odd lock paths. Everything on the tiny synthetic data.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli
from uclr_cli import checkpoint as ckpt
from uclr_cli import layout, loop
from uclr_cli.data.dataset import MANIFEST, load_prepared, sha256_file
from uclr_cli.data.verify import TABLES, fingerprint_of
from uclr_cli.errors import UclrError
from uclr_cli.files import atomic_write
from uclr_cli.lock import LOCK_NAME

PRE = ["--dim", "8", "--batch-size", "512", "--lr", "0.01", "--device", "cpu", "--save-every", "0"]
CON = ["--hidden", "8,4", "--batch-size", "128", "--device", "cpu"]
FT = ["--rank", "2", "--batch-size", "512", "--device", "cpu"]


def one_line_error(r, *needles: str) -> str:
    assert r.exit_code == 1, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def small_run(tiny_data, tmp_path_factory) -> Path:
    """pretrain (1 epoch) and contrast (1 epoch) of seed 0 on the tiny data."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    for args in (["pretrain", *PRE, "--epochs", "1"], ["contrast", *CON, "--epochs", "1"]):
        r = run_cli(*args, "--data", tiny_data, "--run", run)
        assert r.exit_code == 0, r.output
    return run


# --------------------------------------------------------------------------- tampered prepared folders


def reseal(folder: Path) -> None:
    """What a careful forger does: fresh file checksums and fingerprint in the manifest."""
    mf = json.loads((folder / MANIFEST).read_text())
    mf["files"] = {k: sha256_file(folder / f"{k}.parquet") for k in TABLES}
    mf["fingerprint"] = fingerprint_of(mf)
    (folder / MANIFEST).write_text(json.dumps(mf, indent=2))


def edit_manifest(folder: Path, fn) -> None:
    mf = json.loads((folder / MANIFEST).read_text())
    fn(mf)
    (folder / MANIFEST).write_text(json.dumps(mf, indent=2))


def edit_table(folder: Path, table: str, fn) -> None:
    p = folder / f"{table}.parquet"
    fn(pl.read_parquet(p)).write_parquet(p)


def _set_row(df: pl.DataFrame, col: str, row: int, value) -> pl.DataFrame:
    vals = df.get_column(col).to_list()
    vals[row] = value
    return df.with_columns(pl.Series(col, vals, dtype=df.schema[col], strict=False))  # out of the type's range: null


def _valid_pos_in_train(df: pl.DataFrame, folder: Path) -> pl.DataFrame:
    """The valid positive of train row 0's user and domain becomes that train item (a negative swapped if need be)."""
    t = pl.read_parquet(folder / "train.parquet").row(0, named=True)
    r = int(df.with_row_index("r").filter((pl.col("user") == t["user"]) & (pl.col("domain") == t["domain"]))["r"][0])
    old = df["item"][r]
    negs = df.get_column("negatives").to_list()
    negs[r] = [old if n == t["item"] else n for n in negs[r]]
    df = _set_row(df, "item", r, t["item"])
    return df.with_columns(pl.Series("negatives", negs, dtype=df.schema["negatives"]))


def _dup_domain(mf):
    mf["domains"][1]["name"] = mf["domains"][0]["name"]
    mf["stats"][1]["domain"] = mf["stats"][0]["domain"]


def _manifest(fn):
    return lambda f: edit_manifest(f, fn)


def _short_list(df: pl.DataFrame) -> pl.DataFrame:
    lists = df.get_column("negatives").to_list()
    lists[3] = lists[3][:50]
    return df.with_columns(pl.Series("negatives", lists, dtype=df.schema["negatives"]))


TAMPERS = {
    # name: (the edit, sealed again afterwards?, text of the one-line error)
    "item_offset edited": (_manifest(lambda m: m["domains"][1].update(item_offset=1)), False, "item_offset"),
    "item_offset edited, sealed": (
        _manifest(lambda m: m["domains"][1].update(item_offset=1)),
        True,
        "item_offset of 'movies' is 1",
    ),
    "domain twice, sealed": (_manifest(_dup_domain), True, "domain 'books' twice"),
    "domains: [], sealed": (_manifest(lambda m: m.update(domains=[])), True, "lists no domains"),
    "negatives 0, sealed": (_manifest(lambda m: m["options"].update(negatives=0)), True, "must be in [1, 10000]"),
    "negatives 50, sealed": (_manifest(lambda m: m["options"].update(negatives=50)), True, "other than 50 negatives"),
    "negative of another domain, sealed": (
        lambda f: _tamper_at(f, "valid", "negatives", 0, (0, 299)),  # row 0 is a books row; 299 is a movie
        True,
        "a negative lies outside the row's domain",
    ),
    "valid positive in train, sealed": (
        lambda f: edit_table(f, "valid", lambda df: _valid_pos_in_train(df, f)),
        True,
        "also a train item",
    ),
    "empty test split, sealed": (lambda f: edit_table(f, "test", lambda df: df.head(0)), True, "test.parquet"),
    "train item -1, sealed": (lambda f: _tamper_at(f, "train", "item", 0, -1), True, "item outside its domain's"),
    "user out of range, sealed": (lambda f: _tamper_at(f, "train", "user", 5, 300), True, "user index outside"),
    "missing column, sealed": (lambda f: edit_table(f, "test", lambda df: df.drop("item")), True, "missing column"),
    "short negatives list, sealed": (lambda f: edit_table(f, "test", _short_list), True, "other than 99 negatives"),
}


@pytest.mark.parametrize("name", list(TAMPERS))
def test_tampered_prepared_folder_refused_one_line(tiny_data, small_run, tmp_path, name):
    edit, sealed, needle = TAMPERS[name]
    data = tmp_path / "tiny"
    shutil.copytree(tiny_data, data)
    edit(data)
    if sealed:
        reseal(data)
    for args in (["evaluate", "--device", "cpu", "--run", small_run], ["pretrain", *PRE, "--epochs", "1"]):
        extra = [] if args[0] == "evaluate" else ["--run", tmp_path / "run"]
        one_line_error(run_cli(*args, *extra, "--data", data), needle)
    assert not (tmp_path / "run").exists()


def test_edited_manifest_changes_the_fingerprint_and_checkpoints_refuse_it(tiny_data, small_run, tmp_path):
    data = tmp_path / "tiny"
    shutil.copytree(tiny_data, data)
    before = load_prepared(data).fingerprint
    edit_manifest(data, lambda m: m.update(source="edited"))  # a harmless field: the data are the same
    one_line_error(run_cli("evaluate", "--data", data, "--run", small_run), "does not match its fingerprint")
    reseal(data)  # sealed again: another dataset now, which every checkpoint refuses
    assert load_prepared(data).fingerprint != before
    for args in (["evaluate", "--device", "cpu"], ["contrast", *CON, "--epochs", "1"]):
        one_line_error(run_cli(*args, "--data", data, "--run", small_run), "trained on another dataset")


def test_format_1_folder_still_loads_with_its_old_fingerprint(tiny_data, tmp_path):
    data = tmp_path / "tiny"
    shutil.copytree(tiny_data, data)
    edit_manifest(data, lambda m: m.update(format_version=1))
    edit_manifest(data, lambda m: m.update(fingerprint=fingerprint_of(m)))
    old = json.loads((data / MANIFEST).read_text())["fingerprint"]
    assert load_prepared(data).fingerprint == old
    edit_manifest(data, lambda m: m["domains"][1].update(item_offset=1))  # not covered in format 1 ...
    one_line_error(run_cli("pretrain", *PRE, "--data", data, "--run", tmp_path / "r"), "item_offset")  # ... checked


def _tamper_at(folder: Path, table: str, col: str, row: int, value) -> None:
    p = folder / f"{table}.parquet"
    df = pl.read_parquet(p)
    if col == "negatives":
        lists = df.get_column(col).to_list()
        r = row % df.height
        lists[r][value[0] % len(lists[r])] = value[1]
        df = df.with_columns(pl.Series(col, lists, dtype=df.schema[col]))
    else:
        df = _set_row(df, col, row % df.height, value)
    df.write_parquet(p)


FUZZ_COLUMNS = [
    ("train", "user"),
    ("train", "item"),
    ("train", "domain"),
    ("valid", "user"),
    ("valid", "item"),
    ("test", "item"),
    ("test", "domain"),
    ("test", "negatives"),
    ("users", "user_idx"),
    ("items", "item_idx"),
]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    where=st.sampled_from(FUZZ_COLUMNS),
    row=st.integers(0, 10_000),
    value=st.integers(-3, 650) | st.sampled_from([2**31 - 1, -(2**31)]),
    slot=st.integers(0, 98),
    seal=st.booleans(),
)
def test_fuzz_tampered_prepared_folder(tiny_data, tmp_path_factory, where, row, value, slot, seal):
    """Any one edited id: the folder loads with its data unchanged (or as another dataset whose data pass every
    invariant), or the command fails with exit 1 and one line; never a traceback, never the same identity for
    other data."""
    data = tmp_path_factory.mktemp("fuzz") / "tiny"
    shutil.copytree(tiny_data, data)
    table, col = where
    _tamper_at(data, table, col, row, (slot, value) if col == "negatives" else value)
    if seal:
        reseal(data)
    r = run_cli("pretrain", *PRE, "--epochs", "1", "--data", data, "--run", tmp_path_factory.mktemp("run"))
    if r.exit_code != 0:
        one_line_error(r)
        return
    orig, ds = load_prepared(tiny_data), load_prepared(data)  # it loaded and trained
    same = torch.equal(ds.train_user, orig.train_user) and torch.equal(ds.train_item, orig.train_item)
    for d in orig.domains:
        for split in ("valid", "test"):
            a, b = ds.split(split)[d], orig.split(split)[d]
            same = same and all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("users", "pos", "negs"))
    assert same or ds.fingerprint != orig.fingerprint, "other data under the same identity"
    for split in (ds.valid, ds.test):  # what loads holds the invariants training relies on
        for d, ev in split.items():
            lo, hi = ds.item_offsets[ds.domains.index(d)], ds.item_offsets[ds.domains.index(d) + 1]
            assert ((ev.pos >= lo) & (ev.pos < hi)).all() and ((ev.negs >= lo) & (ev.negs < hi)).all()
            assert ((ev.users >= 0) & (ev.users < ds.n_users)).all()
    assert ((ds.train_user >= 0) & (ds.train_user < ds.n_users)).all()
    assert ((ds.train_item >= 0) & (ds.train_item < ds.n_items)).all()


# --------------------------------------------------------------------------- checkpoints


def _rewrite(path: Path, change) -> None:
    """Re-save a checkpoint with changed tensors: its checksum is valid again."""
    t, meta = ckpt.load(path, stage=ckpt.read_header(path)["stage"])
    t = dict(t)
    change(t)
    meta = {k: v for k, v in meta.items() if k not in ("format_version", "package_version", ckpt.DIGEST)}
    ckpt.save(path, t, meta)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_checkpoint_with_non_finite_weights_refused(tiny_data, small_run, tmp_path, bad):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    target = run / "seed-0" / layout.PRETRAIN
    _rewrite(target, lambda t: t["item_emb"].view(-1)[7].fill_(bad))
    kind = "NaN" if bad != bad else "infinite"
    for args in (["evaluate", "--device", "cpu"], ["contrast", *CON, "--epochs", "1"]):
        one_line_error(run_cli(*args, "--data", tiny_data, "--run", run), f"'item_emb' holds {kind}", str(target))


def test_checkpoint_missing_a_tensor_refused(tiny_data, small_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    target = run / "seed-0" / layout.PRETRAIN
    _rewrite(target, lambda t: t.pop("item_emb"))
    for args in (["evaluate", "--device", "cpu"], ["contrast", *CON, "--epochs", "1"]):
        one_line_error(run_cli(*args, "--data", tiny_data, "--run", run), "lacks tensor 'item_emb'", str(target))


def test_identical_runs_write_identical_bytes(tiny_data, tmp_path):
    for run in ("a", "b"):
        for args in (
            ["pretrain", *PRE, "--epochs", "2"],
            ["contrast", *CON, "--epochs", "1"],
            ["finetune", *FT, "--domain", "music", "--epochs", "1"],
        ):
            r = run_cli(*args, "--data", tiny_data, "--run", tmp_path / run)
            assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (tmp_path / "a" / "seed-0").iterdir())
    assert len(names) == 6
    for name in names:
        a, b = (tmp_path / run / "seed-0" / name for run in ("a", "b"))
        assert a.read_bytes() == b.read_bytes(), name


# --------------------------------------------------------------------------- config.json


def test_config_json_records_only_stages_that_started(tiny_data, small_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    before = (run / layout.CONFIG).read_bytes()
    r = run_cli("pretrain", *PRE, "--dim", "64", "--epochs", "2", "--resume", "--data", tiny_data, "--run", run)
    one_line_error(r, "dim differ")
    assert (run / layout.CONFIG).read_bytes() == before  # the refused --dim 64 was not recorded
    r = run_cli("pretrain", *PRE, "--epochs", "2", "--resume", "--data", tiny_data, "--run", run)
    assert r.exit_code == 0, r.output
    conf = json.loads((run / layout.CONFIG).read_text())
    assert conf["pretrain"]["epochs"] == 2 and conf["pretrain"]["dim"] == 8 and "contrast-individual" in conf


def test_corrupt_config_json_refused_not_replaced(tiny_data, small_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    (run / layout.CONFIG).write_text('{"pretrain": {"dim": 8}, "contrast-individual": ')
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = run_cli("contrast", *CON, "--epochs", "1", "--data", tiny_data, "--run", run)
    one_line_error(r, "not valid JSON", "fix or remove it", str(run / layout.CONFIG))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------------- raw files


def _rows(users=20, items=30, per_user=6) -> str:
    rows = (f"u{u},i{(u * 7 + k) % items},4,{k}\n" for u in range(users) for k in range(per_user))
    return "user,item,rating,timestamp\n" + "".join(rows)


def test_prepare_files_reads_gzipped_csv_and_tsv(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "books.csv.gz").write_bytes(gzip.compress(_rows().encode()))
    (raw / "music.tsv.gz").write_bytes(gzip.compress(_rows().replace(",", "\t").encode()))
    (raw / "movies.csv").write_text(_rows())
    r = run_cli("prepare", "files", raw, "--out", tmp_path / "p", "--negatives", "5")
    assert r.exit_code == 0, r.output
    ds = load_prepared(tmp_path / "p")
    assert ds.domains == ["books", "movies", "music"]
    assert ds.manifest["stats"][0]["train"] == ds.manifest["stats"][1]["train"] > 0
    # a truncated archive, other compressions, and two files of one domain are refused in one line
    (raw / "books.csv.gz").write_bytes(gzip.compress(_rows().encode())[:-20])
    one_line_error(run_cli("prepare", "files", raw, "--out", tmp_path / "q"), "corrupt gzip", "books.csv.gz")
    (raw / "books.csv.gz").unlink()
    (raw / "books.csv.bz2").write_bytes(b"BZh9")
    one_line_error(run_cli("prepare", "files", raw, "--out", tmp_path / "q"), "compressed with bz2", "books.csv.bz2")
    (raw / "books.csv.bz2").unlink()
    (raw / "music.csv").write_text(_rows())
    one_line_error(run_cli("prepare", "files", raw, "--out", tmp_path / "q"), "two files give domain 'music'")
    assert not (tmp_path / "q").exists()


# --------------------------------------------------------------------------- disk, links, locks


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB tmpfs (needs root and permission to mount; skipped otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()[:80]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Fill the disk but ``leave`` bytes."""
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(free - leave, 0))


def test_real_disk_full_is_one_line(tiny_data, small_run, small_disk):
    run = small_disk / "run"
    shutil.copytree(small_run, run)
    (run / "seed-0" / layout.CONTRAST["individual"]).unlink()
    (run / "seed-0" / layout.resume_name(layout.CONTRAST["individual"])).unlink()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    fill(small_disk, 3 * 4096)  # room for the lock and a small checkpoint, not for a resume state
    r = run_cli("pretrain", *PRE, "--epochs", "1", "--data", tiny_data, "--run", run)
    one_line_error(r, "cannot write checkpoint: no space left on device", str(run / "seed-0"))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing changed, no temporary
    r = run_cli("contrast", *CON, "--epochs", "1", "--data", tiny_data, "--run", run)
    one_line_error(r, "cannot write checkpoint: no space left on device", str(run / "seed-0"))
    for p in run.rglob("*"):  # whatever was written is complete; nothing temporary is left; the lock is released
        assert ".tmp-" not in p.name and p.name != LOCK_NAME
        if p.suffix == ".safetensors":
            ckpt.load(p, stage=ckpt.read_header(p)["stage"])
    assert json.loads((run / layout.CONFIG).read_text()) == json.loads(before[run / layout.CONFIG])
    (small_disk / "filler").unlink()
    fill(small_disk, 0)
    r = run_cli("evaluate", "--data", tiny_data, "--run", run, "--device", "cpu", "--out", small_disk / "rows.parquet")
    one_line_error(r, "no space left on device", "rows.parquet")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "run"]


def test_write_under_a_file_or_a_looping_link_is_one_line(tiny_data, small_run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UclrError, match="cannot write file"):
        atomic_write(blocker / "sub" / "x.json", lambda p: p.write_text("{}"))
    r = run_cli("evaluate", "--data", tiny_data, "--run", small_run, "--device", "cpu", "--out", blocker / "x.parquet")
    one_line_error(r, "is a file, not a folder", "--out")  # refused before any scoring
    # a seed folder that is a symbolic-link loop: refused by name, not skipped
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    (run / "seed-1").symlink_to("seed-1")
    one_line_error(run_cli("evaluate", "--data", tiny_data, "--run", run), "broken or looping symbolic link", "seed-1")
    one_line_error(run_cli("pretrain", *PRE, "--seed", "1", "--data", tiny_data, "--run", run), "symbolic link")
    (run / "seed-1").unlink()
    # a checkpoint that is a loop
    con = run / "seed-0" / layout.CONTRAST["individual"]
    con.unlink()
    con.symlink_to(con.name)
    one_line_error(run_cli("evaluate", "--data", tiny_data, "--run", run), "broken or looping symbolic link", con.name)
    one_line_error(run_cli("finetune", *FT, "--epochs", "1", "--data", tiny_data, "--run", run), con.name)


@pytest.mark.parametrize("kind", ["folder", "dangling-link"])
def test_odd_lock_path_is_one_line_and_kept(tiny_data, tmp_path, kind):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / LOCK_NAME
    if kind == "folder":
        lock.mkdir()
        (lock / "keep").write_text("x")
    else:
        lock.symlink_to(tmp_path / "nowhere")
    r = run_cli("pretrain", *PRE, "--epochs", "1", "--data", tiny_data, "--run", run)
    one_line_error(r, "not a lock file of uclr; remove it", LOCK_NAME)
    assert lock.is_symlink() or (lock / "keep").is_file()


# --------------------------------------------------------------------------- seeds and sizes


def test_huge_seed_trains_and_small_seeds_keep_their_streams(tiny_data, tmp_path):
    for seed, stream in ((0, 1), (4, 2), (10**6, 9_003)):
        assert loop.generator(torch.device("cpu"), seed, stream).initial_seed() == seed * 1_000_003 + stream
    big = 10**17
    a, b = (loop.generator(torch.device("cpu"), big, s).initial_seed() for s in (1, 2))
    assert a != b and a == loop.generator(torch.device("cpu"), big, 1).initial_seed()
    run = tmp_path / "run"
    for args in (["pretrain", *PRE, "--epochs", "1"], ["contrast", *CON, "--epochs", "1"]):
        r = run_cli(*args, "--seed", str(big), "--data", tiny_data, "--run", run)
        assert r.exit_code == 0, r.output
    r = run_cli("evaluate", "--data", tiny_data, "--run", run, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["seeds"] == [big]
    r = run_cli("pretrain", *PRE, "--seed", str(10**18), "--data", tiny_data, "--run", run)
    one_line_error(r, "seeds must be below 1e+18")


def test_config_too_large_for_memory_refused_before_any_work(tiny_data, small_run, tmp_path):
    run = tmp_path / "run"
    r = run_cli("pretrain", *PRE, "--dim", "100000000", "--data", tiny_data, "--run", run)
    one_line_error(r, "pretrain with dim 100000000 needs at least", "available", "--dim")
    assert not run.exists()
    conf = tmp_path / "c.toml"
    conf.write_text("hidden = [1000000000]\n")
    shutil.copytree(small_run, run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    r = run_cli("contrast", "--config", conf, "--epochs", "1", "--device", "cpu", "--data", tiny_data, "--run", run)
    one_line_error(r, "needs at least", "key 'hidden'")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_allocator_failure_is_one_line(tiny_data, tmp_path, monkeypatch):
    from uclr_cli.stages import pretrain

    def boom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried")

    monkeypatch.setattr(pretrain, "init_tables", boom)
    r = run_cli("pretrain", *PRE, "--data", tiny_data, "--run", tmp_path / "run")
    one_line_error(r, "out of memory in pretrain")
    assert not (tmp_path / "run" / layout.CONFIG).exists()
