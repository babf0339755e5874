"""A markdown table of `lime-jax plan --json` records in one folder (one JSON per config, named
after it), each over the baseline's (`none.json`): per-device HBM, XLA FLOPs and bytes, and the
compiler's and the roofline step estimates.

  python -m lime_jax.studies.plan_table runs/methods_on_tpu/paper_1p2b
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import NoReturn

COLUMNS = (  # (header, field, scale, digits)
    ("HBM GiB/device", "per_device_bytes", 2**-30, 2),
    ("XLA TFLOPs/device", "xla_flops", 1e-12, 2),
    ("GB accessed/device", "xla_bytes", 1e-9, 1),
    ("compiler step s", "compiler_step_s", 1.0, 4),
    ("roofline s", "roofline_step_s", 1.0, 4),
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
  fields = ("topology", "devices", "cost_method", *(field for _, field, *_ in COLUMNS))
  missing = [field for field in fields if not isinstance(record, dict) or field not in record]
  if missing:
    _fail(f"{path}: not a `lime-jax plan --json` record (no {', '.join(missing)})")
  return record


def table(folder: pathlib.Path) -> str:
  records = {path.stem: _record(path) for path in sorted(folder.glob("*.json"))}
  if BASELINE not in records:
    _fail(f"no {BASELINE}.json in {folder}: the ratios need the baseline")
  base = records.pop(BASELINE)
  lines = ["| config | " + " | ".join(header for header, *_ in COLUMNS) + " |",
           "|---|" + "---:|" * len(COLUMNS)]
  for name, record in [(BASELINE, base), *records.items()]:
    cells = []
    for _, field, scale, digits in COLUMNS:
      cell = f"{record[field] * scale:.{digits}f}"
      if name != BASELINE:
        cell += f" ({record[field] / base[field]:.3f}x)"
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
