"""`dedup` inputs that are wrong in a way dedup can tell (issue #25, items 4-6 and the rough
edges): one file under two names is read once, an id read twice fails the run naming both
places, vectors that are not unit length are normalised and counted, rows without an id or a
usable vector are left out and named, a row of another length fails naming file and row, and
what the schemas and small files tell is refused before any work, with the fix."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_curator import cli
from tests.conftest import cli_fails
from tests.dedup_reference import planted_embeddings

DIM = 16


def write(path, ids, vectors, id_type=None, vector_type=None):
    """One embeddings parquet; a vector may be None (a null embedding), an id None."""
    id_type, vector_type = id_type or pa.string(), vector_type or pa.list_(pa.float32())
    rows = [None if v is None else list(map(float, v)) for v in vectors]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(ids, type=id_type),
                             "embedding": pa.array(rows, type=vector_type)}), path)
    return path


@pytest.fixture(scope="module")
def planted():
    ids, vectors, plants = planted_embeddings(n_groups=3, per_group=20, dim=DIM, seed=5)
    return ids, vectors, plants


def dedup_argv(embeddings, out, *extra):
    return ["dedup", "--embeddings", str(embeddings), "--output", str(out),
            "--runner", "FnApiRunner", "--n_clusters", "1", *map(str, extra)]


def run_dedup(*args) -> dict:
    """summary.json of a dedup run that must succeed."""
    return cli.run_pipeline("dedup", dedup_argv(*args)[1:])


def removed_ids(out):
    directory = os.path.join(out, "dedup", "duplicates")
    return sorted(i for f in sorted(os.listdir(directory))
                  for i in pq.read_table(os.path.join(directory, f)).column("id").to_pylist())


def error_line(err):
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    return line


# ---- item 4: one file read once; an id read twice is an error naming both places ----------

def test_two_spellings_of_one_file_resolve_to_one(tmp_path, planted, monkeypatch):
    from beam_curator.transforms.semdedup.sources import resolve_embeddings_sized

    ids, vectors, _ = planted
    path = write(str(tmp_path / "E" / "embeddings" / "e.parquet"), ids, vectors)
    os.symlink(tmp_path / "E", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    files, _, size = resolve_embeddings_sized(
        "E/embeddings,./E/embeddings/,E//embeddings/e.parquet,link/embeddings/*.parquet")
    assert files == [os.path.realpath(path)] and size == os.path.getsize(path)


@pytest.mark.slow
def test_the_same_embeddings_twice_give_the_answer_of_once(tmp_path, planted, monkeypatch):
    ids, vectors, _ = planted
    write(str(tmp_path / "E" / "embeddings" / "e.parquet"), ids, vectors)
    monkeypatch.chdir(tmp_path)
    once = run_dedup("E/embeddings", tmp_path / "once")
    twice = run_dedup("E/embeddings,./E/embeddings", tmp_path / "twice")
    assert twice["n_embeddings"] == once["n_embeddings"] == len(ids)
    assert removed_ids(tmp_path / "twice") == removed_ids(tmp_path / "once")
    assert 0 < once["n_duplicates"] < len(ids) // 2


@pytest.mark.slow
def test_an_id_read_twice_fails_the_run_naming_both_places(tmp_path, planted, capsys):
    ids, vectors, _ = planted
    first = os.path.realpath(write(str(tmp_path / "copies" / "a.parquet"), ids, vectors))
    shutil.copy(first, tmp_path / "copies" / "b.parquet")   # a copy, not the same file
    assert cli.main(dedup_argv(tmp_path / "copies", tmp_path / "o1")) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{len(ids)} id(s) appear more than once" in line
    second = os.path.realpath(tmp_path / "copies" / "b.parquet")
    assert f"at {first} row 0 and at {second} row 0" in line
    assert not os.path.exists(tmp_path / "o1" / "summary.json")

    # inside one file: a row is never the duplicate of itself
    again = os.path.realpath(write(str(tmp_path / "inside" / "e.parquet"), ids + [ids[7]],
                                   np.concatenate([vectors, vectors[7:8]])))
    assert cli.main(dedup_argv(tmp_path / "inside", tmp_path / "o2")) == 2
    line = error_line(capsys.readouterr().err)
    assert f"1 id(s) appear more than once in --embeddings, e.g. {ids[7]!r} (2 times)" in line
    assert f"{again} row 7 and at {again} row {len(ids)}" in line


# ---- items 5 and rough edges: rows that are not unit length, or not usable at all ----------

@pytest.fixture(scope="module")
def messy(planted, tmp_path_factory):
    """The planted rows (some scaled off unit length) plus five rows dedup cannot use, and
    the answer for the planted rows alone."""
    ids, vectors, _ = planted
    root = tmp_path_factory.mktemp("messy")
    write(str(root / "clean" / "e.parquet"), ids, vectors)
    scaled = vectors.copy()
    scaled[::4] *= 3.0
    scaled[1::8] *= 0.25
    n_scaled = len(range(0, len(ids), 4)) + len(range(1, len(ids), 8))
    bad_ids = ["bad/nan", "bad/inf", "bad/zero", "bad/null-embedding", None]
    bad = [np.full(DIM, np.nan), np.r_[np.inf, np.zeros(DIM - 1)], np.zeros(DIM), None,
           vectors[0]]
    path = write(str(root / "messy" / "e.parquet"), ids + bad_ids, list(scaled) + bad)
    clean = run_dedup(root / "clean", root / "out-clean")
    summary = run_dedup(root / "messy", root / "out-messy")
    return dict(ids=ids, n_scaled=n_scaled, path=os.path.realpath(path), clean=clean,
                summary=summary, clean_out=root / "out-clean", out=root / "out-messy")


@pytest.mark.slow
def test_vectors_off_unit_length_are_normalised_and_counted(messy):
    summary = messy["summary"]
    assert summary["n_normalized_rows"] == messy["n_scaled"]
    assert summary["dedup"]["input_checks"]["normalized_rows"] == messy["n_scaled"]
    # the answer of the unit vectors: scaled ones no longer look similar to everything
    assert summary["n_duplicates"] == messy["clean"]["n_duplicates"]
    assert removed_ids(messy["out"]) == removed_ids(messy["clean_out"])
    assert messy["clean"]["n_normalized_rows"] == 0


@pytest.mark.slow
def test_rows_without_an_id_or_a_direction_are_left_out_counted_and_named(messy):
    summary, n = messy["summary"], len(messy["ids"])
    invalid = summary["dedup"]["input_checks"]["invalid_rows"]
    assert summary["n_invalid_rows"] == invalid["count"] == 5
    assert summary["n_embeddings"] == n   # every row read: answered or left out
    assert invalid["by_reason"] == {"NaN or infinite value": 2, "null embedding": 1,
                                    "null id": 1, "zero vector": 1}
    assert [(e["id"], e["row"], e["file"]) for e in invalid["examples"]] == [
        (i, n + k, messy["path"]) for k, i in enumerate(
            ["bad/nan", "bad/inf", "bad/zero", "bad/null-embedding", None])]
    assert not {"bad/nan", "bad/inf", "bad/zero", "bad/null-embedding"} & set(
        removed_ids(messy["out"]))


def test_examples_are_bounded_and_the_first_by_place():
    from beam_curator.transforms.semdedup.rows import InvalidSummary
    from beam_curator.transforms.semdedup.sources import InvalidRow

    combine = InvalidSummary()
    rows = [InvalidRow(f"i{k}", f"f{k % 3}", k, "zero vector") for k in range(50)]
    halves = [combine.create_accumulator(), combine.create_accumulator()]
    for k, row in enumerate(reversed(rows)):
        halves[k % 2] = combine.add_input(halves[k % 2], row)
    out = combine.extract_output(combine.merge_accumulators(halves))
    assert out["count"] == 50 and len(out["examples"]) == 20
    assert out["examples"] == [r._asdict() for r in sorted(rows, key=lambda r: (r.file, r.row))
                               ][:20]


def test_unit_rows_marks_what_has_no_direction_and_leaves_unit_rows_as_they_are():
    from beam_curator.transforms.semdedup.sources import REASONS, unit_rows

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    unit = x.copy()
    x[1] *= 2
    x[2] = 0
    x[3, 4] = np.nan
    x[4, 0] = -np.inf
    x[5] = 1e30   # finite, but its float32 square overflows
    vectors, codes, off = unit_rows(x)
    assert [REASONS[c] for c in codes] == [None, None, "zero vector", "NaN or infinite value",
                                           "NaN or infinite value", None]
    assert off.tolist() == [False, True, False, False, False, True]
    assert np.array_equal(vectors[0], unit[0])                    # bit for bit
    np.testing.assert_allclose(vectors[1], unit[1], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors[5]), 1.0, rtol=1e-6)


# ---- item 6: every row's length is checked -------------------------------------------------

def test_every_row_length_is_checked_even_when_the_total_divides():
    from beam_curator.transforms.semdedup.sources import RowLengthError, list_column_to_numpy

    # 4 + 2 + 6 = 12 values in 3 rows: a reshape made three 4-d garbage rows of it
    column = pa.array([[1.0] * 4, [2.0] * 2, [3.0] * 6], type=pa.list_(pa.float32()))
    with pytest.raises(RowLengthError, match="row 1 holds 2 values, not 4"):
        list_column_to_numpy(column)
    with pytest.raises(RowLengthError, match="row 0 holds 4 values, not 6"):
        list_column_to_numpy(column, 6)
    # null rows are zero rows here (the row check counts them)
    fine = pa.array([[1.0, 2.0], None, [3.0, 4.0]], type=pa.list_(pa.float32(), 2))
    assert list_column_to_numpy(fine).tolist() == [[1, 2], [0, 0], [3, 4]]


@pytest.mark.slow
def test_a_row_of_another_length_fails_the_run_naming_file_and_row(tmp_path, planted, capsys):
    ids, vectors, _ = planted
    rows = [list(v) for v in vectors]
    rows[10], rows[11] = rows[10] + rows[11][:8], rows[11][8:]   # the total still divides
    path = write(str(tmp_path / "E" / "e.parquet"), ids, rows)
    assert cli.main(dedup_argv(tmp_path / "E", tmp_path / "o")) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{os.path.realpath(path)} row 10: its 'embedding' holds {DIM + 8} values" in line
    assert f"the embeddings are {DIM}-d" in line

    # a second file of another model: the same error, naming that file
    other = tmp_path / "two"
    write(str(other / "a.parquet"), ids[:30], vectors[:30])
    b = write(str(other / "b.parquet"), ids[30:], vectors[30:, :8])
    assert cli.main(dedup_argv(other, tmp_path / "o2")) == 2
    assert f"{os.path.realpath(b)} row 0: its 'embedding' holds 8 values" in error_line(
        capsys.readouterr().err)


# ---- rough edges: refused before any work, with the fix ------------------------------------

def _integer_ids(tmp_path, ids, vectors):
    write(str(tmp_path / "E" / "e.parquet"), list(range(len(ids))), vectors,
          id_type=pa.int64())
    return [], ["holds int64, not strings", "--id_column"]


def _string_vectors(tmp_path, ids, vectors):
    pq.write_table(pa.table({"id": ids, "embedding": [str(v) for v in vectors]}),
                   str(tmp_path / "E" / "e.parquet"))
    return [], ["not a list of floats per row", "--embedding_column"]


def _empty(tmp_path, ids, vectors):
    write(str(tmp_path / "E" / "e.parquet"), [], [])
    return [], ["hold no embedding"]


def _only_null_vectors(tmp_path, ids, vectors):
    write(str(tmp_path / "E" / "e.parquet"), ids[:3], [None] * 3)
    return [], ["hold no embedding"]


def _centroids(array, name="c.npy"):
    def case(tmp_path, ids, vectors):
        write(str(tmp_path / "E" / "e.parquet"), ids, vectors)
        path = tmp_path / name
        if isinstance(array, bytes):
            path.write_bytes(array)
        else:
            np.save(path, array)
        return ["--centroids", path], ["--centroids", "leave --centroids out"]
    return case


def _seed(seed):
    def case(tmp_path, ids, vectors):
        write(str(tmp_path / "E" / "e.parquet"), ids, vectors)
        return ["--kmeans_seed", seed], [f"--kmeans_seed {seed} must be in [0, 2**31)"]
    return case


BAD = {
    "integer ids": _integer_ids,
    "string embeddings": _string_vectors,
    "empty parquet": _empty,
    "only null embeddings": _only_null_vectors,
    "centroids of another dim": _centroids(np.eye(2, 8, dtype=np.float32)),
    "centroids with NaN": _centroids(np.full((2, DIM), np.nan, dtype=np.float32)),
    "centroids not a npy": _centroids(b"k,d\n1,2\n", "c.csv"),
    "negative seed": _seed(-5),
    "seed too large": _seed(2**32),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_inputs_fail_fast_with_the_fix(kind, tmp_path, planted, capsys):
    ids, vectors, _ = planted
    os.makedirs(tmp_path / "E", exist_ok=True)
    extra, fragments = BAD[kind](tmp_path, ids, vectors)
    err = cli_fails(capsys, dedup_argv(tmp_path / "E", tmp_path / "out", *extra), *fragments)
    assert "Traceback" not in err
    error_line(err)
    assert not os.path.exists(tmp_path / "out")   # refused before --output is claimed


# ---- clip-retrieval's layout gets the same row checks ---------------------------------------

@pytest.mark.slow
def test_clip_retrieval_rows_are_checked_too(tmp_path, planted, capsys):
    ids, vectors, _ = planted
    clip = tmp_path / "clip"
    (clip / "img_emb").mkdir(parents=True)
    (clip / "metadata").mkdir()
    half = vectors.astype(np.float16)
    half[3] = 0
    half[4, 2] = np.nan
    np.save(clip / "img_emb" / "img_emb_0.npy", half)
    keys = list(ids)
    keys[5] = None
    pq.write_table(pa.table({"key": pa.array(keys, pa.string())}),
                   clip / "metadata" / "metadata_0.parquet")
    summary = run_dedup(clip, tmp_path / "o")
    invalid = summary["dedup"]["input_checks"]["invalid_rows"]
    assert invalid["by_reason"] == {"NaN or infinite value": 1, "null id": 1,
                                    "zero vector": 1}
    assert [e["row"] for e in invalid["examples"]] == [3, 4, 5]
    assert summary["n_embeddings"] == len(ids) - 3
    assert summary["n_normalized_rows"] == 0   # float16 rounding alone is not counted

    np.save(clip / "img_emb" / "img_emb_0.npy", (vectors * 100).astype(np.int32))
    cli_fails(capsys, dedup_argv(clip, tmp_path / "o2"), "holds int32, not float embeddings")


# ---- the one-graph run: an unusable embedding is an error of its sample -------------------

@pytest.mark.slow
def test_run_dedup_answers_an_unusable_embedding_with_an_error(tmp_path, planted):
    import apache_beam as beam
    from apache_beam.testing.util import assert_that

    from beam_curator import Deduplicate, SampleInfo
    from beam_curator.options import curator_options

    ids, vectors, _ = planted
    vectors = vectors[:20].copy()
    vectors[2] = np.nan
    candidates = [(SampleInfo(id=f"s/{i:03d}", shard="s", shard_url="s.tar", key=f"{i:03d}"),
                   v) for i, v in enumerate(vectors)]

    def check(results):
        by_id = {r.id: r for r in results}
        assert len(by_id) == 20
        assert by_id["s/002"].status == "error" and "NaN" in by_id["s/002"].reason
        assert all(r.status != "error" for i, r in by_id.items() if i != "s/002")

    with beam.Pipeline(options=curator_options(["--runner", "FnApiRunner"])) as p:
        dedup = (p | beam.Create(candidates)
                 | Deduplicate(str(tmp_path / "out"), n_clusters=1))
        assert_that(dedup.results | beam.combiners.ToList(), lambda got: check(got[0]))
