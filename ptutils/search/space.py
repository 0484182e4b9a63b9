"""The search space: config paths mapped to distributions, read from YAML.

```yaml
model.optimizer.lr: {loguniform: [1.0e-4, 1.0e-1]}
model.network.hidden: {choice: [[32], [64], [128]]}
model.network.dropout: {uniform: [0.0, 0.5]}
data.batch_size: {int: [16, 128], log: true}
model.optimizer.momentum: {uniform: [0.0, 0.99], when: {model.optimizer.type: torch.optim.SGD}}
```

A `when:` key is sampled only if every named (earlier) key took one of the given
values; otherwise the base config's value stays. Keys are sampled in file order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ptutils.errors import ConfigError

KINDS = ("uniform", "loguniform", "int", "choice")
"""The distributions a space key may use."""


@dataclass(frozen=True)
class Param:
    """One searched config path and its distribution."""

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def distribution(self) -> Any:
        """The Optuna distribution (a choice is sampled as the index of its value:
        Optuna's categorical takes scalars only, and a choice may be a list)."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.kind == "choice":
            return CategoricalDistribution(list(range(len(self.choices))))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(self.low, self.high, log=self.log)

    def value_of(self, internal: Any) -> Any:
        """The config value of Optuna's sample (a choice's index -> its value)."""
        return self.choices[int(internal)] if self.kind == "choice" else internal

    def internal_of(self, value: Any) -> Any:
        """Optuna's sample of a config value (inverse of `value_of`)."""
        if self.kind != "choice":
            return value
        for i, c in enumerate(self.choices):
            if _same(c, value):
                return i
        raise ConfigError(f"{self.key}: {value!r} is not one of its choices")

    def active(self, values: Mapping[str, Any]) -> bool:
        """Whether this key is sampled, given the values of the keys before it."""
        return all(
            k in values and any(_same(values[k], v) for v in allowed) for k, allowed in self.when
        )


@dataclass
class Space:
    """The ordered params of a search space."""

    params: list[Param] = field(default_factory=list)

    @classmethod
    def parse(cls, raw: Any, where: str = "space") -> Space:
        """Check a space mapping; a ConfigError names the key and what to write."""
        if not isinstance(raw, Mapping) or not raw:
            raise ConfigError(
                f"{where}: expected a mapping of config paths to distributions, e.g. "
                "`model.optimizer.lr: {loguniform: [1.0e-4, 1.0e-1]}`"
            )
        params: list[Param] = []
        for key, spec in raw.items():
            params.append(_param(str(key), spec, [p.key for p in params], where))
        return cls(params)

    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def grid(self) -> dict[str, list[Any]]:
        """Optuna's GridSampler space (internal values); every key must be finite."""
        out: dict[str, list[Any]] = {}
        for p in self.params:
            if p.when:
                raise ConfigError(f"space.{p.key}: --algo grid cannot search conditional keys")
            if p.kind == "choice":
                out[p.key] = list(range(len(p.choices)))
            elif p.kind == "int" and not p.log:
                out[p.key] = list(range(int(p.low), int(p.high) + 1))
            else:
                raise ConfigError(
                    f"space.{p.key}: --algo grid needs a finite set of values: write it as "
                    f"`{{choice: [...]}}` (or a linear `int` range), not {p.kind}"
                )
        return out

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Sample every active key on an Optuna trial; config values by key."""
        values: dict[str, Any] = {}
        for p in self.params:
            if not p.active(values):
                continue
            if p.kind == "choice":
                internal = trial.suggest_categorical(p.key, list(range(len(p.choices))))
            elif p.kind == "int":
                internal = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log)
            else:
                internal = trial.suggest_float(p.key, p.low, p.high, log=p.log)
            values[p.key] = p.value_of(internal)
        return values

    def internal(self, values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(Optuna params, distributions) of recorded config values: a replayed trial."""
        by_key = {p.key: p for p in self.params}
        params = {k: by_key[k].internal_of(v) for k, v in values.items()}
        return params, {k: by_key[k].distribution() for k in values}

    def corners(self) -> list[dict[str, Any]]:
        """Two points that touch every bound and every choice (dry builds check them)."""
        points: list[dict[str, Any]] = [{}, {}]
        for p in self.params:
            for i, point in enumerate(points):
                if not p.active(point):
                    continue
                if p.kind == "choice":
                    point[p.key] = p.choices[0 if i == 0 else -1]
                else:
                    point[p.key] = p.low if i == 0 else p.high
                    if p.kind == "int":
                        point[p.key] = int(point[p.key])
        return points


def apply_params(config: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of `config` with each dotted key set to its value."""
    from ptutils.store.document import set_path

    out = json.loads(json.dumps(config))
    for key, value in values.items():
        set_path(out, key, json.loads(json.dumps(value)))
    return out


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _param(key: str, spec: Any, before: Sequence[str], where: str) -> Param:
    at = f"{where}.{key}"
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{at}: a key is a dotted config path, e.g. model.optimizer.lr")
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{at}: expected a distribution such as {{uniform: [0.0, 1.0]}}, "
                          f"got {spec!r}")
    spec = dict(spec)
    when = _when(spec.pop("when", None), before, at)
    log = spec.pop("log", False)
    kinds = [k for k in spec if k in KINDS]
    extra = [k for k in spec if k not in KINDS]
    if len(kinds) != 1 or extra:
        raise ConfigError(
            f"{at}: give exactly one of {', '.join(KINDS)} (plus optional `when:`, and `log:` "
            f"for int); got {sorted(map(str, spec))}"
        )
    kind = kinds[0]
    arg = spec[kind]
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"{at}.choice: expected a non-empty list of values")
        return Param(key, kind, choices=tuple(arg), when=when)
    if (
        not isinstance(arg, list)
        or len(arg) != 2
        or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in arg)
    ):
        raise ConfigError(f"{at}.{kind}: expected [low, high] (two numbers), got {arg!r}")
    low, high = arg
    if kind == "int" and not all(isinstance(x, int) for x in arg):
        raise ConfigError(f"{at}.int: bounds must be integers, got {arg!r}")
    if not low < high:
        raise ConfigError(f"{at}.{kind}: low must be below high, got {arg!r}")
    if kind == "loguniform":
        if low <= 0:
            raise ConfigError(f"{at}.loguniform: bounds must be positive, got {arg!r}")
        return Param(key, kind, float(low), float(high), True, when=when)
    if kind == "int":
        if log and low <= 0:
            raise ConfigError(f"{at}.int with log: bounds must be positive, got {arg!r}")
        return Param(key, kind, low, high, bool(log), when=when)
    return Param(key, kind, float(low), float(high), False, when=when)


def _when(raw: Any, before: Sequence[str], at: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{at}.when: expected a mapping of earlier keys to values")
    out = []
    for k, v in raw.items():
        if k not in before:
            raise ConfigError(
                f"{at}.when: {k!r} must be a key of the space listed before {at.split('.', 1)[1]}"
                f" (keys so far: {', '.join(before) or 'none'})"
            )
        out.append((str(k), tuple(v) if isinstance(v, list) else (v,)))
    return tuple(out)
