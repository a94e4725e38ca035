"""`lorabatch annotate`: templates, dataset formats, the answer cache, and whole runs through a real worker."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from sqlalchemy import select

from lorabatch.producer import annotation as an
from lorabatch.schemas.errors import InvalidInput, UsageError
from lorabatch.schemas.tables import Job, Request
from tests.conftest import run_cli

MAX_NEW = "4"
TEXTS = ["The weather today is", "Once upon a time", "A list of fruits:", "Dear friend,", "Rain falls on",
         "At the market"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli_in_process(capsys, config_path: Path, *args: str) -> tuple[int, str, str]:
    """Run `lorabatch` in this process (faster than run_cli where no subprocess is needed): (exit code, out, err)."""
    from lorabatch.cli.main import main

    capsys.readouterr()
    code = main(["--config", str(config_path), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()]


# ---------------------------------------------------------------- templates (pure)


@pytest.mark.parametrize(
    "template, row, expect",
    [
        ("Label: {text}", {"text": "hi", "id": 1}, "Label: hi"),
        ("{a} and {b}", {"a": "x", "b": 2}, "x and 2"),
        ("score {s:.2f}", {"s": 0.5}, "score 0.50"),
        ("{{literal}} {text!r}", {"text": "q"}, "{literal} 'q'"),
        ("meta {m}", {"m": {"k": [1, 2]}}, 'meta {"k": [1, 2]}'),
        ("col {user name}", {"user name": "Ann"}, "col Ann"),
    ],
)
def test_template_fills_fields(template, row, expect):
    """Placeholders name columns exactly; format specs and {{ }} work as in str.format."""
    assert an.load_template(template).request(row) == {"prompt": expect}


@pytest.mark.parametrize(
    "row, message",
    [({"other": "x"}, "row has no field 'text'"), ({"text": None}, r"field 'text' is empty \(null\)")],
)
def test_missing_field_is_the_rows_error(row, message):
    """A row without the field (or with null) raises RowError, which becomes that row's error."""
    with pytest.raises(an.RowError, match=message):
        an.load_template("Say: {text}").request(row)


def test_json_template_gives_messages_and_params(tmp_path):
    """A .json template gives chat messages and generation parameters; CLI flags override them."""
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief. {{ok}}"},
                                          {"role": "user", "content": "{text}"}],
                             "max_new_tokens": 8, "temperature": 0}))
    t = an.load_template(str(f), overrides={"max_new_tokens": 4, "seed": None})
    assert t.request({"text": "hello"}) == {
        "messages": [{"role": "system", "content": "Be brief. {ok}"}, {"role": "user", "content": "hello"}],
        "max_new_tokens": 4, "temperature": 0}


@pytest.mark.parametrize(
    "value, message",
    [
        ("Same prompt for all", "has no {field} placeholder"),
        ("Broken {text", "not a valid template"),
        ("Positional {}", "without a field name"),
        ("missing.txt", "template file missing.txt does not exist"),
    ],
)
def test_bad_templates_are_usage_errors(value, message):
    """Templates that cannot work are rejected before anything is read or submitted."""
    with pytest.raises(UsageError, match=message):
        an.load_template(value)


def test_template_requests_follow_the_line_rules(ctx, tmp_path):
    """Parameters are checked with the same rules as input lines; unknown adapters are refused."""
    with pytest.raises(UsageError, match="temperature=5"):
        an.check_template(an.load_template("{text}", overrides={"temperature": 5}), adapter="sft", settings=ctx.settings)
    with pytest.raises(UsageError, match="--adapter 'nope' is not configured"):
        an.check_template(an.load_template("{text}"), adapter="nope", settings=ctx.settings)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"prompt": "{text}", "max_tokens": 3}))
    with pytest.raises(UsageError, match="unknown key 'max_tokens'"):
        an.load_template(str(bad))


# ---------------------------------------------------------------- datasets (pure)


