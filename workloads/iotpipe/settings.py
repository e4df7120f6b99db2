"""One configuration model per tier, filled from flags and environment variables alike.

Every tier declares a ``pydantic_settings.BaseSettings`` subclass. ``parse_settings`` turns
``argv`` plus the environment into that model, with ``--help`` generated from the field
descriptions. Flags win over environment variables, which win over defaults. A bad value
exits with status 2 and a one-line message that names the option.

``--help`` is written for people: every option names its environment variable, metavars
say what to type (``N``, ``SECONDS``, ``PATH``, ``A,B,...``) rather than Python type names,
booleans are one flag each (``--insecure-no-auth``, never ``--no-insecure-no-auth``), and
options marked :data:`Internal` are accepted but not listed.
"""

from __future__ import annotations

import sys
from argparse import HelpFormatter
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BeforeValidator, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    CLI_SUPPRESS,
    BaseSettings,
    CliApp,
    CliSettingsSource,
    NoDecode,
    SettingsConfigDict,
    SettingsError,
)

__all__ = [
    "CommaList",
    "CurveSettings",
    "EdgeSecuritySettings",
    "EndpointsReloadSettings",
    "Internal",
    "LogLevel",
    "LogSettings",
    "ServerSettings",
    "TierSettings",
    "metrics_port_field",
    "parse_settings",
    "tier_config",
]


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


# A list that environment variables and flags give as "a,b,c" (and flags also as repeats).
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]

# A log level, case-insensitive; anything else is refused at start (exit 2), not at the
# first log call in a restart loop.
LogLevel = Annotated[Literal["debug", "info", "warning", "error", "critical"],
                     BeforeValidator(_lower)]

# Marks an option that is accepted (flag and env var) but left out of --help: plumbing
# between processes of one tier, not something a user sets.
Internal = CLI_SUPPRESS


def tier_config(prog: str, env_prefix: str,
                shortcuts: dict[str, str] | None = None) -> SettingsConfigDict:
    """The model_config every tier uses: kebab-case flags, IOTPIPE_<TIER>_ env vars.

    ``shortcuts`` gives a field a second flag (``{"json_output": "json"}``: ``--json``). Use
    it rather than an alias: an alias also renames the environment variable, unprefixed.
    """
    return SettingsConfigDict(
        # pydantic-settings matches shortcut targets against the kebab-case flag names.
        cli_shortcuts={k.replace("_", "-"): v for k, v in (shortcuts or {}).items()},
        env_prefix=env_prefix,
        cli_prog_name=prog,
        cli_kebab_case=True,
        # One flag per boolean, named after what it turns on (or off, for a default True).
        cli_implicit_flags="toggle",
        cli_exit_on_error=True,
        cli_use_class_docs_for_groups=False,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_show_env_vars=True,
        extra="ignore",
    )


class TierSettings(BaseSettings):
    """Base for every command's settings; subclasses set ``model_config = tier_config(...)``."""


def metrics_port_field(default: int, scope: str = "") -> Any:
    """The ``metrics_port`` field with a tier's own default port (declared once here)."""
    description = "port of /metrics, /healthz and /readyz" + (f" {scope}" if scope else "")
    return Field(default, ge=0, le=65535, description=description)


class LogSettings(TierSettings):
    """The log level of a command that logs (every tier, ``iotpipe up``, ``iotpipe drain``)."""

    log_level: LogLevel = Field("info", description="debug, info, warning, error or critical")


class ServerSettings(LogSettings):
    """The options every long-running tier shares (same flag and env var names per tier).

    Each tier overrides ``metrics_port`` with its own default (ingest 9100, middle 9101,
    storage 9102, relay 9103, as ``iotpipe up`` lays them out), so tiers run by hand on one
    host do not collide.
    """

    host: str = Field("0.0.0.0", description="bind address")
    metrics_port: int = metrics_port_field(9100)


class CurveSettings(BaseSettings):
    """Mixin: the CurveZMQ keys of a tier's ZeroMQ links (same flag in every tier using it)."""

    curve_keys_dir: str = Field(
        "", description="CurveZMQ keys directory (docs/security.md): this tier's ZeroMQ links "
                        "to the middle tier are then encrypted, in this tier's role; "
                        "empty = no CURVE")


