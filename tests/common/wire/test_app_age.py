"""A site's limits on when the apps it runs were signed (rollback, expiry).

Flower's SuperNode verifies that a trusted key signed a FAB and ignores the
date; ``client.supernode_main`` adds the site's ``apps`` limits to that check.
The real SuperNode refusing a rolled-back release is in
``tests/server/test_control_plane.py::test_signed_app_runs_unsigned_and_resigned_are_refused``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from flwr.supercore.fab import Fab

from client import supernode_main
from client.supernode import supernode_argv
from common.config.site import SiteApps, load_site_config
from common.errors import ConfigError
from common.wire.app_signing import (
    MAX_CLOCK_SKEW_S,
    AppAgePolicy,
    FabSignature,
    check_fab_signature,
    generate_signing_key,
    load_signing_key,
    sign_fab,
)

NOW = 1_800_000_000
DAY = 86400
FAB = b"PK\x03\x04 a fab's bytes"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("app-age")
    files = generate_signing_key(tmp / "coordinator")
    trusted = yaml.safe_load(files.trusted_entities.read_text())
    return load_signing_key(files.private_key), trusted, tmp


def record(*sigs: FabSignature) -> dict[str, str]:
    out = {
        s.public_key_id: json.dumps(
            {"signature": s.signature, "signed_at": s.signed_at}
        )
        for s in sigs
    }
    out["valid_license"] = "Valid"
    return out


def test_the_dates_a_policy_accepts(keys) -> None:  # type: ignore[no-untyped-def]
    key, trusted, _ = keys
    policy = AppAgePolicy(signed_after=NOW - 10 * DAY, max_age_s=30 * DAY)

    def verdict(signed_at: int) -> str | None:
        sig = sign_fab(FAB, key, signed_at=signed_at)
        return check_fab_signature(FAB, record(sig), trusted, policy, now=NOW)

    assert verdict(NOW - 5 * DAY) is None
    assert verdict(NOW + MAX_CLOCK_SKEW_S - 1) is None  # clock skew
    assert "before this site's apps.signed_after" in str(verdict(NOW - 11 * DAY))
    assert "in the future" in str(verdict(NOW + MAX_CLOCK_SKEW_S + 60))
    expiring = AppAgePolicy(max_age_s=30 * DAY)
    old = record(sign_fab(FAB, key, signed_at=NOW - 31 * DAY))
    why = check_fab_signature(FAB, old, trusted, expiring, now=NOW)
    assert why is not None and "31.0 days ago" in why and "max_age_days 30" in why
    assert check_fab_signature(FAB, old, trusted, AppAgePolicy(), now=NOW) is None


def test_a_date_edited_into_the_record_does_not_pass(keys) -> None:  # type: ignore[no-untyped-def]
    key, trusted, _ = keys
    policy = AppAgePolicy(signed_after=NOW - DAY)
    stale = sign_fab(FAB, key, signed_at=NOW - 5 * DAY)
    moved = FabSignature(stale.public_key_id, stale.signature, NOW)  # date edited
    why = check_fab_signature(FAB, record(moved), trusted, policy, now=NOW)
    assert why is not None and "not a valid signature" in why
    # a fresh signature over other bytes does not vouch for this FAB
    fresh_other = sign_fab(FAB + b"x", key, signed_at=NOW)
    assert check_fab_signature(FAB, record(fresh_other), trusted, policy, now=NOW)


def test_hostile_and_untrusted_records_are_skipped(keys) -> None:  # type: ignore[no-untyped-def]
    key, trusted, tmp = keys
    key_id = next(iter(trusted))
    policy = AppAgePolicy(signed_after=NOW - DAY)
    other = load_signing_key(generate_signing_key(tmp / "other").private_key)
    fresh_untrusted = sign_fab(FAB, other, signed_at=NOW)
    for bad in (
        "not json",
        "[1, 2]",
        json.dumps({"signature": "AAAA"}),
        json.dumps({"signature": "!!", "signed_at": NOW}),
        json.dumps({"signature": 3, "signed_at": True}),
        json.dumps({"signature": "AAAA", "signed_at": "yesterday"}),
    ):
        rec = {key_id: bad, **record(fresh_untrusted)}
        why = check_fab_signature(FAB, rec, trusted, policy, now=NOW)
        assert why is not None and "not a valid signature" in why, bad
    assert check_fab_signature(FAB, {}, trusted, policy, now=NOW) == (
        "no signature by a trusted key"
    )
    # one good record among bad ones is enough
    good = sign_fab(FAB, key, signed_at=NOW)
    assert check_fab_signature(FAB, record(good), trusted, policy, now=NOW) is None


def test_the_wrapper_runs_flowers_check_first_then_the_dates(keys) -> None:  # type: ignore[no-untyped-def]
    from flwr.supernode.start_client_internal import _verify_fab

    key, trusted, _ = keys
    check = supernode_main.guarded_check(_verify_fab, AppAgePolicy(max_age_s=DAY))
    fresh = sign_fab(FAB, key)
    stale = sign_fab(FAB, key, signed_at=fresh.signed_at - 2 * DAY)
    assert check(Fab("h", FAB, record(fresh)), trusted)
    assert _verify_fab(Fab("h", FAB, record(stale)), trusted)  # Flower alone: runs
    assert not check(Fab("h", FAB, record(stale)), trusted)
    assert not check(Fab("h", FAB + b"x", record(fresh)), trusted)  # Flower says no


def test_install_wraps_flowers_module_and_fails_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import flwr.supernode.start_client_internal as sci

    original = sci._verify_fab
    monkeypatch.setattr(sci, "_verify_fab", original)  # restored after the test
    supernode_main.install(AppAgePolicy(max_age_s=DAY))
    assert sci._verify_fab is not original
    monkeypatch.delattr(sci, "_verify_fab")
    with pytest.raises(RuntimeError, match="not started"):
        supernode_main.install(AppAgePolicy(max_age_s=DAY))
    assert supernode_main.main(["--apps-max-age-s", "86400", "--", "--x"]) == 1
    assert supernode_main.main(["--apps-max-age-s", "86400"]) == 2


def test_supernode_argv_runs_through_the_wrapper_only_with_limits(
    tmp_path: Path,
) -> None:
    te = tmp_path / "te.yaml"
    plain = supernode_argv("h:1", {}, 9094, trusted_entities=te)
    assert plain == supernode_argv(
        "h:1", {}, 9094, trusted_entities=te, app_policy=AppAgePolicy()
    )
    limited = supernode_argv(
        "h:1",
        {},
        9094,
        trusted_entities=te,
        app_policy=AppAgePolicy(signed_after=NOW, max_age_s=30.0 * DAY),
    )
    cut = limited.index("--")
    assert limited[:cut] == [
        sys.executable,
        "-m",
        "client.supernode_main",
        "--apps-signed-after",
        str(NOW),
        "--apps-max-age-s",
        "2592000.0",
    ]
    assert limited[cut + 1 :] == plain[1:]
    with pytest.raises(ValueError, match="trusted entities"):
        supernode_argv("h:1", {}, 9094, app_policy=AppAgePolicy(max_age_s=DAY))


def test_site_config_apps_section(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        'name: h\napps: {signed_after: "2026-12-01T00:00:00Z", max_age_days: 90}\n'
    )
    apps = load_site_config(site).apps
    assert apps == SiteApps("2026-12-01T00:00:00Z", 90.0)
    assert apps.policy() == AppAgePolicy(1796083200, 90 * 86400.0)
    for bad, field in (
        ("{signed_after: 2026-12-01}", "signed_after"),  # unquoted: a YAML date
        ('{signed_after: "2026-12-01"}', "signed_after"),  # no time zone
        ('{signed_after: "soon"}', "signed_after"),
        ("{max_age_days: 0}", "max_age_days"),
        ("{max_age: 3}", "max_age"),
    ):
        site.write_text(f"name: h\napps: {bad}\n")
        with pytest.raises(ConfigError, match=field):
            load_site_config(site)


def test_client_start_refuses_limits_without_trusted_entities(tmp_path: Path) -> None:
    import argparse

    from client.commands.start import add_arguments, supernode_command

    site = tmp_path / "site.yaml"
    site.write_text(
        f"name: h\nstate_dir: {tmp_path / 'state'}\napps: {{max_age_days: 30}}\n"
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--site-config", str(site), "--insecure"])
    with pytest.raises(ConfigError, match="apps.*--trusted-entities"):
        supernode_command(args)
    te = generate_signing_key(tmp_path / "k").trusted_entities
    args = parser.parse_args(
        ["--site-config", str(site), "--insecure", "--trusted-entities", str(te)]
    )
    cmd = supernode_command(args)
    assert cmd[1:3] == ["-m", "client.supernode_main"] and "--apps-max-age-s" in cmd