def test_glob_skips_outputs_and_names_outputs(tmp_path):
    """A glob's outputs go beside each input as <stem>.annotated.<ext>, and last run's outputs are not inputs."""
    for name in ("a.jsonl", "b.jsonl", "a.annotated.jsonl"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    files = an.resolve_datasets([str(tmp_path / "*.jsonl")])
    assert [(f.input.name, f.output.name) for f in files] == [("a.jsonl", "a.annotated.jsonl"),
                                                             ("b.jsonl", "b.annotated.jsonl")]
    into = an.resolve_datasets([str(tmp_path / "*.jsonl")], output=str(tmp_path / "out"))
    assert {f.output.parent.name for f in into} == {"out"}
    with pytest.raises(UsageError, match="must end in .jsonl"):
        an.resolve_datasets([str(tmp_path / "a.jsonl")], output=str(tmp_path / "x.csv"))
    with pytest.raises(UsageError, match="no JSONL, CSV or Parquet file matches"):
        an.resolve_datasets([str(tmp_path / "*.csv")])
    with pytest.raises(UsageError, match="lorabatch reads .jsonl, .csv and .parquet"):
        (tmp_path / "c.txt").write_text("x")
        an.resolve_datasets([str(tmp_path / "c.txt")])


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_output_keeps_rows_order_and_format(tmp_path, fmt):
    """The output is the input's rows, in order, in its format, plus the three answer columns."""
    rows = [{"id": str(i), "text": t} for i, t in enumerate(["b", "a", "c"])]
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "text"])
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    [df] = an.resolve_datasets([str(path)])
    loaded = an.load_file(df)
    assert loaded.rows == rows
    cells = [("B", "succeeded", None), (None, "invalid", "row has no field 'x'"), (None, "failed", "boom")]
    out = an.write_output(loaded, cells, column="label")
    assert out == tmp_path / f"d.annotated.{fmt}"
    back = an.load_file(an.DatasetFile(out, out, fmt)).rows
    assert [r["id"] for r in back] == ["0", "1", "2"]
    assert [r["label_status"] for r in back] == ["succeeded", "invalid", "failed"]
    assert back[0]["label"] == "B" and back[1]["label_error"] == "row has no field 'x'"
    assert list(back[0])[:2] == ["id", "text"], "input columns keep their place"
    assert not list(tmp_path.glob(".*.part")), "no temporary file left behind"


def test_unreadable_rows_reject_the_file(tmp_path):
    """A JSONL line that is not an object cannot be written back: the file is invalid input."""
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(InvalidInput, match="line 2 is not a JSON object"):
        an.load_file(an.resolve_datasets([str(p)])[0])


# ---------------------------------------------------------------- submitting (no worker)


def test_annotate_no_wait_submits_only_distinct_valid_rows(config_path, tmp_path, ctx, capsys):
    """Identical rows share one request, a row missing the field is not submitted, the job is a normal one;
    a second run waits on the first's job instead of sending the rows again, unless --fresh."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "a"}, {"other": 1}])
    args = ("annotate", str(data), "-t", "Say {text}", "--adapter", "sft", "--max-new-tokens", MAX_NEW, "--no-wait", "--json")
    code, out, err = cli_in_process(capsys, config_path, *args)
    assert code == 0, err
    first = json.loads(out)
    with ctx.sessions() as s:
        job = s.get(Job, first["job"])
        prompts = s.scalars(select(Request.prompt).where(Request.job_id == job.id).order_by(Request.idx)).all()
    assert job.total == 2 and sorted(prompts) == ["Say a", "Say b"] and job.schedule is None
    assert "1 invalid" in err
    second = json.loads(cli_in_process(capsys, config_path, *args)[1])
    assert second["job"] is None and second["waits_on"] == [job.id], "rows already in an open job are not sent twice"
    fresh = json.loads(cli_in_process(capsys, config_path, *args, "--fresh")[1])
    with ctx.sessions() as s:
        assert s.get(Job, fresh["job"]).total == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["-t", "no placeholder", "--adapter", "sft"], "has no {field} placeholder"),
        (["-t", "{text}", "--adapter", "ghost"], "--adapter 'ghost' is not configured"),
        (["-t", "{text}", "--adapter", "sft", "--temperature", "9"], "temperature=9"),
        (["-t", "Say {txet}", "--adapter", "sft"], "placeholder {txet} matches no column of"),
    ],
)
def test_annotate_usage_errors_exit_2(config_path, tmp_path, capsys, args, message):
    """Bad options exit 2 with one line naming the problem; nothing is submitted."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    code, out, err = cli_in_process(capsys, config_path, "annotate", str(data), *args)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and out == ""
    if "placeholder {txet}" in message:
        assert "its columns are: text" in err


