"""`python -m blip2_app.healthcheck`: exit 0 when the app on this machine answers /healthz with 200.

The Docker HEALTHCHECK runs this inside the container (stdlib only, a few milliseconds of work);
it asks the app itself on BLIP2_PORT, so a container started with another port stays checkable.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request


def check(port: int, timeout: float = 4.0) -> tuple[bool, str]:
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:  # 503 while the model loads
        return False, error.read().decode(errors="replace")
    except (OSError, ValueError) as error:
        return False, json.dumps({"status": "unreachable", "error": str(error)})


def main() -> int:
    ready, body = check(int(os.environ.get("BLIP2_PORT", "7860")))
    print(body)
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
