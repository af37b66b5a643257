"""A privacy-loss-distribution (PLD) accountant in Opacus's registry, from Google's ``dp-accounting``.

:class:`PLDAccountant` is an ``opacus.accountants.IAccountant`` like Opacus's RDP and PRV
accountants: a history of ``(noise_multiplier z, sample_rate q, steps)`` and
``get_epsilon(delta)``. The ε comes from ``dp_accounting.pld.PLDAccountant`` composing, for
each history entry, ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), steps)``
under add-or-remove-one neighbouring (the relation Opacus's accountants use). Its
discretisation is *pessimistic*: the ε is an upper bound on the true ε of the mechanism, like
RDP's and PRV's, only tighter. Importing this module registers the accountant as ``"pld"`` with
``opacus.accountants.register_accountant``, so ``create_accountant("pld")`` and Opacus's
``get_noise_multiplier(..., accountant="pld")`` use it. ``dp_accounting`` itself is imported on
first use (``pip install dp-accounting``; a dependency of this project).
"""
from __future__ import annotations

from opacus.accountants import IAccountant, register_accountant
from opacus.accountants.registry import _ACCOUNTANTS

__all__ = ["MECHANISM", "PLDAccountant"]

MECHANISM = "pld"


class PLDAccountant(IAccountant):
    """Opacus accountant interface over ``dp_accounting.pld.PLDAccountant`` (see the module docstring).

    ``VALUE_DISCRETIZATION_INTERVAL`` is the grid of the privacy-loss values: 1e-3 gives the
    ε of 1e-4 (dp-accounting's default) to within about 1e-3 at a tenth of the time (about
    0.05 s for 190 steps at q = 0.5), which keeps calibration's binary search fast. Both are
    pessimistic (upper) estimates.
    """

    VALUE_DISCRETIZATION_INTERVAL = 1e-3

    def __init__(self):
        super().__init__()

    def step(self, *, noise_multiplier: float, sample_rate: float):
        """One more step; consecutive steps with the same (z, q) share one history entry."""
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            z, q, steps = self.history.pop()
            self.history.append((z, q, steps + 1))
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    def get_epsilon(self, delta: float, *, value_discretization_interval: float | None = None, **kwargs) -> float:
        """ε at ``delta`` after every step in the history (0.0 for none; ``inf`` when some z is 0)."""
        try:
            import dp_accounting
            from dp_accounting.pld import PLDAccountant as GooglePLDAccountant
        except ModuleNotFoundError as err:  # a dependency of the project: only a broken install lacks it
            raise ModuleNotFoundError(f"accountant 'pld' needs Google's dp-accounting ({err}): "
                                      "pip install dp-accounting") from err
        if not self.history:
            return 0.0
        accountant = GooglePLDAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
            value_discretization_interval=value_discretization_interval or self.VALUE_DISCRETIZATION_INTERVAL)
        for noise_multiplier, sample_rate, steps in self.history:
            gaussian = dp_accounting.GaussianDpEvent(float(noise_multiplier))
            accountant.compose(dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(float(sample_rate), gaussian), int(steps)))
        return float(accountant.get_epsilon(float(delta)))

    def __len__(self) -> int:
        return len(self.history)

    @classmethod
    def mechanism(cls) -> str:
        return MECHANISM


def _register() -> None:
    """Register as ``"pld"`` unless another PLD accountant already holds the name.

    Re-importing this module (a reload) replaces its own earlier class; an accountant that some
    other package registered as "pld" is left in place.
    """
    existing = _ACCOUNTANTS.get(MECHANISM)
    if existing is None or (existing.__module__, existing.__qualname__) == (__name__, PLDAccountant.__qualname__):
        register_accountant(MECHANISM, PLDAccountant, force=True)


_register()
