"""A run's summary: counts, speed and sharpness, and which manifest rows lack or repeat a row."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import safe_text
from pipeline.restore.ledger import METRICS_SCHEMA


@dataclass
class Summary:
    rows_expected: int
    rows: int
    ok: int
    errors: int
    seconds: float
    images_per_s: float
    mean_lapvar_gain: float | None  # mean of lapvar_out / lapvar_in over ok rows
    mean_tenengrad_gain: float | None
    images_uri: str
    metrics_uri: str
    run_id: str
    skipped: int = 0  # rows restored by an earlier run with the same checkpoint
    max_error_rate: float = 1.0  # of the input's rows; more error rows than this fail the run
    missing_rows: list[int] = field(default_factory=list)
    duplicate_rows: list[int] = field(default_factory=list)
    top_errors: list[tuple[str, int]] = field(default_factory=list)
    report_uri: str | None = None  # the HTML report, when the run wrote one

    @property
    def complete(self) -> bool:
        """Every manifest row has exactly one metrics row."""
        return not self.missing_rows and not self.duplicate_rows and self.rows == self.rows_expected

    @property
    def error_rate(self) -> float:
        """Error rows of this run over the rows of the whole input (skipped ones count too)."""
        return self.errors / max(1, self.rows_expected + self.skipped)

    @property
    def too_many_errors(self) -> bool:
        return self.error_rate > self.max_error_rate

    def render(self) -> str:
        def gain(v: float | None) -> str:
            return "n/a" if v is None else f"x{v:.2f}"

        lines = [
            f"run {self.run_id}: {self.rows}/{self.rows_expected} rows, "
            f"{self.ok} ok, {self.errors} error"
            + (f"; {self.skipped} skipped (already restored)" if self.skipped else ""),
            f"  {self.images_per_s:.2f} images/s ({self.seconds:.1f} s wall)",
            f"  sharpness vs bicubic: laplacian variance {gain(self.mean_lapvar_gain)}, "
            f"tenengrad {gain(self.mean_tenengrad_gain)}",
            f"  images:  {self.images_uri}",
            f"  metrics: {self.metrics_uri}",
        ]
        if self.report_uri:
            lines.append(f"  report:  {self.report_uri}")
        for reason, count in self.top_errors:  # from the input: one line each, no escapes
            lines.append(f"  error x{count}: {safe_text.printable(reason, newlines=False)}")
        if self.missing_rows:
            lines.append(f"  MISSING manifest rows: {self.missing_rows[:20]}")
        if self.duplicate_rows:
            lines.append(f"  DUPLICATED manifest rows: {self.duplicate_rows[:20]}")
        if self.too_many_errors:
            lines.append(f"  TOO MANY ERRORS: {100 * self.error_rate:.0f}% of the input, above "
                         f"limits.max_error_rate ({100 * self.max_error_rate:.0f}%)")
        return "\n".join(lines)


def mean_gain(ok: pa.Table, measure: str) -> float | None:
    """Mean of ``{measure}_out / {measure}_in`` over ``ok`` rows with a positive ``_in``: how many
    times sharper than bicubic, on average."""
    if not ok.num_rows:
        return None
    before = ok[f"{measure}_in"].to_numpy(zero_copy_only=False)
    after = ok[f"{measure}_out"].to_numpy(zero_copy_only=False)
    keep = before > 0
    return float((after[keep] / before[keep]).mean()) if keep.any() else None


# What summarize reads of a run's rows.
SUMMARY_SCHEMA = pa.schema([METRICS_SCHEMA.field(n) for n in (
    "row", "status", "error", "lapvar_in", "lapvar_out", "tenengrad_in", "tenengrad_out")])


def summarize(table: pa.Table, expected_rows: pa.Array | pa.ChunkedArray, seconds: float,
              images_uri: str, metrics_uri: str, run_id: str, skipped: int = 0,
              max_error_rate: float = 1.0) -> Summary:
    """Counts, speed and sharpness of one run, and which manifest rows lack or repeat a row;
    all column-wise, so a run of millions of rows is checked in Arrow's time and memory."""
    ok = table.filter(pc.equal(table["status"], "ok"))
    counts = pc.value_counts(table["row"])
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    missing = expected_rows.filter(pc.invert(pc.is_in(expected_rows, value_set=table["row"])))
    errors = table["error"].filter(pc.not_equal(table["status"], "ok"))
    kinds = pc.value_counts(pc.utf8_trim_whitespace(
        pc.replace_substring_regex(errors, _ERROR_KIND, r"\1"))).to_pylist()
    kinds.sort(key=lambda k: -k["counts"])
    return Summary(
        rows_expected=len(expected_rows), rows=table.num_rows, ok=ok.num_rows,
        errors=table.num_rows - ok.num_rows,
        seconds=seconds, images_per_s=ok.num_rows / seconds if seconds > 0 else 0.0,
        mean_lapvar_gain=mean_gain(ok, "lapvar"), mean_tenengrad_gain=mean_gain(ok, "tenengrad"),
        images_uri=images_uri, metrics_uri=metrics_uri, run_id=run_id, skipped=skipped,
        max_error_rate=max_error_rate,
        missing_rows=sorted(missing.to_pylist()),
        duplicate_rows=sorted(repeated.to_pylist()),
        top_errors=[(k["values"] or "", k["counts"]) for k in kinds[:5]],
    )


def error_kind(error: str) -> str:
    """``stage: kind`` (the first two clauses), so thousands of similar errors read as one."""
    return ":".join(error.split(":")[:2]).strip()


# error_kind as a regular expression, for whole columns.
_ERROR_KIND = r"(?s)^([^:]*(?::[^:]*)?).*$"
