"""`Session`: the root Module of an experiment, built from the whole config file."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from ptutils.callbacks import DEFAULT_MODE, MODES, Callbacks, NanDetector
from ptutils.config import check_keys
from ptutils.data import DataProvider
from ptutils.errors import ConfigError, DataError
from ptutils.model import Model
from ptutils.module import Module, build
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
)
"""Keys a config file may have at its top level (docs/config.md documents each)."""


@dataclass
class Retention:
    """Which checkpoints the Save task keeps."""

    keep_last: int = 2
    keep_every: int = 0
    best_metric: str | None = None
    best_mode: str = DEFAULT_MODE


@dataclass
class Plan:
    """The schedule of a session: `session:` in the config."""

    total_steps: int = 1000
    chunk_steps: int = 100
    eval_every: int = 0
    log_every: int = 10
    seed: int = 0
    threads: int = 1
    deterministic: bool = True
    device: str = "cpu"
    max_attempts: int = 3
    retention: Retention = field(default_factory=Retention)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> Plan:
        cfg = dict(cfg or {})
        check_keys(cfg, [f.name for f in fields(cls)], "session")
        ret = cfg.pop("retention", None) or {}
        check_keys(ret, [f.name for f in fields(Retention)], "session.retention")
        plan = cls(**cfg, retention=Retention(**ret))
        plan.validate()
        return plan

    def validate(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"session.{key}: {what} (got {getattr(self, key)!r})")

        need(
            isinstance(self.total_steps, int) and self.total_steps > 0,
            "total_steps",
            "must be a positive integer",
        )
        need(
            isinstance(self.chunk_steps, int) and self.chunk_steps > 0,
            "chunk_steps",
            "must be a positive integer",
        )
        need(
            isinstance(self.eval_every, int) and self.eval_every >= 0,
            "eval_every",
            "must be 0 (eval only at the end) or a positive integer",
        )
        need(
            self.eval_every % self.chunk_steps == 0,
            "eval_every",
            f"must be a multiple of session.chunk_steps={self.chunk_steps} "
            "(evals run on checkpoints, which are written at chunk ends)",
        )
        need(isinstance(self.threads, int) and self.threads >= 1, "threads", "must be >= 1")
        need(self.max_attempts >= 1, "max_attempts", "must be >= 1")
        if self.retention.best_mode not in MODES:
            raise ConfigError(
                f"session.retention.best_mode: must be 'min' or 'max' "
                f"(got {self.retention.best_mode!r})"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def boundary_after(self, step: int) -> int:
        """The chunk end that follows `step` (chunks are aligned to chunk_steps)."""
        return min(self.total_steps, (step // self.chunk_steps + 1) * self.chunk_steps)

    def eval_due(self, step: int) -> bool:
        return step == self.total_steps or (self.eval_every > 0 and step % self.eval_every == 0)


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

    lazy_config = ("model", "data", "eval", "callbacks", "session")

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
    ) -> None:
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
        if self.plan.device != "cpu":
            model_obj.to(self.plan.device)

    @classmethod
    def create(cls, config: Mapping[str, Any]) -> Session:
        """Seed every generator from `session.seed`, then build the tree."""
        check_keys(config, TOP_LEVEL_KEYS, "config")
        plan = Plan.from_config(config.get("session"))
        apply_determinism(plan)
        data = DataProvider.from_config(_mapping(config.get("data"), "data"), where="data")
        data.sizes()  # read every dataset now: lazy reads (and imports) must not draw from
        # the generators between the seed and the first step
        seed_all(plan.seed)
        kwargs = {k: v for k, v in config.items() if k not in ("session", "data")}
        return cls(session=plan, data=data, **kwargs)

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


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value
