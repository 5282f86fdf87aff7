"""Batch input and output with pyarrow: OpenAI batch JSONL, or a Parquet / JSONL / CSV table.

Input is read as a stream (Parquet by row group, CSV by block, JSONL by line), so
a 10 GB file never sits in memory whole. `inspect` checks a file before any
compute (its format, its columns or first line, the endpoint) and counts its rows;
`iter_rows` yields `BatchRow`s, one per input row, each either a request body or
the error that stops it (a malformed line keeps its line number, and the job goes
on). Shard outputs are Parquet (one output row per input row, the input's other
columns passed through) or OpenAI's output and error JSONL.

Rows that share a prefix should meet the same engine's prefix cache: `cache_key`
names what a row shares with others (the conversation before its last turn, the
start of its last message or prompt), and the driver orders each window of rows
by it (deployments/batch.py).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
# Columns of a table input that set a row's sampling (every other column passes through).
SAMPLING_COLUMNS = (
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "n",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos", "logprobs",
    "top_logprobs", "response_format", "structured_outputs",
)
TEXT_COLUMNS = ("prompt", "messages")
# How much of a row's last message (or prompt) its cache key takes.
KEY_CHARS = 256


@dataclass
class BatchRow:
    """One input row: a request body to run, or the error that stops it.

    Args:
        index: 0-based position in the input.
        line: 1-based line (JSONL) or row number, for error messages.
        custom_id: the row's id in an OpenAI input.
        kind: "chat" or "completion".
        body: the OpenAI request body (model included).
        passthrough: a table row's other columns, copied to its output row.
        error: why the row cannot run (it still gets an output row).
    """

    index: int
    line: int
    custom_id: Optional[str] = None
    kind: str = "completion"
    body: Optional[dict[str, Any]] = None
    passthrough: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None

    def cache_key(self) -> str:
        """What this row shares with rows it should run beside: the conversation before its last
        turn and the start of its last message (or of its prompt)."""
        if not self.body:
            return ""
        if self.kind == "chat":
            messages = self.body.get("messages") or []
            if not isinstance(messages, list) or not messages:
                return ""
            last = messages[-1] if isinstance(messages[-1], dict) else {}
            return json.dumps(messages[:-1], sort_keys=True, default=str) + str(last.get("content", ""))[:KEY_CHARS]
        return str(self.body.get("prompt", ""))[:KEY_CHARS]


@dataclass
class InputInfo:
    """What `inspect` learned: the file's format and size."""

    path: Path
    file_format: str  # "jsonl", "parquet" or "csv"
    input_format: str  # "openai" or "table"
    num_rows: int
    kind: str  # "chat" or "completion": the endpoint (OpenAI) or the text column (table)
    endpoint: Optional[str] = None


def _file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    raise ValueError(f"{path.name}: not a batch input (JSONL, Parquet or CSV, by its suffix)")


def _first_jsonl_object(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path.name}: line {number} is not JSON ({e.msg}): not a JSONL file") from None
                if not isinstance(first, dict):
                    raise ValueError(f"{path.name}: line {number} is not a JSON object")
                return first
    raise ValueError(f"{path.name}: the file has no rows")