# ---------------------------------------------------------------- end to end, real worker


@pytest.mark.slow
def test_annotate_jsonl_csv_parquet_end_to_end(config_path, tmp_path, start_worker):
    """JSONL, CSV and Parquet datasets come back annotated in order; a row without the field is that row's error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    worker = start_worker()
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "text": t} for i, t in enumerate(TEXTS[:3])] + [{"id": 9}])
    r = run_cli(config_path, "annotate", str(jsonl), "-t", "Continue: {text}", "--adapter", "sft",
                "--max-new-tokens", MAX_NEW, "--json")
    assert r.returncode == 0, r.stderr + worker.read_log()[-2000:]
    res = json.loads(r.stdout)
    assert res["counts"]["succeeded"] == 3 and res["counts"]["invalid"] == 1
    rows = read_jsonl(tmp_path / "d.annotated.jsonl")
    assert [row["id"] for row in rows] == [0, 1, 2, 9]
    assert all(row["annotation_status"] == "succeeded" and row["annotation"] for row in rows[:3])
    assert rows[3]["annotation"] is None and "row has no field 'text'" in rows[3]["annotation_error"]

    csv_path = tmp_path / "d.csv"
    with csv_path.open("w", newline="") as f:
        csv.writer(f).writerows([("id", "text"), *enumerate(TEXTS[3:], start=3)])
    r = run_cli(config_path, "annotate", str(csv_path), "-t", "Continue: {text}", "--adapter", "dpo",
                "--max-new-tokens", MAX_NEW, "--column", "label", "-o", str(tmp_path / "labelled.csv"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "labelled.csv")
    with (tmp_path / "labelled.csv").open(newline="") as f:
        out = list(csv.DictReader(f))
    assert [o["id"] for o in out] == ["3", "4", "5"] and list(out[0]) == ["id", "text", "label", "label_status", "label_error"]
    assert all(o["label_status"] == "succeeded" and o["label"] for o in out)

    pq.write_table(pa.Table.from_pylist([{"n": 1, "text": TEXTS[0]}, {"n": 2, "text": TEXTS[1]}]), tmp_path / "p.parquet")
    r = run_cli(config_path, "annotate", str(tmp_path / "p.parquet"), "-t", "Continue: {text}", "--adapter", "sft",
                "--max-new-tokens", MAX_NEW, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["job"] is None, "the same requests were answered in the JSONL run"
    table = pq.read_table(tmp_path / "p.annotated.parquet").to_pylist()
    assert [t["annotation"] for t in table] == [rows[0]["annotation"], rows[1]["annotation"]]


@pytest.mark.slow
def test_rerun_annotates_only_new_rows(config_path, tmp_path, ctx, start_worker):
    """A rerun sends only rows it has not answered (same template, adapter, params) and reuses the rest."""
    start_worker()
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"id": i, "text": t} for i, t in enumerate(TEXTS[:4])])
    args = ["annotate", str(data), "-t", "Continue: {text}", "--adapter", "sft", "--max-new-tokens", MAX_NEW, "--json"]
    first = json.loads(run_cli(config_path, *args).stdout)
    before = read_jsonl(tmp_path / "d.annotated.jsonl")

    # Two new rows; an existing row changes a column the template does not use.
    rows = [{"id": i, "text": t} for i, t in enumerate(TEXTS)]
    rows[0]["id"] = "changed"
    write_jsonl(data, rows)
    r = run_cli(config_path, *args)
    assert r.returncode == 0, r.stderr
    second = json.loads(r.stdout)
    with ctx.sessions() as s:
        assert s.get(Job, first["job"]).total == 4
        job = s.get(Job, second["job"])
        sent = s.scalars(select(Request.prompt).where(Request.job_id == job.id)).all()
    assert sorted(sent) == sorted(f"Continue: {t}" for t in TEXTS[4:])
    after = read_jsonl(tmp_path / "d.annotated.jsonl")
    assert [a["annotation"] for a in after[:4]] == [b["annotation"] for b in before]
    assert after[0]["id"] == "changed" and all(a["annotation_status"] == "succeeded" for a in after)

    other = json.loads(run_cli(config_path, *args[:-2], "3", "--json").stdout)
    with ctx.sessions() as s:
        assert s.get(Job, other["job"]).total == len(TEXTS), "other parameters: every row is asked again"
