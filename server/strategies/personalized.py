"""``personalized``: FedBN / FedPer on top of guarded FedAvg.

Sites keep their normalization layers (``local_norm``) and/or head
(``personal_head``) on their own disk and never send them; the server averages
exactly the shared arrays it receives, which validation pins to the global
model's names and shapes. The personalization flags travel in every message's
config so a site running a different split refuses the round loudly.
"""

from __future__ import annotations

from common.errors import ConfigError
from common.wire.federation import FederationConfig
from server.strategies.base import PersonalizedSummary


class PersonalizedFedAvg(PersonalizedSummary):
    """FedAvg over shared arrays only; personal layers stay on the sites."""

    name = "personalized"


def build_personalized(cfg: FederationConfig) -> PersonalizedFedAvg:
    """Factory of ``personalized``; needs local_norm and/or personal_head."""
    pers = cfg.personalization
    if not (pers.local_norm or pers.personal_head):
        raise ConfigError(
            "federation config",
            "personalization",
            "personalized needs local_norm and/or personal_head set to true "
            "(use strategy fedavg otherwise)",
        )
    return PersonalizedFedAvg(cfg)