def inspect(path: str | Path, model: Optional[str] = None) -> InputInfo:
    """Check an input before any compute and count its rows (ValueError, one line, when it cannot run).

    OpenAI batch JSONL is recognised by its lines' `custom_id` and `body`; every other input is a
    table with a `prompt` or a `messages` column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"batch input {path} does not exist")
    fmt = _file_format(path)
    if fmt == "jsonl":
        first = _first_jsonl_object(path)
        num_rows = _count_jsonl_rows(path)
        if "custom_id" in first and "body" in first:
            url = first.get("url")
            if url not in ENDPOINTS:
                raise ValueError(f"{path.name}: endpoint {url!r} is not served here; batch lines may name {sorted(ENDPOINTS)}")
            body_model = (first.get("body") or {}).get("model")
            if model is not None and body_model is not None and body_model != model:
                raise ValueError(f"{path.name}: line 1 asks for model {body_model!r}, the job runs {model!r}")
            return InputInfo(path, fmt, "openai", num_rows, ENDPOINTS[url], url)
        columns = set(first)
    elif fmt == "parquet":
        meta = pq.ParquetFile(path)
        columns = set(meta.schema_arrow.names)
        num_rows = meta.metadata.num_rows
    else:
        columns, num_rows = _csv_columns_and_rows(path)
    text = [c for c in TEXT_COLUMNS if c in columns]
    if len(text) != 1:
        raise ValueError(f"{path.name}: a table needs exactly one of the columns {TEXT_COLUMNS}; it has {sorted(columns)}")
    if num_rows == 0:
        raise ValueError(f"{path.name}: the file has no rows")
    return InputInfo(path, fmt, "table", num_rows, "chat" if text[0] == "messages" else "completion")


def _count_jsonl_rows(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _csv_columns_and_rows(path: Path) -> tuple[set[str], int]:
    reader = pacsv.open_csv(path)
    columns = set(reader.schema.names)
    return columns, sum(batch.num_rows for batch in reader)


def iter_rows(info: InputInfo, model: str, defaults: Optional[dict[str, Any]] = None) -> Iterator[BatchRow]:
    """Every row of the input in order, as request bodies for `model` (defaults under each row's own)."""
    defaults = dict(defaults or {})
    if info.input_format == "openai":
        yield from _openai_rows(info, model, defaults)
        return
    for index, (line, record) in enumerate(_table_records(info)):
        yield _table_row(index, line, record, info.kind, model, defaults)


def _openai_rows(info: InputInfo, model: str, defaults: dict[str, Any]) -> Iterator[BatchRow]:
    index = 0
    with open(info.path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            row = BatchRow(index, number, kind=info.kind)
            index += 1
            try:
                line = json.loads(text)
            except json.JSONDecodeError as e:
                row.error = f"line {number}: not JSON ({e.msg})"
                yield row
                continue
            if not isinstance(line, dict):
                row.error = f"line {number}: not a JSON object"
                yield row
                continue
            row.custom_id = line.get("custom_id") if isinstance(line.get("custom_id"), str) else None
            unknown = set(line) - {"custom_id", "method", "url", "body"}
            body = line.get("body")
            if row.custom_id is None:
                row.error = f"line {number}: custom_id must be a string"
            elif unknown:
                row.error = f"line {number}: unknown field(s) {sorted(unknown)}"
            elif line.get("method", "POST") != "POST":
                row.error = f"line {number}: method must be POST"
            elif line.get("url") != info.endpoint:
                row.error = f"line {number}: url {line.get('url')!r} differs from the batch's endpoint {info.endpoint!r}"
            elif not isinstance(body, dict):
                row.error = f"line {number}: body must be a JSON object"
            else:
                row.body = {**defaults, **body}
                row.body.setdefault("model", model)
            yield row


def _table_records(info: InputInfo) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, column -> value) of a table, streamed."""
    if info.file_format == "parquet":
        batches = pq.ParquetFile(info.path).iter_batches(batch_size=4096)
    elif info.file_format == "csv":
        batches = pacsv.open_csv(info.path)
    else:
        batches = None
    if batches is not None:
        number = 0
        for batch in batches:
            for record in batch.to_pylist():
                number += 1
                yield number, record
        return
    with open(info.path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                record = {"__error__": f"line {number}: not JSON ({e.msg})"}
            if not isinstance(record, dict):
                record = {"__error__": f"line {number}: not a JSON object"}
            yield number, record


def _table_row(
    index: int, line: int, record: dict[str, Any], kind: str, model: str, defaults: dict[str, Any]
) -> BatchRow:
    row = BatchRow(index, line, kind=kind)
    if "__error__" in record:
        row.error = record["__error__"]
        return row
    text_column = "messages" if kind == "chat" else "prompt"
    row.passthrough = {k: v for k, v in record.items() if k not in SAMPLING_COLUMNS and k not in TEXT_COLUMNS}
    value = record.get(text_column)
    if kind == "chat" and isinstance(value, str):  # messages written as JSON text (CSV cannot hold a list)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            row.error = f"row {line}: messages is not a JSON list"
            return row
    if value is None:
        row.error = f"row {line}: {text_column} is empty"
        return row
    sampling = {k: record[k] for k in SAMPLING_COLUMNS if record.get(k) is not None}
    row.body = {**defaults, **sampling, "model": model, text_column: value}
    return row


# ---- output ---------------------------------------------------------------------------------


@dataclass
class RowResult:
    """What one row produced: its answer and usage, or its error.

    Args:
        index, line, custom_id, passthrough: the row's own (BatchRow).
        status_code: 200, or the HTTP status its error would have had (400, 404, 500).
        body: the OpenAI response body (a completion or chat completion) when it ran.
        error: the error message when it did not.
        text, finish_reason: its first choice's.
        prompt_tokens, cached_tokens, completion_tokens: its usage.
    """

    index: int
    line: int
    custom_id: Optional[str] = None
    passthrough: dict[str, Any] = field(default_factory=dict)
    status_code: int = 200
    body: Optional[dict[str, Any]] = None
    error: Optional[str] = None
    text: Optional[str] = None
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def failed(cls, row: BatchRow, message: str, status_code: int = 400) -> RowResult:
        return cls(row.index, row.line, row.custom_id, row.passthrough, status_code, error=message)


def parquet_shard(results: list[RowResult]) -> bytes:
    """A shard's output table: one row per input row, in input order, passthrough columns first."""
    results = sorted(results, key=lambda r: r.index)
    records = [
        {
            **r.passthrough,
            "row_index": r.index,
            "custom_id": r.custom_id,
            "text": r.text,
            "finish_reason": r.finish_reason,
            "prompt_tokens": r.prompt_tokens,
            "cached_tokens": r.cached_tokens,
            "completion_tokens": r.completion_tokens,
            "error": r.error,
        }
        for r in results
    ]
    schema_fields = [
        ("row_index", pa.int64()), ("custom_id", pa.string()), ("text", pa.string()), ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()), ("cached_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("error", pa.string()),
    ]
    table = pa.Table.from_pylist(records)
    for name, typ in schema_fields:  # fixed types, whatever the first rows held (all-null columns included)
        table = table.set_column(table.schema.get_field_index(name), name, table[name].cast(typ))
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def openai_shard(results: list[RowResult], job_id: str) -> tuple[bytes, bytes]:
    """A shard's OpenAI output lines and error lines, in input order."""
    out, errors = [], []
    for r in sorted(results, key=lambda r: r.index):
        rid = f"batch_req_{job_id}_{r.index}"
        if r.body is not None:
            line = {"id": rid, "custom_id": r.custom_id,
                    "response": {"status_code": 200, "request_id": r.body.get("id"), "body": r.body}, "error": None}
            out.append(json.dumps(line, ensure_ascii=False))
        else:
            line = {"id": rid, "custom_id": r.custom_id,
                    "response": {"status_code": r.status_code, "request_id": None,
                                 "body": {"error": {"message": r.error, "type": "invalid_request_error"}}},
                    "error": {"code": str(r.status_code), "message": r.error, "line": r.line}}
            errors.append(json.dumps(line, ensure_ascii=False))
    return ("\n".join(out) + "\n" if out else "").encode(), ("\n".join(errors) + "\n" if errors else "").encode()
