"""``python -m client.supernode_main``: the SuperNode with the site's app-age limits.

Flower's ``flower-supernode --trusted-entities`` runs a FAB when a trusted
key signed it, whenever that was. A site whose config sets ``apps``
(``signed_after``, ``max_age_days``; :class:`common.config.site.SiteApps`)
is started through this module instead: it wraps the SuperNode's FAB check
so that, in addition to Flower's own verification, at least one trusted
signature must be dated within the site's limits
(:func:`common.wire.app_signing.check_fab_signature`). A refused FAB takes
Flower's own path for an unverified one: an error reply, no app code run.

Usage (what :func:`client.supernode.supernode_argv` writes)::

    python -m client.supernode_main [--apps-signed-after UNIX_S]
        [--apps-max-age-s SECONDS] -- <flower-supernode arguments>

Fails closed: if Flower's check cannot be wrapped (another Flower version),
the SuperNode is not started.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from common.wire.app_signing import AppAgePolicy, check_fab_signature

log = logging.getLogger(__name__)

#: Flower 1.42's FAB check, looked up at call time in this module.
FLOWER_MODULE = "flwr.supernode.start_client_internal"
FLOWER_CHECK = "_verify_fab"


def guarded_check(
    flower_check: Callable[[Any, dict[str, str]], bool], policy: AppAgePolicy
) -> Callable[[Any, dict[str, str]], bool]:
    """Flower's ``_verify_fab(fab, trusted)``, then the site's age limits."""

    def check(fab: Any, trusted_entities: dict[str, str]) -> bool:
        if not flower_check(fab, trusted_entities):
            return False
        why = check_fab_signature(
            fab.content, fab.verifications, trusted_entities, policy
        )
        if why is not None:
            log.error("app refused by this site's apps limits: %s", why)
            return False
        return True

    return check


def install(policy: AppAgePolicy) -> None:
    """Wrap Flower's FAB check with ``policy``; raises ``RuntimeError`` if absent."""
    import importlib

    module = importlib.import_module(FLOWER_MODULE)
    original = getattr(module, FLOWER_CHECK, None)
    if not callable(original):
        raise RuntimeError(
            f"{FLOWER_MODULE}.{FLOWER_CHECK} not found (Flower version?): the "
            "site's apps limits cannot be enforced, so the SuperNode is not started"
        )
    setattr(module, FLOWER_CHECK, guarded_check(original, policy))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the limits, wrap the check, run ``flower-supernode`` in-process."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        print("usage: python -m client.supernode_main [limits] -- <flower args>")
        return 2
    cut = args.index("--")
    parser = argparse.ArgumentParser(prog="client.supernode_main")
    parser.add_argument("--apps-signed-after", type=int)
    parser.add_argument("--apps-max-age-s", type=float)
    ours = parser.parse_args(args[:cut])
    policy = AppAgePolicy(ours.apps_signed_after, ours.apps_max_age_s)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        install(policy)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log.info(
        "apps must be signed after %s and at most %s s ago",
        policy.signed_after,
        policy.max_age_s,
    )
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args[cut + 1 :]]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
