"""Server optimizer steps on aggregated arrays (numpy only, no Flower).

``x_t`` is the global model a round was sent, ``avg_t`` the guarded FedAvg of
the round's valid updates, and ``d_t = avg_t - x_t`` the pseudo-gradient:

* ``fedavgm`` (:class:`Momentum`, Hsu et al. 2019):
  ``m_t = server_momentum * m_{t-1} + (avg_t - x_t)`` (``m_0 = 0``),
  ``x_{t+1} = x_t + server_learning_rate * m_t``. Momentum 0 and rate 1 return
  the FedAvg arrays themselves (bit for bit), as Flower's ``FedAvgM`` does.
* ``fedadam`` (:class:`Adam`, Reddi et al. 2021), Flower's ``FedAdam`` step
  and bias handling: ``d_t = avg_t - x_t``, ``m_t = beta_1 m_{t-1} + (1 -
  beta_1) d_t``, ``v_t = beta_2 v_{t-1} + (1 - beta_2) d_t^2`` (zeros at
  first), ``eta_t = eta * sqrt(1 - beta_2^(r+1)) / (1 - beta_1^(r+1))`` with
  ``r`` the server round, ``x_{t+1} = x_t + eta_t m_t / (sqrt(v_t) + tau)``.

Only floating-point weights take the step (computed in float64, stored in the
global array's dtype); integer arrays and normalization running statistics
(``*.running_mean``, ``*.running_var``: activation statistics, which Adam's
per-coordinate step of about ``eta`` would leave far behind the sites' values,
and momentum could push below zero) keep the FedAvg result.

The state (``m``; ``m`` and ``v``) is a flat dict of arrays named
``"<slot>/<array name>"``, stored in each array's dtype, so that
:class:`server.strategies.serveropt.ServerOptFedAvg` can save and reload it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = [
    "STATISTIC_SUFFIXES",
    "Adam",
    "Momentum",
    "ServerOptimizer",
    "takes_step",
]

Arrays = dict[str, np.ndarray]

#: Suffixes of normalization running statistics (torch ``BatchNorm`` buffers):
#: estimates of activation statistics, not trained weights; they keep FedAvg's
#: value, since a server step would lag them (Adam) or push a variance below 0.
STATISTIC_SUFFIXES: tuple[str, ...] = ("running_mean", "running_var")


def _floating(a: np.ndarray) -> bool:
    return bool(np.issubdtype(a.dtype, np.floating))


def takes_step(name: str, array: np.ndarray) -> bool:
    """Whether global array ``name`` gets the server step (else: FedAvg's value).

    Floating-point weights do; integer arrays and normalization running
    statistics (:data:`STATISTIC_SUFFIXES`) do not.
    """
    return _floating(array) and not name.endswith(STATISTIC_SUFFIXES)


class ServerOptimizer:
    """A server step ``x_{t+1} = f(x_t, avg_t)`` with named state arrays.

    Subclasses set :attr:`slots` (the state's prefixes) and implement
    :meth:`_update`. The state holds one array per slot and global array that
    :func:`takes_step`, named ``"<slot>/<array name>"``.
    """

    #: state prefixes, e.g. ``("m",)``
    slots: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._state: Arrays = {}

    def step(
        self,
        current: Mapping[str, np.ndarray],
        averaged: Mapping[str, np.ndarray],
        server_round: int,
    ) -> Arrays:
        """The new global arrays from ``current`` (x_t) and ``averaged`` (FedAvg).

        ``averaged`` must hold exactly ``current``'s names and shapes (the
        validated shared arrays); a mismatch raises ``ValueError`` naming the
        array. Arrays that do not :func:`takes_step` pass through from
        ``averaged``.
        """
        if set(averaged) != set(current):
            raise ValueError(
                f"server optimizer: aggregated arrays {sorted(averaged)} differ "
                f"from the global model's {sorted(current)}"
            )
        out: Arrays = {}
        for name, avg in averaged.items():
            x = current[name]
            if tuple(avg.shape) != tuple(x.shape):
                raise ValueError(
                    f"server optimizer: array {name!r} has shape {avg.shape}, "
                    f"the global model {x.shape}"
                )
            if not takes_step(name, x):
                out[name] = avg
                continue
            x64 = x.astype(np.float64)
            delta = avg.astype(np.float64) - x64
            new = x64 + self._update(name, delta, server_round, x.dtype)
            out[name] = new.astype(x.dtype)
        return out

    def _update(
        self, name: str, delta: np.ndarray, server_round: int, dtype: np.dtype
    ) -> np.ndarray:
        """``x_{t+1} - x_t`` (float64) of array ``name``; updates the state."""
        raise NotImplementedError

    def _slot(self, slot: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Slot ``slot`` of array ``name`` in float64 (zeros before any step)."""
        key = f"{slot}/{name}"
        if key in self._state:
            return self._state[key].astype(np.float64)
        return np.zeros(shape, dtype=np.float64)

    def _keep(self, slot: str, name: str, value: np.ndarray, dtype: np.dtype) -> None:
        self._state[f"{slot}/{name}"] = value.astype(dtype)

    # --- state ------------------------------------------------------------------
    def state(self) -> Arrays:
        """A copy of the state arrays (empty before the first step)."""
        return {k: v.copy() for k, v in self._state.items()}

    def load_state(
        self, state: Mapping[str, np.ndarray], global_arrays: Mapping[str, np.ndarray]
    ) -> None:
        """Replace the state; every name must be ``slot/<stepped global array>``.

        Raises ``ValueError`` naming the first state array that does not fit
        ``global_arrays`` (unknown slot or array, other shape).
        """
        for key, value in state.items():
            slot, _, name = key.partition("/")
            ref = global_arrays.get(name)
            if slot not in self.slots or ref is None or not takes_step(name, ref):
                raise ValueError(
                    f"state array {key!r} is not one of {list(self.slots)} of a "
                    "global array that takes the server step"
                )
            if tuple(value.shape) != tuple(ref.shape):
                raise ValueError(
                    f"state array {key!r} has shape {value.shape}, the global "
                    f"array {ref.shape}"
                )
        self._state = {k: np.array(v) for k, v in state.items()}

    @property
    def identity(self) -> bool:
        """Whether every step returns the FedAvg arrays unchanged."""
        return False

    @property
    def stateful(self) -> bool:
        """Whether a step depends on earlier rounds (state to persist)."""
        return bool(self.slots)

    def describe(self) -> str:
        """One line of settings for the log."""
        raise NotImplementedError


class Momentum(ServerOptimizer):
    """Server SGD with heavy-ball momentum (FedAvgM)."""

    slots = ("m",)

    def __init__(self, learning_rate: float, momentum: float) -> None:
        super().__init__()
        self.learning_rate = float(learning_rate)
        self.momentum = float(momentum)

    @property
    def identity(self) -> bool:
        """Momentum 0 and learning rate 1: plain FedAvg."""
        return self.momentum == 0.0 and self.learning_rate == 1.0

    @property
    def stateful(self) -> bool:
        """Only with momentum."""
        return self.momentum != 0.0

    def step(
        self,
        current: Mapping[str, np.ndarray],
        averaged: Mapping[str, np.ndarray],
        server_round: int,
    ) -> Arrays:
        """FedAvg's arrays unchanged when :attr:`identity`, else the momentum step."""
        if self.identity:
            return dict(averaged)
        return super().step(current, averaged, server_round)

    def _update(
        self, name: str, delta: np.ndarray, server_round: int, dtype: np.dtype
    ) -> np.ndarray:
        if self.momentum == 0.0:
            return self.learning_rate * delta
        m = self.momentum * self._slot("m", name, delta.shape) + delta
        self._keep("m", name, m, dtype)
        return self.learning_rate * m

    def describe(self) -> str:
        """Learning rate and momentum."""
        return (
            f"server_learning_rate={self.learning_rate:g}, "
            f"server_momentum={self.momentum:g}"
        )


class Adam(ServerOptimizer):
    """Server Adam (FedAdam) with Flower's bias correction and ``tau``."""

    slots = ("m", "v")

    def __init__(self, eta: float, beta_1: float, beta_2: float, tau: float) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau: must be > 0, got {tau!r}")
        self.eta = float(eta)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.tau = float(tau)

    def step_size(self, server_round: int) -> float:
        """``eta_t``: Flower's bias-corrected step size of ``server_round``."""
        t = server_round + 1.0
        return self.eta * math.sqrt(1.0 - self.beta_2**t) / (1.0 - self.beta_1**t)

    def _update(
        self, name: str, delta: np.ndarray, server_round: int, dtype: np.dtype
    ) -> np.ndarray:
        m = self.beta_1 * self._slot("m", name, delta.shape) + (1 - self.beta_1) * delta
        v = self.beta_2 * self._slot("v", name, delta.shape) + (1 - self.beta_2) * (
            delta * delta
        )
        self._keep("m", name, m, dtype)
        self._keep("v", name, v, dtype)
        return self.step_size(server_round) * m / (np.sqrt(v) + self.tau)

    def describe(self) -> str:
        """eta, betas and tau."""
        return (
            f"eta={self.eta:g}, beta_1={self.beta_1:g}, beta_2={self.beta_2:g}, "
            f"tau={self.tau:g}"
        )
