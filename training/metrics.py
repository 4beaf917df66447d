"""metrics.jsonl: one JSON line per optimizer step (and per eval), flushed as it is written."""

import json

from quant import write_text_atomic


class MetricsLog:
    """Appends records to `path`; a resumed run first drops the lines past its checkpoint (they
    are about to be redone), and a line a kill cut short goes with them. `enabled=False` (ranks
    other than 0) writes nothing."""

    def __init__(self, path, resumed_at=0, enabled=True):
        self.file = None
        if not enabled:
            return
        if resumed_at and path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resumed_at:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    pass
            write_text_atomic(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a" if resumed_at else "w")

    def write(self, record):
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()


def append_record(path, record):
    """One more line (the run's summary), after the log was closed."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
