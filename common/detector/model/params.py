"""The one parameter split both sides use: shared (aggregated) vs personal keys.

All functions work on ``model.state_dict()`` keys, parameters and buffers alike
(BatchNorm running statistics and ``num_batches_tracked`` included).
"""

from __future__ import annotations

from torch import nn

from common.detector.model.config import Personalization
from common.detector.model.fcos import norm_keys

__all__ = ["head_keys", "norm_keys", "parameter_groups", "shared_and_personal"]


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """``{"backbone", "neck", "head"} -> state_dict keys`` as the model declares.

    Models without a ``parameter_groups`` method put every key in ``backbone``.
    """
    fn = getattr(model, "parameter_groups", None)
    if callable(fn):
        groups = fn()
        return {str(k): list(v) for k, v in groups.items()}
    return {"backbone": list(model.state_dict()), "neck": [], "head": []}


def head_keys(model: nn.Module) -> list[str]:
    """``state_dict`` keys of the detection head (what FedPer copies per site).

    Under ``personal_head`` the federation code keeps a separate personal copy
    of these tensors on the site; the global head itself stays shared.
    """
    return list(parameter_groups(model)["head"])


#: Suffix of BatchNorm's integer step counter buffers (never shared).
COUNTER_SUFFIX = "num_batches_tracked"


def shared_and_personal(
    model: nn.Module, personalization: Personalization
) -> tuple[list[str], list[str]]:
    """Split ``model.state_dict()`` keys into ``(shared_keys, personal_keys)``.

    * ``local_norm`` (FedBN): every normalization layer's params and buffers are
      personal (head GroupNorms included).
    * ``personal_head`` (FedPer): changes nothing here, because the global head
      is still shared; the personal copy is built from :func:`head_keys`.
    * BatchNorm step counters (``num_batches_tracked``, int64) are always
      personal: they are bookkeeping, not weights, and averaging integer
      counters across sites is meaningless.

    Both lists keep ``state_dict`` order, are disjoint and together cover every
    key exactly once.
    """
    keys = list(model.state_dict())
    personal: set[str] = {k for k in keys if k.endswith(COUNTER_SUFFIX)}
    if personalization.local_norm:
        personal.update(norm_keys(model))
    shared = [k for k in keys if k not in personal]
    personal_list = [k for k in keys if k in personal]
    return shared, personal_list
