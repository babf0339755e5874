"""A markdown table of `lime-jax plan --json` records in one folder (one JSON per config, named
after it), each over the baseline's (`none.json`): per-device HBM, XLA FLOPs and bytes, and the
compiler's and the roofline step estimates.

  python -m lime_jax.studies.plan_table runs/methods_on_tpu/paper_1p2b
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import NamedTuple, NoReturn


class Column(NamedTuple):
  """One figure of a TPU plan: its header (with the unit), its ratio's name, the plan record's
  field, and how it prints."""

  header: str
  ratio_name: str
  field: str
  scale: float
  spec: str  # a format spec: significant digits (g) where tiny models give small figures

  def format(self, record: dict) -> str:
    return format(record[self.field] * self.scale, self.spec)


# The figures of a TPU plan, as this table and `lime-jax bench --topology` print them.
COLUMNS = (
    Column("HBM GiB/device", "HBM", "per_device_bytes", 2**-30, ".2f"),
    Column("XLA TFLOPs/device", "FLOPs", "xla_flops", 1e-12, "#.4g"),
    Column("GB accessed/device", "bytes", "xla_bytes", 1e-9, ".1f"),
    Column("compiler step s", "compiler step", "compiler_step_s", 1.0, "#.4g"),
    Column("roofline s", "roofline", "roofline_step_s", 1.0, "#.4g"),
)
BASELINE = "none"


def _fail(message: str) -> NoReturn:
  print(f"plan_table: {message}", file=sys.stderr)
  sys.exit(2)


def _record(path: pathlib.Path) -> dict:
  try:
    record = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    _fail(f"{path}: not JSON ({error})")
  record = record[0] if isinstance(record, list) and record else record
  fields = ("topology", "devices", "cost_method", *(column.field for column in COLUMNS))
  missing = [field for field in fields if not isinstance(record, dict) or field not in record]
  if missing:
    _fail(f"{path}: not a `lime-jax plan --json` record (no {', '.join(missing)})")
  return record


def table(folder: pathlib.Path) -> str:
  records = {path.stem: _record(path) for path in sorted(folder.glob("*.json"))}
  if BASELINE not in records:
    _fail(f"no {BASELINE}.json in {folder}: the ratios need the baseline")
  base = records.pop(BASELINE)
  lines = ["| config | " + " | ".join(column.header for column in COLUMNS) + " |",
           "|---|" + "---:|" * len(COLUMNS)]
  for name, record in [(BASELINE, base), *records.items()]:
    cells = []
    for column in COLUMNS:
      cell = column.format(record)
      if name != BASELINE:
        cell += f" ({record[column.field] / base[column.field]:.3f}x)"
      cells.append(cell)
    fits = "" if record.get("fits", True) else " (does not fit)"
    lines.append(f"| {name}{fits} | " + " | ".join(cells) + " |")
  lines.append("")
  lines.append(f"{base['topology']}, {base['devices']} devices, cost {base['cost_method']}; "
               f"ratios over {BASELINE}.")
  return "\n".join(lines)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    _fail("usage: python -m lime_jax.studies.plan_table FOLDER")
  print(table(pathlib.Path(sys.argv[1])))
