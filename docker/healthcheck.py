"""Container health check: exit status 0 when URL answers 200 within 2 s.

    python healthcheck.py [URL]     # default: the gateway's /healthz on REASONREC_PORT

Python rather than curl: the image has Python and no curl.
"""

import os
import sys
import urllib.request

DEFAULT = f"http://127.0.0.1:{os.environ.get('REASONREC_PORT', '8000')}/healthz"
url = sys.argv[1] if len(sys.argv) > 1 else DEFAULT
try:
    with urllib.request.urlopen(url, timeout=2):  # other statuses raise HTTPError
        sys.exit(0)
except OSError as exc:
    print(f"{url}: {exc}", file=sys.stderr)
    sys.exit(1)
