"""Edit requests, dataset loaders and tokenization."""

from kedit.data.encode import encode, target_ids
from kedit.data.request import EditRequest, Probe, RequestError
from kedit.data.loaders import LoadReport, load_mquake_cases, load_requests, load_requests_with_report  # noqa: E402

__all__ = ["EditRequest", "LoadReport", "Probe", "RequestError", "encode", "load_mquake_cases", "load_requests",
           "load_requests_with_report", "target_ids", "to_requests"]


def to_requests(records, **kwargs):
    """Plain dicts / EditRequests -> validated EditRequests (see :mod:`kedit.data.loaders`)."""
    from kedit.data.loaders import to_requests as _to_requests

    return _to_requests(records, **kwargs)
