"""Hyperparameter search: Optuna samplers (ask/tell), ASHA/Hyperband, PBT (DESIGN §10).

The search's state (every ask, rung value, decision) is a document of the store
(`Store.get_document("search", NAME)`); trials are ordinary sessions.
"""

from ptutils.search.driver import (
    KIND,
    Driver,
    SearchError,
    SearchSpec,
    best_trial,
    create_search,
    decisions,
    load_search,
    steps_spent,
)
from ptutils.search.space import Space, apply_params

__all__ = ["KIND", "Driver", "SearchError", "SearchSpec", "Space", "apply_params",
           "best_trial", "create_search", "decisions", "load_search", "steps_spent"]
