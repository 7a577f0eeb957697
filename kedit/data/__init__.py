"""Edit requests, dataset loaders and tokenization."""

from kedit.data.encode import encode, target_ids
from kedit.data.request import EditRequest, Probe, RequestError

__all__ = ["EditRequest", "Probe", "RequestError", "encode", "target_ids", "to_requests"]


def to_requests(records, **kwargs):
    """Plain dicts / EditRequests -> validated EditRequests (see :mod:`kedit.data.loaders`)."""
    from kedit.data.loaders import to_requests as _to_requests

    return _to_requests(records, **kwargs)
