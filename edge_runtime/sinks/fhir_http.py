"""The FHIR sink: each result's FHIR transaction Bundle, POSTed to the hospital's FHIR server.

The Bundle (DiagnosticReport, Observations, Device; no patient identifiers)
was written beside the SR before the result was committed, and its entries
are ``PUT`` requests with ids derived from the result's ``message_id``: a
resend after an outage or a crash updates the same resources instead of
creating new ones, which is what makes the server see each result once. A
2xx reply is the confirmation; anything else is a
:class:`~edge_runtime.errors.PublishError` naming the HTTP status and the
server's OperationOutcome, retried by the drainer with back-off.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

from ..config import RuntimeConfig, read_secret_file
from ..errors import ConfigError, PublishError
from ..journal import Delivery, OutboxMessage
from ..results import ScanResult
from .base import Acknowledge, BoxState

__all__ = ["FhirHttpSink", "from_config"]

log = logging.getLogger(__name__)

_FHIR_JSON = "application/fhir+json"
#: One request's limit; a slower server is retried later like an unreachable one.
REQUEST_TIMEOUT_S = 30.0


def from_config(config: RuntimeConfig, ipc: Any = None, state: BoxState | None = None) -> FhirHttpSink | None:
    return FhirHttpSink(config) if config.reports.fhir_endpoint else None


def _outcome_text(body: bytes) -> str:
    """The first issue's diagnostics of an OperationOutcome, or the body's start."""
    try:
        outcome = json.loads(body)
        issues = outcome.get("issue") or []
        if issues:
            first = issues[0]
            return str(first.get("diagnostics") or first.get("details", {}).get("text") or first)[:300]
    except (ValueError, AttributeError):
        pass
    return body[:300].decode("utf-8", "replace")


class FhirHttpSink:
    """POST of the result's transaction Bundle to ``Reports.FhirEndpoint``."""

    name = "fhir-http"
    label = "FHIR server"
    primary = False

    def __init__(self, config: RuntimeConfig) -> None:
        self._config = config

    def delivery(self, config: RuntimeConfig, result: ScanResult) -> Delivery | None:
        self._config = config
        reports = result.reports
        if not config.reports.fhir_endpoint or reports is None or reports.fhir is None:
            return None
        bundle = (config.reports_path / reports.folder / reports.fhir).read_text(encoding="utf-8")
        return Delivery(self.name, config.reports.fhir_endpoint, bundle, 1)

    def start(self, acknowledge: Acknowledge) -> None:
        """Nothing to connect: one request per result."""

    def ready(self) -> bool:
        return True

    def _token(self) -> str | None:
        path = self._config.reports.fhir_token_file
        if path is None:
            return None
        return read_secret_file(path, "FHIR bearer token", "Reports.FhirTokenFile").strip()

    def send(self, message: OutboxMessage) -> None:
        headers = {"Content-Type": _FHIR_JSON, "Accept": _FHIR_JSON}
        try:
            token = self._token()
        except ConfigError as exc:
            raise PublishError(exc.message, action=exc.action) from exc
        if token:
            headers["Authorization"] = f"Bearer {token}"
        url = message.topic.rstrip("/")
        request = urllib.request.Request(url, data=message.payload.encode(), headers=headers, method="POST")  # noqa: S310  # the admin's configured https/http endpoint
        timeout = REQUEST_TIMEOUT_S
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310
                reply.read()
        except urllib.error.HTTPError as exc:
            raise PublishError(
                f"FHIR server {url} answered {exc.code} {exc.reason}: {_outcome_text(exc.read())}",
                action="Read the server's OperationOutcome above; 401/403: check Reports.FhirTokenFile; "
                "reports are kept and sent again.",
            ) from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise PublishError(
                f"FHIR server {url} could not be reached ({reason})",
                action="Check Reports.FhirEndpoint and the network; reports are kept and sent once "
                "it is back.",
            ) from exc

    def stop(self, timeout_s: float) -> None:
        """Nothing held open between results."""
