"""Last check before a reply leaves the site: only declared arrays and metrics.

:func:`check_reply` refuses (raises :class:`PrivacyGuardError`) any reply whose
content is not exactly

* at most one ArrayRecord whose names and shapes equal the trainer's declared
  shared spec (floating point values only), and
* one MetricRecord whose names are among the trainer's declared metric names
  (``num-examples`` always present; a metric undefined on this site may be
  absent, never NaN), all in :data:`common.wire.federation.METRIC_WHITELIST`, each a
  finite scalar number in its range (:data:`common.wire.federation.METRIC_RANGES`;
  the server applies the same rule, :func:`common.wire.federation.metric_fault`).

No ConfigRecord, no strings, no bytes, no extra records: pixel data, file paths
and patient identifiers have nowhere to go.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from common.errors import MammofedError
from common.keys import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES
from common.wire.federation import metric_fault


class PrivacyGuardError(MammofedError):
    """A reply that would carry something not declared; nothing is sent."""


def check_reply(
    content: RecordDict,
    *,
    site: str,
    shared_spec: Mapping[str, tuple[int, ...]] | None,
    metric_names: Sequence[str],
) -> None:
    """Raise :class:`PrivacyGuardError` unless ``content`` holds only what is declared.

    ``shared_spec=None`` means the reply must carry no arrays (evaluate).
    """
    allowed = {METRICS_KEY} | ({ARRAYS_KEY} if shared_spec is not None else set())
    extra = sorted(set(content.keys()) - allowed)
    if extra:
        raise PrivacyGuardError(f"site {site}: reply has undeclared records {extra}")
    if len(content.config_records) != 0:
        raise PrivacyGuardError(f"site {site}: reply carries a ConfigRecord")
    if shared_spec is not None:
        record = content.get(ARRAYS_KEY)
        if not isinstance(record, ArrayRecord):
            raise PrivacyGuardError(f"site {site}: reply lacks its ArrayRecord")
        _check_arrays(record, shared_spec, site)
    metrics = content.get(METRICS_KEY)
    if not isinstance(metrics, MetricRecord):
        raise PrivacyGuardError(f"site {site}: reply lacks its MetricRecord")
    _check_metrics(metrics, metric_names, site)


def _check_arrays(
    record: ArrayRecord, spec: Mapping[str, tuple[int, ...]], site: str
) -> None:
    names, declared = set(record.keys()), set(spec)
    if names != declared:
        raise PrivacyGuardError(
            f"site {site}: arrays differ from the declared shared spec: "
            f"undeclared {sorted(names - declared)}, missing {sorted(declared - names)}"
        )
    for name, arr in record.items():
        shape = tuple(int(d) for d in arr.shape)
        if shape != tuple(spec[name]):
            raise PrivacyGuardError(
                f"site {site}: array {name!r} has shape {shape}, declared {spec[name]}"
            )
        if not np.issubdtype(np.dtype(arr.dtype), np.floating):
            raise PrivacyGuardError(
                f"site {site}: array {name!r} has dtype {arr.dtype}, expected float"
            )


def _check_metrics(record: MetricRecord, names: Sequence[str], site: str) -> None:
    got, declared = set(record.keys()), set(names)
    if not got <= declared:
        raise PrivacyGuardError(
            f"site {site}: metrics {sorted(got - declared)} are not declared "
            f"({sorted(declared)})"
        )
    if NUM_EXAMPLES in declared and NUM_EXAMPLES not in got:
        raise PrivacyGuardError(f"site {site}: metric {NUM_EXAMPLES!r} is missing")
    for name, value in record.items():
        why = metric_fault(name, value)
        if why is not None:
            raise PrivacyGuardError(f"site {site}: {why}")
