"""One command-line definition per job: typer options derived from the job's config model, so a flag, a YAML
field and a `python -m` entry point cannot drift apart.

    from subq.cli_options import config_command

    @app.command("train")
    @config_command(TrainConfig, extra={"ray_address": (Optional[str], typer.Option(None, "--ray-address",
                                                                                     help="..."))})
    def train(config_path, overrides, ray_address):   # overrides: {field: value} of the flags given
        cfg = load_config(TrainConfig, config_path, overrides)

What it makes, for each field of a pydantic model (or dataclass): an option `--field-name` whose help is the
field's description, with the field's default shown as `[default: ...]` (or "required"); bool fields as `--x/--no-x`; Literal fields
list their choices; a nested model/dataclass field (e.g. `ilql`) becomes a repeatable `--ilql KEY=VALUE`
(values parsed as YAML, merged over the nested mapping of the `--config` file), its help listing every key and its
default. Every option defaults to None, meaning "not given": only given flags override the YAML `--config`
(also added). Validation stays with pydantic (`subq.config.load_config`), which names the field on bad input.

`new_app()` is the `subq` app's shell (settings, `--verbose`) and `run(app, argv)` its exit-code policy; the front
door (`pipelines/cli.py`) and each job's `python -m` twin (`pipelines/generate/__main__.py`, ...: `run_verb`, the
verb itself from its own `register`) share both, so a verb and its twin show the same `--help`. Pure typer +
pydantic: no Ray, no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Any, Callable, Literal, Optional

import typer
import yaml

from subq.config import read_yaml
from subq.errors import ConfigError


def _fields(cls) -> dict[str, tuple[Any, Any, str, bool]]:
    """name -> (annotation, default, description, required)."""
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        out = {}
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            out[f.name] = (hints.get(f.name, f.type), default, (f.metadata or {}).get("description", ""),
                           f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        return out
    out = {}
    for name, f in cls.model_fields.items():
        required = f.is_required()
        default = None if required else f.get_default(call_default_factory=True)
        out[name] = (f.annotation, default, f.description or "", required)
    return out


def _unwrap_optional(t):
    if typing.get_origin(t) is typing.Union or str(typing.get_origin(t)) == "types.UnionType":
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return t


def _is_nested(t) -> bool:
    return inspect.isclass(t) and (dataclasses.is_dataclass(t) or hasattr(t, "model_fields"))


def _show(v) -> str:
    if dataclasses.is_dataclass(v):
        v = dataclasses.asdict(v)
    elif hasattr(v, "model_dump"):
        v = v.model_dump()
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _option(name: str, ann, default, desc: str, required: bool, names: list[str], repeat: bool) -> tuple[Any, Any]:
    """(option type, typer.Option) of one scalar/list/dict field. `names`: its flags (the first is the canonical
    `--field-name`; the rest are declared aliases, today's names kept)."""
    t = _unwrap_optional(ann)
    help_ = desc.rstrip()
    if typing.get_origin(t) is Literal:
        help_ += f" One of: {' | '.join(str(a) for a in typing.get_args(t))}."
        t = str
    # the field's default, though the option's is None (click would print a string show_default in parentheses)
    help_ += " [required: here or in --config]" if required else f" [default: {_show(default)}]"
    if t is bool:
        decls = [n if "/" in n else f"{n}/--no-{n[2:]}" for n in names]
        return Optional[bool], typer.Option(None, *decls, help=help_, show_default=False)
    if repeat:
        return Optional[list[str]], typer.Option(None, *names, help=help_ + " (repeatable)", show_default=False)
    if typing.get_origin(t) in (dict, list):
        help_ += " (YAML, e.g. '{a: 1}' or '[x, y]')"
    if t not in (str, int, float):
        t = str
    return Optional[t], typer.Option(None, *names, help=help_, show_default=False)


def option_specs(cls, *, flatten: tuple[str, ...] = (), aliases: Optional[dict[str, list[str]]] = None,
                 repeat: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """parameter name -> (option type, typer.Option) for every field of `cls`.

    flatten: nested-model fields whose own fields become `--<field>-<sub-field>` options (parameter `field__sub`);
    other nested fields are one repeatable `--field KEY=VALUE`. aliases: dotted field path -> extra flag names
    (a bool's may be `--on/--off`). repeat: list fields given as a repeatable option instead of one YAML list."""
    aliases = aliases or {}
    specs = {}
    for name, (ann, default, desc, required) in _fields(cls).items():
        t = _unwrap_optional(ann)
        if _is_nested(t) and name in flatten:
            for sub, (s_ann, s_default, s_desc, s_required) in _fields(t).items():
                path = f"{name}.{sub}"
                specs[f"{name}__{sub}"] = _option(path, s_ann, s_default, s_desc, s_required,
                                                  [_flag(f"{name}_{sub}"), *aliases.get(path, [])], path in repeat)
            continue
        if _is_nested(t):
            keys = ", ".join(f"{k}={_show(d)}" for k, (_, d, _, _) in _fields(t).items())
            help_ = desc.rstrip() + f" Repeatable KEY=VALUE; keys and defaults: {keys}."
            specs[name] = (Optional[list[str]], typer.Option(None, _flag(name), *aliases.get(name, []), help=help_,
                                                              metavar="KEY=VALUE", show_default=False))
            continue
        specs[name] = _option(name, ann, default, desc, required, [_flag(name), *aliases.get(name, [])],
                              name in repeat)
    return specs


def nested_overrides(cls, config_path: Optional[str], values: dict[str, Any],
                     base: Optional[dict] = None) -> dict[str, Any]:
    """The given flags as field values: `--nested KEY=VALUE` lists and flattened `field__sub` options become
    mappings merged over the config's nested mapping (`base`, else the --config file), YAML list/dict strings
    are parsed."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if "__" in k:
            name, sub = k.split("__", 1)
            out.setdefault(name, {})[sub] = v
        else:
            out[k] = v
    if base is None:
        base = read_yaml(config_path) if config_path else {}
    fields = _fields(cls)
    for name, (ann, _, _, _) in fields.items():
        t = _unwrap_optional(ann)
        if typing.get_origin(t) in (dict, list) and isinstance(out.get(name), str):
            try:
                out[name] = yaml.safe_load(out[name])
            except yaml.YAMLError as e:
                raise ConfigError(f"not valid YAML: {e}", field=_flag(name)) from None
        items = out.get(name)
        if not (_is_nested(t) and items):
            continue
        merged = dict(base.get(name) or {})
        if isinstance(items, dict):  # flattened options
            for sub, v in items.items():
                sub_t = _unwrap_optional(_fields(t)[sub][0])
                if typing.get_origin(sub_t) in (dict, list) and isinstance(v, str):
                    try:
                        v = yaml.safe_load(v)
                    except yaml.YAMLError as e:
                        raise ConfigError(f"not valid YAML: {e}", field=_flag(f"{name}_{sub}")) from None
                merged[sub] = v
        else:
            for item in items:
                if "=" not in item:
                    raise ConfigError(f"expected KEY=VALUE, got {item!r}", field=_flag(name))
                k, v = item.split("=", 1)
                merged[k.strip()] = yaml.safe_load(v)
        out[name] = merged
    return out


def config_command(cls, *, extra: Optional[dict[str, tuple[Any, Any]]] = None, exclude: tuple[str, ...] = (),
                   flatten: tuple[str, ...] = (), aliases: Optional[dict[str, list[str]]] = None,
                   repeat: tuple[str, ...] = (), config_help: Optional[str] = None,
                   read_config: Optional[Callable[[Optional[str]], dict]] = None) -> Callable:
    """Decorator: the wrapped `fn(config_path, overrides, **extra)` becomes a typer command with `--config`, one
    option per field of `cls` (minus `exclude`; `flatten`, `aliases`, `repeat` as in option_specs) and the `extra`
    options ({name: (type, typer.Option)}). `overrides` holds the flags given, as field values (nested mappings
    merged over the config file's, read with `read_config`, default: plain YAML)."""
    specs = {k: v for k, v in option_specs(cls, flatten=flatten, aliases=aliases, repeat=repeat).items()
             if k not in exclude and k.split("__")[0] not in exclude}
    extra = dict(extra or {})

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def command(**kwargs):
            config_path = kwargs.pop("config")
            extras = {k: kwargs.pop(k) for k in extra}
            base = read_config(config_path) if read_config else None
            overrides = nested_overrides(cls, config_path, {k: v for k, v in kwargs.items() if v is not None}, base)
            return fn(config_path, overrides, **extras)

        params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                    default=typer.Option(None, "--config", help=config_help or (
                                        f"YAML file of {cls.__name__} fields (the same names as these flags); "
                                        "flags override it.")))]
        for name, (t, opt) in {**specs, **extra}.items():
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=t, default=opt))
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must see the generated signature, not fn's
        return command

    return deco


