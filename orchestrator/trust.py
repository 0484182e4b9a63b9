"""CLI options of the operator's code policy (ptutils.policy).

`--allow-imports` on `run`, `submit` and `worker`; `--trust-session-code` on `worker`.
`run` and `submit` apply the policy to this process as the option is parsed (their
command bodies need not know); `worker` passes it on to its children.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click

from ptutils import policy
from ptutils.errors import ConfigError

ALLOW_HELP = ("Modules (comma separated, with their submodules) whose classes a config may "
              "name, besides torch.nn, torch.optim, ptutils and packages that declare a "
              "`ptutils.modules` entry point. Never the standard library. Falls back to "
              f"${policy.ALLOW_ENV}.")

TRUST_HELP = ("Load the .py files a session was submitted with (listed under `imports:`, "
              "stored with the session). Without it such a session fails at once, saying "
              f"so. Falls back to ${policy.TRUST_ENV}=1.")


def _parse(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    try:
        return policy.parse_allow(value, policy.ALLOW_FLAG)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


def _apply(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    allow = _parse(ctx, param, value)
    try:
        trust = policy.parse_trust(os.environ.get(policy.TRUST_ENV))
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc
    policy.configure(policy.Policy(allow, trust))


def allow_imports_option(*, apply: bool, extra_help: str = "") -> Callable[..., Any]:
    """`--allow-imports` ($PTUTILS_ALLOW_IMPORTS): applied to this process, or passed on
    to the command as a tuple of module names (`apply=False`)."""
    return click.option(
        "--allow-imports", "allow_imports", envvar=policy.ALLOW_ENV, default=None,
        metavar="MODULE,...", help=ALLOW_HELP + extra_help,
        callback=_apply if apply else _parse, expose_value=not apply,
    )


def trust_session_code_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--trust-session-code` ($PTUTILS_TRUST_SESSION_CODE)."""
    return click.option("--trust-session-code", "trust_session_code", is_flag=True,
                        envvar=policy.TRUST_ENV, help=TRUST_HELP)(fn)
