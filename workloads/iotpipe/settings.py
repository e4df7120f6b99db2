"""One configuration model per tier, filled from flags and environment variables alike.

Every tier declares a ``pydantic_settings.BaseSettings`` subclass. ``parse_settings`` turns
``argv`` plus the environment into that model, with ``--help`` generated from the field
descriptions. Flags win over environment variables, which win over defaults. A bad value
exits with status 2 and a one-line message that names the option.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, ValidationError
from pydantic_settings import BaseSettings, CliApp, NoDecode, SettingsConfigDict, SettingsError

__all__ = ["CommaList", "TierSettings", "parse_settings", "tier_config"]


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


# A list that environment variables and flags give as "a,b,c" (and flags also as repeats).
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]


def tier_config(prog: str, env_prefix: str) -> SettingsConfigDict:
    """The model_config every tier uses: kebab-case flags, IOTPIPE_<TIER>_ env vars."""
    return SettingsConfigDict(
        env_prefix=env_prefix,
        cli_prog_name=prog,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_exit_on_error=True,
        cli_use_class_docs_for_groups=False,
        extra="ignore",
    )


class TierSettings(BaseSettings):
    """Base for tier settings; subclasses set ``model_config = tier_config(...)``."""


S = TypeVar("S", bound=BaseSettings)


def parse_settings(model: type[S], argv: Sequence[str] | None = None) -> S:
    """Build ``model`` from argv and the environment; exit 2 with a clear message on error."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return CliApp.run(model, cli_args=args)
    except ValidationError as exc:
        prog = model.model_config.get("cli_prog_name") or model.__name__
        for err in exc.errors():
            name = "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-")
            print(f"{prog}: error: {name}: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
    except SettingsError as exc:
        prog = model.model_config.get("cli_prog_name") or model.__name__
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
