"""`Session`: the root Module of an experiment, built from the whole config file."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ptutils.callbacks import Callback, Callbacks, NanDetector
from ptutils.config import check_keys
from ptutils.data import DataProvider
from ptutils.errors import ConfigError, DataError
from ptutils.model import Model
from ptutils.module import Module, build
from ptutils.plan import Plan, Retention  # noqa: F401  (re-exported: ptutils.session.Plan)
from ptutils.rng import RNG, seed_all
from ptutils.state import History
from ptutils.trainer import Evaluator, Trainer

TOP_LEVEL_KEYS = (
    "name",
    "description",
    "tags",
    "imports",
    "session",
    "model",
    "data",
    "eval",
    "callbacks",
    "init",
)
"""Keys a config file may have at its top level (docs/config.md documents each)."""


def apply_determinism(plan: Plan) -> None:
    """Make the arithmetic a property of the session, not of the machine (DESIGN §4.4)."""
    torch.set_num_threads(plan.threads)
    torch.use_deterministic_algorithms(plan.deterministic, warn_only=True)
    if plan.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


class Session(Module):
    """Root of an experiment: trainer (model + data), evaluator, callbacks, history, RNGs.

    Build it with `Session.from_config(cfg)` after seeding (`Session.create` does both):
    weight initialisation draws from the seeded generators.
    """

    lazy_config = ("model", "data", "eval", "callbacks", "session", "init")

    def __init__(
        self,
        model: Mapping[str, Any] | Model,
        data: Mapping[str, Any] | DataProvider,
        session: Mapping[str, Any] | Plan | None = None,
        eval: Mapping[str, Any] | None = None,  # noqa: A002 - the config key is `eval`
        callbacks: Sequence[Mapping[str, Any]] | None = None,
        name: str | None = None,
        description: str | None = None,
        tags: Sequence[str] = (),
        imports: Sequence[str] = (),
        init: Mapping[str, Any] | None = None,
    ) -> None:
        """`init` (a warm start) is checked here but applied when the session is created
        (ptutils.warmstart): a built Session is always the seeded one."""
        if init is not None:
            from ptutils.warmstart import InitSpec

            InitSpec.parse(init)
        self.plan = session if isinstance(session, Plan) else Plan.from_config(session)
        data_obj = (
            data
            if isinstance(data, DataProvider)
            else DataProvider.from_config(_mapping(data, "data"), where="data")
        )
        model_obj = (
            model
            if isinstance(model, Model)
            else Model.from_config(_mapping(model, "model"), where="model")
        )
        self.trainer = Trainer(model_obj, data_obj, log_every=self.plan.log_every)
        eval_cfg = dict(eval or {})
        check_keys(eval_cfg, ["targets"], "eval")
        self._evaluator = Evaluator(eval_cfg.get("targets"))
        cbs = [build(c, where=f"callbacks[{i}]") for i, c in enumerate(callbacks or [])]
        if not any(isinstance(c, NanDetector) for c in cbs):
            cbs.insert(0, NanDetector())
        self.callbacks = Callbacks(cbs)
        self.history = History()
        self.rng = RNG()
        self.step = 0
        self.evals_seen = 0
        self._name = name
        self._evaluator.check(data_obj)
        data_obj.check_world_size(self.plan.world_size)
        self._group: dict[str, Any] | None = None
        model_obj.check_device(self.plan.device)  # the target device, wherever this build runs
        data_obj.pin_for(self.plan.device)  # pin_memory auto: pinned batches for CUDA only
        if model_obj.monitor is not None:
            _check_monitor(model_obj.monitor, self._evaluator, self.plan)
            self.callbacks.attach(_FeedMonitor(model_obj))

    @classmethod
    def create(cls, config: Mapping[str, Any], *, place: bool = True) -> Session:
        """Seed every generator from `session.seed`, build the tree, and move the model to
        the plan's device; `place=False` leaves it on the CPU (a dry build, for `submit` on a
        machine without that device)."""
        check_keys(config, TOP_LEVEL_KEYS, "config")
        plan = Plan.from_config(config.get("session"))
        apply_determinism(plan)
        data = DataProvider.from_config(_mapping(config.get("data"), "data"), where="data")
        data.sizes()  # read every dataset now: lazy reads (and imports) must not draw from
        # the generators between the seed and the first step
        seed_all(plan.seed)
        kwargs = {k: v for k, v in config.items() if k not in ("session", "data")}
        session = cls(session=plan, data=data, **kwargs)
        if place and plan.device != "cpu":
            session.model.to(plan.device)
        return session

    @property
    def model(self) -> Model:
        return self.trainer.model

    @property
    def data(self) -> DataProvider:
        return self.trainer.data

    @property
    def evaluator(self) -> Evaluator:
        return self._evaluator

    def extra_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "evals_seen": self.evals_seen,
            "torch_version": torch.__version__,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.evals_seen = int(state.get("evals_seen", 0))

    def load_state_dict(self, state: Mapping[str, Any], **kwargs: Any) -> Any:
        """Restore a State; a group's State (several ranks, ptutils.group) carries a
        `group` entry ({world_size, rng: [per-rank RNG states]}) kept aside as `group`:
        the rest is the State of rank 0, which loads into any Session of the config."""
        state = dict(state)
        self._group = state.pop("group", None)
        return super().load_state_dict(state, **kwargs)

    @property
    def group(self) -> dict[str, Any] | None:
        """The `group` entry of the last State loaded (None: written by one process)."""
        return self._group

    def saved_world_size(self) -> int:
        """The world size of the last State loaded (1 for a single process's)."""
        return int((self._group or {}).get("world_size", 1))

    def check_shapes(self) -> None:
        """One forward pass on an example batch: a data/network mismatch fails here, early."""
        batch = self.data.example_batch(self.data.train_sources()[0])
        model = self.model
        for key in (model.input_key, model.target_key):
            if key not in batch:
                raise DataError(
                    f"model.{'input' if key == model.input_key else 'target'}_key: the data "
                    f"has no column {key!r}; its columns are {sorted(batch)}."
                )
        batch = {k: v.to(model.device) for k, v in batch.items()}
        was_training = model.network.training
        model.network.eval()  # no dropout: the check must not draw from the RNGs
        try:
            with torch.no_grad():
                model.loss(batch)
        except (RuntimeError, ValueError, IndexError) as exc:
            shapes = {k: tuple(v.shape) for k, v in batch.items()}
            raise DataError(
                f"the data does not fit model.network: a batch with shapes {shapes} fails "
                f"in the forward pass or the loss: {exc}. Check model.network's input size "
                "(e.g. in_features) and output size against the data columns."
            ) from exc
        finally:
            model.network.train(was_training)


class _FeedMonitor(Callback):
    """Feeds the eval metrics to `Model.eval_end` where callbacks get them (`on_eval_end`,
    a fixed point of the plan), so `ptutils run` and the workers step the scheduler alike."""

    def __init__(self, model: Model) -> None:
        self._model = model

    def on_eval_end(self, step: int, metrics: dict[str, float]) -> None:
        self._model.eval_end(step, metrics)


def _check_monitor(monitor: str, evaluator: Evaluator, plan: Plan) -> None:
    """The monitored metric is produced by an eval whose result arrives before the end."""
    names = evaluator.metric_names()
    if monitor not in names:
        raise ConfigError(
            f"model.scheduler.monitor: no eval produces {monitor!r}; eval.targets give "
            f"{', '.join(names) or 'nothing (no eval.targets)'}"
        )
    if plan.eval_every == 0 or plan.eval_every + plan.chunk_steps >= plan.total_steps:
        raise ConfigError(
            f"model.scheduler.monitor: {monitor} reaches the scheduler at the start of the "
            "next-but-one chunk after each eval, and with session.eval_every="
            f"{plan.eval_every} (chunk_steps={plan.chunk_steps}, total_steps="
            f"{plan.total_steps}) no eval result arrives before the end. Set "
            "session.eval_every to a multiple of chunk_steps with eval_every + chunk_steps "
            "< total_steps."
        )


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value
