"""A site's own model: composing, saving and locating its personal state.

The global model is only the SHARED arrays the server aggregates; a site's own
model is those arrays plus what never leaves the site. :class:`SiteModel` owns
that composition rule and the files that hold the personal part, under
``<state_dir>/<site>/`` (written through :class:`client.state.SiteState`, so a
round's files stay pending until the server keeps the round)::

    personal.npz        FedBN norm layers (+ BatchNorm counters) under their
                        model keys; the FedPer head under
                        ``PERSONAL_HEAD_PREFIX + key``
    teacher.pt          the mean teacher of semi-supervised training
    standardizer.json   the fitted histogram-landmark standardizer
    dp_accountant.json  the DP-SGD accountant (``common.detector.dp``)
    base.npz, selection.json, selection-<candidate>.npz
                        the site's choice of its own model on its validation
                        women (``trainer.options.select``; ``client.selection``)

Training (``client.detector_trainer``), evaluation and
``mammofed-client export`` compose a site's model with the same call.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client.state import SiteState
from common.detector.model import Personalization, head_keys, shared_and_personal
from common.errors import CheckpointMismatch, ConfigError
from common.wire.federation import WIRE_FLOATS, array_fault

log = logging.getLogger(__name__)

#: Prefix of the personal head's arrays in ``personal.npz``.
PERSONAL_HEAD_PREFIX = "personal-head/"
TEACHER_FILE = "teacher.pt"
STANDARDIZER_FILE = "standardizer.json"


def check_shapes(
    arrays: Mapping[str, np.ndarray],
    names: Mapping[str, str],
    sd: Mapping[str, torch.Tensor],
    source: Path | str,
    what: str,
) -> None:
    """``names`` maps array name in ``arrays`` -> model key; shapes must agree.

    Raises:
        CheckpointMismatch: naming ``source``, the array and both shapes.
    """
    for name, key in names.items():
        have = tuple(np.shape(arrays[name]))
        want = tuple(sd[key].shape)
        if have != want:
            raise CheckpointMismatch(
                f"{source}: array {name!r} has shape {have} but the model "
                f"built from {what} needs {want}"
            )


class SiteModel:
    """A detector and the personal state of one site (or of none: the global model).

    Args:
        model: the detector the arrays are loaded into (kept, modified in place).
        personalization: which tensors are personal (FedBN, FedPer).
        state: the site's state folder; ``None`` composes the global model.
    """

    def __init__(
        self,
        model: nn.Module,
        personalization: Personalization,
        state: SiteState | None = None,
    ) -> None:
        self.model = model
        self.personalization = personalization
        self.state = state
        self.shared_keys, self.personal_keys = shared_and_personal(
            model, personalization
        )
        self.head_keys = head_keys(model)
        #: the initial model's personal arrays (server-sent): used where the
        #: site has no personal copy yet
        self.defaults: dict[str, np.ndarray] = {}

    # --- locating ---------------------------------------------------------------
    def _dir(self) -> Path:
        if self.state is None:
            raise ValueError("the global model has no site state folder")
        return self.state.dir

    @property
    def teacher_path(self) -> Path:
        """The committed mean teacher."""
        return self._dir() / TEACHER_FILE

    def teacher_write_path(self) -> Path:
        """Where this round's teacher goes (pending while a round is)."""
        assert self.state is not None
        return self.state.write_path(TEACHER_FILE)

    @property
    def standardizer_path(self) -> Path:
        """The site's fitted intensity standardizer."""
        return self._dir() / STANDARDIZER_FILE

    @property
    def accountant_dir(self) -> Path:
        """The DP accountant's folder (``common.detector.dp.DP_ACCOUNTANT_JSON``)."""
        return self._dir()

    # --- reading ----------------------------------------------------------------
    def personal(self) -> dict[str, np.ndarray] | None:
        """The committed personal arrays; ``None``: none, or another model's.

        ``None`` also without a site or before the first save. A site keeps
        its personal layers across runs; a later run may build another model
        (other ``arch`` or widths). Arrays whose shapes do not fit this model
        are then not used (logged, naming the first): the
        run starts from the global arrays and the server's defaults, and its
        first committed round replaces them.
        """
        if self.state is None:
            return None
        arrays = self.state.load_personal()
        if not arrays:
            return arrays
        sd = self.model.state_dict()
        names = {n: n.removeprefix(PERSONAL_HEAD_PREFIX) for n in arrays}
        try:
            check_shapes(
                arrays,
                {n: k for n, k in names.items() if k in sd},
                sd,
                self.state.personal_path,
                "this run's trainer options",
            )
        except CheckpointMismatch as exc:
            log.warning(
                "personal arrays of another model, not used (this run's model "
                "starts from the global and default arrays): %s",
                exc,
            )
            return None
        return arrays

    def check_shared(
        self, arrays: Mapping[str, np.ndarray], source: Path, what: str
    ) -> None:
        """Global ``arrays`` (from ``source``) must be exactly this model's shared ones.

        Raises:
            CheckpointMismatch: an unknown array, a missing shared one, or a
                shape that differs; ``what`` names the model's config.
        """
        sd = self.model.state_dict()
        unknown = sorted(set(arrays) - set(sd))
        if unknown:
            raise CheckpointMismatch(
                f"{source}: array {unknown[0]!r} is not a tensor of the model "
                f"built from {what} ({len(unknown)} such)"
            )
        missing = [k for k in self.shared_keys if k not in arrays]
        if missing:
            raise CheckpointMismatch(
                f"{source}: lacks {len(missing)} shared arrays the model built "
                f"from {what} needs, e.g. {missing[:3]}"
            )
        check_shapes(arrays, {k: k for k in arrays}, sd, source, what)

    def check_personal(
        self, personal: Mapping[str, np.ndarray], *, head: bool, what: str
    ) -> bool:
        """Check stored ``personal`` arrays; return whether a personal head is there.

        Under FedBN every personal norm array must be present; a personal head
        must be complete when any of it is (``head``: whether it is wanted).
        Raises :class:`CheckpointMismatch` naming ``personal.npz`` and the array.
        """
        assert self.state is not None
        src, sd = self.state.personal_path, self.model.state_dict()
        if self.personalization.local_norm:
            lacking = [k for k in self.personal_keys if k not in personal]
            if lacking:
                raise CheckpointMismatch(
                    f"{src}: lacks {len(lacking)} personal norm arrays the FedBN "
                    f"model needs, e.g. {lacking[:3]}"
                )
        own = {k: k for k in self.personal_keys if k in personal}
        check_shapes(personal, own, sd, src, what)
        if not head:
            return False
        have = [k for k in self.head_keys if PERSONAL_HEAD_PREFIX + k in personal]
        if have and len(have) != len(self.head_keys):
            lacking = [
                PERSONAL_HEAD_PREFIX + k for k in self.head_keys if k not in have
            ]
            raise CheckpointMismatch(
                f"{src}: personal head incomplete, lacks {lacking[:3]} "
                f"({len(lacking)} in all)"
            )
        names = {PERSONAL_HEAD_PREFIX + k: k for k in have}
        check_shapes(personal, names, sd, src, what)
        return bool(have)

    def set_defaults(self, arrays: Mapping[str, np.ndarray], source: str) -> None:
        """Keep the server's personal defaults (the initial model's norm layers).

        Only this model's float personal tensors, of their shapes and finite,
        are accepted; anything else raises :class:`ConfigError` naming
        ``source``, the array and the value, and nothing is kept.
        """
        sd = self.model.state_dict()
        allowed = {k for k in self.personal_keys if sd[k].is_floating_point()}
        for name, value in arrays.items():
            if name not in allowed:
                why = f"{name!r} is not a personal norm array of this model"
                raise ConfigError(source, "personal defaults", why)
            shape = tuple(sd[name].shape)
            fault = array_fault(name, np.asarray(value), shape, WIRE_FLOATS)
            if fault is not None:
                raise ConfigError(source, "personal defaults", fault[1])
        self.defaults = {k: np.asarray(v) for k, v in arrays.items()}

    # --- composing --------------------------------------------------------------
    def compose(
        self,
        shared: Mapping[str, Any],
        *,
        personal_head: bool | None = None,
        personal: Mapping[str, np.ndarray] | None = None,
    ) -> nn.Module:
        """Load global ``shared`` + the site's personal arrays; returns the model.

        The one composition rule of a site's own model (training, evaluation
        and export): every personal key found in ``personal`` (default: the
        committed arrays; FedBN norm layers, BatchNorm counters) replaces the
        global value, and with ``personal_head`` (default: when the run has
        one) every head key whose personal copy ``PERSONAL_HEAD_PREFIX + key``
        is in ``personal`` replaces the global head tensor (FedPer). Keys
        missing from both keep the model's current values; names the model
        does not have are ignored. Values are cast to the model's dtypes.
        """
        if personal_head is None:
            personal_head = self.personalization.personal_head
        own = (self.personal() if personal is None else personal) or {}
        sd = self.model.state_dict()
        shared = {**self.defaults, **shared}
        new = {k: torch.as_tensor(np.asarray(v)) for k, v in shared.items()}
        for k in self.personal_keys:
            if k in own:
                new[k] = torch.as_tensor(own[k])
        for k in self.head_keys if personal_head else ():
            if PERSONAL_HEAD_PREFIX + k in own:
                new[k] = torch.as_tensor(own[PERSONAL_HEAD_PREFIX + k])
        sd.update({k: v.to(sd[k].dtype) for k, v in new.items() if k in sd})
        self.model.load_state_dict(sd)
        return self.model

    def load_arrays(
        self,
        arrays: Mapping[str, np.ndarray],
        source: Path | str,
        *,
        complete: bool = False,
    ) -> nn.Module:
        """Load named model tensors from ``source`` as they are; returns the model.

        Every name must be a tensor of the model, of its shape; with
        ``complete`` every tensor of the model must be there. Values are cast
        to the model's dtypes; tensors not named keep their values.

        Raises:
            CheckpointMismatch: naming ``source`` and the array.
        """
        sd = self.model.state_dict()
        unknown = sorted(set(arrays) - set(sd))
        if unknown:
            raise CheckpointMismatch(
                f"{source}: array {unknown[0]!r} is not a tensor of this model "
                f"({len(unknown)} such)"
            )
        if complete:
            missing = [k for k in sd if k not in arrays]
            if missing:
                raise CheckpointMismatch(
                    f"{source}: lacks {len(missing)} tensors of the model, e.g. "
                    f"{missing[:3]}"
                )
        check_shapes(arrays, {k: k for k in arrays}, sd, source, "its config")
        for k, v in arrays.items():
            sd[k] = torch.as_tensor(np.asarray(v)).to(sd[k].dtype)
        self.model.load_state_dict(sd)
        return self.model

    def load_head(self, head: Mapping[str, np.ndarray]) -> nn.Module:
        """Swap in a head (``PERSONAL_HEAD_PREFIX`` keys); nothing else changes.

        Head keys absent from ``head`` keep the model's current values; names
        that are not this model's head keys are ignored. Unlike :meth:`compose`
        this never applies the server's personal defaults, so the norm layers a
        round has just trained stay as they are.
        """
        sd = self.model.state_dict()
        for k in self.head_keys:
            v = head.get(PERSONAL_HEAD_PREFIX + k)
            if v is not None:
                sd[k] = torch.as_tensor(np.asarray(v)).to(sd[k].dtype)
        self.model.load_state_dict(sd)
        return self.model

    # --- saving -----------------------------------------------------------------
    def save_personal(self, head: Mapping[str, np.ndarray] | None) -> None:
        """Store the model's personal tensors and ``head`` (pending during a round).

        ``head``: personal head arrays (``PERSONAL_HEAD_PREFIX`` keys); ``None``
        keeps the stored ones.
        """
        assert self.state is not None
        sd = self.model.state_dict()
        arrays = {k: sd[k].detach().cpu().numpy() for k in self.personal_keys}
        if head is None:
            old = self.state.load_personal() or {}
            head = {k: v for k, v in old.items() if k.startswith(PERSONAL_HEAD_PREFIX)}
        arrays.update(head)
        if arrays:
            self.state.save_personal(arrays)
