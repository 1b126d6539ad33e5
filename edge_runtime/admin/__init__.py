"""The admin page and the monitoring endpoints, served by the service itself.

For the radiology IT admin: one page that shows the box (status, model and
its conformance on this CPU, each scan as it arrives, the quarantine and what
to do about each file, the DICOM destinations with a C-ECHO button, the
recent log), and for monitoring stacks ``/health/live``, ``/health/ready``,
``/api/status`` and ``/metrics``. It only reads what the service keeps
(:class:`~edge_runtime.admin.facts.BoxFacts`); its two actions (quarantine
retry and discard) are journaled. See docs/admin-page.md.
"""

from .facts import BoxFacts
from .logbuffer import RecentLogs
from .server import AdminServer

__all__ = ["AdminServer", "BoxFacts", "RecentLogs"]
