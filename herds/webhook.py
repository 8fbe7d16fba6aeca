"""Tell the team a herd ended: its run summary POSTed as JSON to one configured URL."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

from django.core.serializers.json import DjangoJSONEncoder

log = logging.getLogger("herds")


def post_summary(url: str, summary: dict, timeout: float) -> str:
    """POST the summary; return what happened in words. Never raises for the network."""
    if not url.lower().startswith(("http://", "https://")):
        return f"webhook not sent: {url!r} is not an http(s) URL"
    body = json.dumps(summary, cls=DjangoJSONEncoder).encode()
    request = urllib.request.Request(  # noqa: S310 - http(s) only, checked above
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "hypervisor-herds"},
    )
    try:
        # urllib follows redirects to http(s) (and ftp) only, never to file:.
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return f"webhook delivered (HTTP {response.status})"
    except urllib.error.HTTPError as exc:
        outcome = f"webhook failed: HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        outcome = f"webhook failed: {getattr(exc, 'reason', None) or exc}"
    log.warning("herd %s: %s", summary.get("herd"), outcome)
    return outcome
