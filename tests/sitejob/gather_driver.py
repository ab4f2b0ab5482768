"""Runs one site job's gather as its own process, so tests can SIGKILL it.

gather_driver.py NATS_URL TOKEN_FILE JOB OUTPUT

Prints the report as JSON on stdout; exit status 0 complete, 1 not.
"""

import json
import sys
from pathlib import Path

from sitejob.config import SiteConfig
from sitejob.gather import run_gather


def main() -> int:
    url, token_file, job, output = sys.argv[1:]
    cfg = SiteConfig(
        servers=(url,),
        token_file=Path(token_file),
        credentials=None,
        node_name="gather",
        request_timeout=5.0,
    )
    report = run_gather(cfg, job, Path(output))
    print(json.dumps(report.to_json()))
    return 0 if report.complete else 1


if __name__ == "__main__":
    sys.exit(main())