class EndpointsReloadSettings(BaseSettings):
    """Mixin: how often a tier re-reads its endpoints file (the operator's ConfigMap)."""

    endpoints_reload_seconds: float = Field(2.0, gt=0,
                                            description="seconds between endpoints file checks")


class EdgeSecuritySettings(CurveSettings):
    """Mixin: TLS and the deny list of a tier that devices or client apps connect to."""

    tls_cert: str = Field("", description="PEM certificate chain for wss:// (e.g. tls.crt of a "
                                           "cert-manager Secret); empty = plain ws://")
    tls_key: str = Field("", description="PEM private key of --tls-cert (e.g. tls.key)")
    tls_reload_seconds: float = Field(10.0, gt=0,
                                      description="seconds between checks of the certificate "
                                                  "files (a changed pair is used for new "
                                                  "connections)")
    deny_list_file: str = Field("", description="YAML deny list (devices or clients, "
                                                "token_ids), reloaded while running; "
                                                "docs/security.md")
    deny_list_reload_seconds: float = Field(5.0, gt=0,
                                            description="seconds between deny list checks "
                                                        "(revoked connections close within "
                                                        "this)")


# Metavars by type: what to type, not what Python calls it.
# ("bool" stays: pydantic-settings turns fields with that metavar into flags.)
_METAVARS = {"int": "N", "float": "NUM", "str": "TEXT", "Path": "PATH",
             "list[str]": "A,B,...", "dict[str,str]": "JSON"}


class _HelpSource(CliSettingsSource[Any]):
    """pydantic-settings' CLI source with help text that reads well."""

    def _metavar_format(self, obj: Any) -> str:
        if callable(obj) and not isinstance(obj, type) and getattr(obj, "__name__", "") \
                == "gethostname":
            return "the host name"
        text = super()._metavar_format(obj)
        return _METAVARS.get(text, text)

    def _help_format(self, field_name: str, field_info: FieldInfo, model_default: Any,
                     is_model_suppressed: bool, env_var_names: tuple[str, ...] = ()) -> str:
        text = super()._help_format(field_name, field_info, model_default, is_model_suppressed,
                                    env_var_names)
        # A default of None means "not set": the description says what happens then. A
        # flag is off unless given; the few that are on by default are --no-... flags, whose
        # description says what is on (the help says the flag turns it off).
        text = text.replace("(default factory: ", "(default: ").replace(" (default: None)", "")
        text = text.replace("(default: list)", "(default: none)")  # default_factory=list
        if field_info.annotation is bool:
            # A default-True boolean is listed as its --no-... flag: say what the flag does.
            text = text.replace(" (default: False)", "").replace(
                "(default: True)", "(on by default; this flag turns it off)")
        return text


S = TypeVar("S", bound=BaseSettings)


def _prog(model: type[BaseSettings]) -> str:
    return str(model.model_config.get("cli_prog_name") or model.__name__)


def parse_settings(model: type[S], argv: Sequence[str] | None = None) -> S:
    """Build ``model`` from argv and the environment; exit 2 with a clear message on error."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        # HelpFormatter re-flows the class docstring, whose continuation lines are indented.
        source: CliSettingsSource[Any] = _HelpSource(model, formatter_class=HelpFormatter)
        return CliApp.run(model, cli_args=args, cli_settings_source=source)
    except ValidationError as exc:
        env_prefix = str(model.model_config.get("env_prefix") or "")
        for err in exc.errors():
            parts = [str(p) for p in err["loc"]]
            name = "--" + "-".join(parts).replace("_", "-")
            env = (env_prefix + "_".join(parts)).upper()
            value = err.get("input")
            shown = f" (got {value!r})" if isinstance(value, (str, int, float)) else ""
            print(f"{_prog(model)}: error: {name} / {env}: {err['msg']}{shown}", file=sys.stderr)
        raise SystemExit(2) from None
    except SettingsError as exc:
        print(f"{_prog(model)}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

