"""The fanned-out run's OUT equals the one-task run's, byte for byte, and is complete."""

import json
import sys
from pathlib import Path

fanout, one = (Path(p) for p in sys.argv[1:3])


def outputs(out: Path) -> dict[str, bytes]:
    names = sorted(out.glob("*.tar"))
    names += [out / "dedup-report" / n for n in ("samples.parquet", "clusters.parquet")]
    return {p.name: p.read_bytes() for p in names}


a, b = outputs(fanout), outputs(one)
assert a and a == b, "the fanned-out run differs from the one-task run"
summary = json.loads((fanout / "dedup-report" / "summary.json").read_text())
assert json.loads((fanout / ".dedup" / "job.json").read_text())["complete"]
assert summary["counts"]["removed"] > 0
print(
    f"airflow: dedup_fanout and dedup_one_task gave the same {len(a) - 2} shards; "
    f"removed {summary['counts']['removed']} of {summary['counts']['samples']} samples"
)
