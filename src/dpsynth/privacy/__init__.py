"""Privacy: accountants, budget planner, ledger, DP statistics and the DP attribute model.

The patient-level DP-SGD engine lives in :mod:`dpsynth.privacy.dpsgd` (imported on demand:
it pulls in torch).
"""

from dpsynth.config import DEFAULT_DELTA
from dpsynth.privacy.accounting import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    Mechanism,
    epsilon_for,
    make_accountant,
    noise_for_epsilon,
    warn_delta,
)
from dpsynth.privacy.attribute_model import AttributeModel, attribute_fidelity, fit_attribute_model
from dpsynth.privacy.ledger import LEDGER_FILE, Ledger, LedgerEntry, format_ledger
from dpsynth.privacy.planner import Plan, format_plan, plan
from dpsynth.privacy.statistics import dp_latent_scale, dp_mean

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "DEFAULT_DELTA",
    "LEDGER_FILE",
    "AttributeModel",
    "Ledger",
    "LedgerEntry",
    "Mechanism",
    "Plan",
    "attribute_fidelity",
    "dp_latent_scale",
    "dp_mean",
    "epsilon_for",
    "fit_attribute_model",
    "format_ledger",
    "format_plan",
    "make_accountant",
    "noise_for_epsilon",
    "plan",
    "warn_delta",
]