def option_names(command: Any) -> set[str]:
    """The long option names of a click/typer command (tests compare verbs and their `python -m` twins)."""
    return {o for p in command.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])
            if o.startswith("--")}


def new_app(help: str = "Distil an LLM's problem-decomposition skill into a compact model, on Ray.") -> typer.Typer:
    """The `subq` app's shell: plain help showing every default, `-h`, and the global `--verbose`."""
    app = typer.Typer(
        name="subq", help=help, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
        rich_markup_mode=None,  # click's plain help: flags show no type, every default is shown
        context_settings={"show_default": True, "help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def _root(
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Ray, DeepSpeed and Serve output on the "
                                     "terminal instead of the run's log file (also SUBQ_VERBOSE=1)."),
    ) -> None:
        from subq import console

        console.set_verbose(verbose)

    _root.__doc__ = help
    return app


def run(app: typer.Typer, argv: Optional[list[str]] = None) -> None:
    """Run `app` as the `subq` console script: user errors print one line and exit 2, without a traceback. Ctrl-C
    exits 130 and SIGTERM 143, each after the command's own stop path ran (subq.stop); an unexpected failure prints
    one line (the traceback goes to the run's log) and exits 1."""
    import faulthandler
    import signal
    import sys

    from subq import console
    from subq import stop as _stop
    from subq.errors import SubqError

    _stop.install()  # SIGINT and SIGTERM raise here, every time (subq.stop)
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>` prints every thread's stack to stderr (a job that seems stuck)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        try:
            app(args=argv, prog_name="subq", standalone_mode=True)
        except SystemExit as e:  # typer turns a KeyboardInterrupt from the command into exit 130
            if e.code == 130 and _stop.requested() is not None:
                raise (_stop.Terminated() if _stop.requested() == signal.SIGTERM else KeyboardInterrupt()) from None
            raise
    except SubqError as e:
        console.echo(f"error: {e}")
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (subq.stop.Terminated)
        console.echo(f"\nstopped ({_stop.describe(e)})")
        sys.exit(_stop.exit_code(e))
    except Exception as e:  # noqa: BLE001 - an unexpected failure: one line on the terminal, the traceback in the log
        import traceback

        traceback.print_exc()  # to the log file when one is active
        where = f" (traceback in {console.log_path()})" if console.log_path() else ""
        console.echo(f"error: {type(e).__name__}: {e}{where}")
        sys.exit(1)
    finally:
        _stop.uninstall()  # an in-process caller (a test) gets its own handlers back


def run_verb(register: Callable[[typer.Typer], None], verb: str, argv: Optional[list[str]] = None) -> None:
    """A job's `python -m` twin: `subq VERB ARGV` from the verb's own `register` (no other layer loaded)."""
    import sys

    app = new_app()
    register(app)
    run(app, [verb, *(sys.argv[1:] if argv is None else argv)])
