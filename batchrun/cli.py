"""The ``batchrun`` command: flags to configuration, results to exit codes."""

from __future__ import annotations

import dataclasses
import errno
import inspect
import json
import logging
import math
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, cast

import orjson
import typer

from batchrun.errors import DiskError, LockedError, RequestError, UsageError
from batchrun.layout import STATE_SUFFIX
from batchrun.settings import BY_KEY, SETTINGS, Setting

# Modules a command needs are imported inside it: ``batchrun --version`` and
# ``--help`` load no HTTP stack.

cache_app = typer.Typer(
    no_args_is_help=True, help="Inspect and prune a result store shared with --cache."
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run a JSONL file of model requests through one pooled, rate-bounded session.",
)


def _opt(help_text: str, panel: str | None = None, *names: str) -> Any:
    return typer.Option(*names, help=help_text, rich_help_panel=panel, show_default=False)


def path_of(name: str) -> Callable[[str], Path]:
    """The parser of path parameter ``name``: its text as a ``Path``, where
    empty text (which ``Path`` takes for the current directory) is a usage
    error (exit 2) naming the parameter. The parser's name is what the help
    shows as the type."""

    def path(text: str) -> Path:
        if not text.strip():
            _exit_usage(f"{name} is empty: give a path")
        return Path(text)

    return path


def _path_opt(help_text: str, panel: str | None, name: str) -> Any:
    """``_opt`` for the path option ``name`` (see ``path_of``)."""
    option = _opt(help_text, panel, name)
    option.parser = path_of(name)
    return option


def _print_version(value: bool) -> None:
    if value:
        from batchrun import __version__

        typer.echo(f"batchrun {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    _version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Run a JSONL file of model requests through one pooled, rate-bounded session."""


def run_command(**flags: Any) -> None:
    """Send every request of INPUT and write one result line per input line to OUT."""
    from batchrun.heap import pin_mmap_threshold, space_out_collections
    from batchrun.jobfile import build_config
    from batchrun.runner import EXIT_DISK, EXIT_LOCKED, disk_advice, run

    _setup_logging()
    pin_mmap_threshold()  # large answers go back to the system when written
    space_out_collections()  # fewer cycle collections: rows make almost no cycles
    try:
        with _usage_errors():
            job = flags.get("job")
            config = dataclasses.replace(build_config(_settings(flags)), job=job)
            result = run(config, handle_signals=True)
    except LockedError as exc:
        typer.echo(f"batchrun: {exc}", err=True)
        raise typer.Exit(EXIT_LOCKED) from None
    except DiskError as exc:  # before the rows: the state files themselves
        typer.echo(f"batchrun: error: {disk_advice(exc)}", err=True)
        raise typer.Exit(EXIT_DISK) from None
    typer.echo(result.render(), err=True)  # ``run`` wrote --summary
    raise typer.Exit(result.exit_code)


def _run_parameters() -> list[inspect.Parameter]:
    """The ``run`` command's parameters: one per setting (and one per hidden
    spelling, ``also_KEY``), and ``--job`` after ``--out``."""
    params = []
    for setting in SETTINGS:
        kind = _flag_type(setting)
        params.append(_parameter(setting.key, kind, _setting_option(setting)))
        if setting.hidden_decls:
            hidden = typer.Option(*setting.hidden_decls, hidden=True)
            params.append(_parameter(_ALSO + setting.key, kind, hidden))
    job = _path_opt("TOML job file; flags override it.", None, "--job")
    out_at = next(i for i, param in enumerate(params) if param.name == "out")
    params.insert(out_at + 1, _parameter("job", Path, job))
    return params


def _flag_type(setting: Setting) -> type[Any]:
    """What the command line parser hands on: a path as the text given, so
    that an empty one (``--cache "$UNSET"``) is refused as empty text by
    ``build_config`` instead of becoming the current directory."""
    return str if setting.type is Path and not setting.argument else setting.type


def _parameter(name: str, kind: type[Any], info: Any) -> inspect.Parameter:
    """``name: Annotated[kind | None, info] = None``: None is "not given"."""
    annotation = cast(Any, Annotated)[kind | None, info]
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
    )


def _setting_option(setting: Setting, *, panel: str | None = "") -> Any:
    """The typer parameter of ``setting``, in its own help panel unless ``panel``
    names another ("" keeps the setting's, None is the general one)."""
    # Rich reads [...] in help as markup: escaped, "[costs]" is shown as written.
    help_text = setting.help_text.replace("[", "\\[")
    if setting.argument:
        name = setting.key.upper()
        parser = path_of(name) if setting.type is Path else None
        return typer.Argument(metavar=name, help=help_text, parser=parser)
    option = _opt(help_text, setting.panel if panel == "" else panel, *setting.flag_decls)
    if setting.type is Path:
        option.metavar = "<path>"  # parsed as text (see ``_flag_type``), shown as a path
    return option


_ALSO = "also_"  # the parameter of a setting's hidden spelling


# Typer reads the parameters from the signature: the settings table spells them once.
run_command.__signature__ = inspect.Signature(_run_parameters())  # type: ignore[attr-defined]
app.command("run")(run_command)


def _settings(flags: dict[str, Any]) -> dict[str, Any]:
    """Job-file settings overridden by the flags that were given.

    ``--param`` adds to the job file's ``[params]``; any other flag given
    replaces the job file's key (and that key's aliases: ``--base-url``
    replaces ``base_urls``).
    """
    from batchrun.jobfile import load_job_file

    for name in [name for name in flags if name.startswith(_ALSO)]:
        also, key = flags.pop(name), name.removeprefix(_ALSO)
        if flags.get(key) is None:  # the hidden spelling counts where the shown one is not
            flags[key] = also
    job_path = flags.pop("job", None)
    settings: dict[str, Any] = load_job_file(job_path) if job_path is not None else {}
    params = dict(settings.get("params") or {})
    params.update(_parse_params(flags.pop("params", None) or []))
    for key, value in flags.items():
        if value is None or value == []:
            continue  # not given: the job file's value stands
        for alias in BY_KEY[key].aliases:
            settings.pop(alias, None)
        settings[key] = value
    settings["params"] = params
    return settings


def _parse_params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--param takes KEY=VALUE, got {pair!r}")
        if _is_non_finite(value):
            raise UsageError(f"--param {pair}: JSON has no NaN or infinity to send")
        try:
            # The standard parser keeps every digit of a big integer (orjson
            # rounds it to a float): the settings check then refuses it.
            params[key] = json.loads(value)
        except ValueError as exc:
            if value.lstrip().startswith(("[", "{", '"')):  # meant as JSON: a typo is no string
                raise UsageError(f"--param {pair}: not valid JSON ({exc})") from None
            params[key] = value  # a bare word is a string
    return params


def _is_non_finite(word: str) -> bool:
    """Whether ``word`` reads as NaN or an infinity (``nan``, ``-Infinity``...)."""
    try:
        return not math.isfinite(float(word))
    except ValueError:
        return False


@app.command("status")
def status_command(
    out: Annotated[
        Path, typer.Argument(metavar="OUT", help="The output a run writes.", parser=path_of("OUT"))
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Tell how far the run on OUT has come, without touching anything."""
    from batchrun import status

    with _usage_errors():
        report = status.describe(out)
    if as_json:
        typer.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        typer.echo(status.render(report))


@app.command("cancel")
def cancel_command(
    out: Annotated[
        Path,
        typer.Argument(
            metavar="OUT", help="The output of a --mode batch run.", parser=path_of("OUT")
        ),
    ],
) -> None:
    """Cancel the provider batches of the run on OUT (a signal leaves them running).

    Their finished rows are kept: run the same command again to collect them.
    Refused (exit 4) while a run on OUT is live: stop it first.
    """
    import anyio

    from batchrun.batchmode.cancel import cancel_batches
    from batchrun.runner import EXIT_FATAL

    try:
        with _usage_errors():
            cancelled = anyio.run(cancel_batches, out)
    except LockedError as exc:  # a live run would resubmit what is cancelled
        _exit_locked(exc)
    except RequestError as exc:  # unreachable, or refused: nothing was cancelled for sure
        typer.echo(
            f"batchrun: error: the provider could not be asked to cancel ({exc.code}: {exc})."
            " The batches may still be running: run batchrun cancel again",
            err=True,
        )
        raise typer.Exit(EXIT_FATAL) from None
    for batch_id, status in cancelled:
        typer.echo(f"{batch_id}: {status}")
    typer.echo(f"batchrun: {_cancel_note(cancelled)}", err=True)


def _cancel_note(cancelled: list[tuple[str, str]]) -> str:
    """What ``cancel`` did, from the statuses the provider answered."""
    if not cancelled:
        return "no batch of this output is running: nothing to cancel"
    ended = sum(status in ("completed", "failed", "expired") for _, status in cancelled)
    if ended == len(cancelled):
        note = f"all {ended} batches had ended already: nothing to cancel"
    else:
        asked = len(cancelled) - ended
        note = f"asked the provider to cancel {asked} batch{'' if asked == 1 else 'es'}"
        note += f" ({ended} had ended already)" if ended else ""
    return note + "; run the same command again to collect their finished rows"


# Run settings validate takes too, with their help and checks.
_PriceIn = Annotated[float | None, _setting_option(BY_KEY["price_input_per_million"], panel=None)]
_PriceOut = Annotated[float | None, _setting_option(BY_KEY["price_output_per_million"], panel=None)]
_ContextLimit = Annotated[int | None, _setting_option(BY_KEY["context_limit"], panel=None)]
_Mode = Annotated[str | None, _setting_option(BY_KEY["mode"], panel=None)]
_BatchShare = Annotated[float | None, _setting_option(BY_KEY["batch_price_share"], panel=None)]


@app.command("validate")
def validate_command(
    input_path: Annotated[
        Path | None,
        typer.Argument(
            metavar="INPUT", help="JSONL (or .jsonl.gz) requests.", parser=path_of("INPUT")
        ),
    ] = None,
    job: Annotated[
        Path | None, _path_opt("TOML job file (defaults, prices, context).", None, "--job")
    ] = None,
    model: Annotated[str | None, _opt("Model for lines that name none.")] = None,
    param: Annotated[
        list[str] | None, _opt("Default request parameter KEY=JSON (repeatable).", None, "--param")
    ] = None,
    shard: Annotated[str | None, _opt("Only shard I/N's rows.")] = None,
    response_schema: Annotated[
        Path | None,
        _path_opt("Check this JSON Schema file too (alone: only it).", None, "--response-schema"),
    ] = None,
    price_input_per_million: _PriceIn = None,
    price_output_per_million: _PriceOut = None,
    context_limit: _ContextLimit = None,
    mode: _Mode = None,
    batch_price_share: _BatchShare = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check INPUT without sending anything: bad lines, duplicate ids, models, tokens, cost.

    Exits 1 when some rows would fail (bad lines, rows over the context limit),
    2 when the input, the job file or the response schema is unusable.
    """
    if input_path is None and job is None and response_schema is not None:
        _check_schema_alone(response_schema)
        return
    flags = {
        "input": input_path,
        "job": job,
        "model": model,
        "params": param,
        "shard": shard,
        "response_schema": response_schema,
        "price_input_per_million": price_input_per_million,
        "price_output_per_million": price_output_per_million,
        "context_limit": context_limit,
        "mode": mode,
        "batch_price_share": batch_price_share,
    }
    _print_validation(flags, as_json=as_json)


def _print_validation(flags: dict[str, Any], *, as_json: bool) -> None:
    """Validate the input the flags (and their job file) name, print the
    report, and exit 1 when rows would fail."""
    from batchrun.jobfile import build_config
    from batchrun.runner import EXIT_FAILED_ROWS
    from batchrun.validate import validate

    with _usage_errors():
        settings = _settings(flags)
        settings.setdefault("out", "-")  # validate writes nothing
        report = validate(build_config(settings))
    if as_json:
        typer.echo(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        typer.echo(report.render())
    raise typer.Exit(EXIT_FAILED_ROWS if report.would_fail else 0)


def _check_schema_alone(path: Path) -> None:
    from batchrun.schema import load_response_schema

    with _usage_errors():
        load_response_schema(path)
    typer.echo(f"batchrun: {path} is a valid JSON Schema")


@app.command("merge")
def merge_command(
    shards: Annotated[
        list[Path],
        typer.Argument(metavar="SHARD_OUT...", help="Shard outputs.", parser=path_of("SHARD_OUT")),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="The merged output.", parser=path_of("--out"))
    ],
) -> None:
    """Join the outputs of --shard I/N runs into one output, in input order."""
    from batchrun.merge import merge
    from batchrun.runner import EXIT_FAILED_ROWS

    with _writing_a_file():
        report = merge(shards, out)
    typer.echo(
        f"batchrun: merged {len(shards)} shards, {report.rows:,} rows"
        f" ({report.failed:,} failed) into {report.output}",
        err=True,
    )
    raise typer.Exit(EXIT_FAILED_ROWS if report.failed else 0)


app.add_typer(cache_app, name="cache")


@cache_app.command("stats")
def cache_stats_command(
    directory: Annotated[
        Path, typer.Argument(metavar="DIR", help="The --cache directory.", parser=path_of("DIR"))
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Count what a result store holds: results, errors, recorded cost, age, size."""
    from batchrun import cachecmd

    with _usage_errors():
        stats = cachecmd.stats(directory)
    if as_json:
        typer.echo(orjson.dumps(cachecmd.as_dict(stats), option=orjson.OPT_INDENT_2).decode())
    else:
        typer.echo(cachecmd.render(stats))


@cache_app.command("prune")
def cache_prune_command(
    directory: Annotated[
        Path, typer.Argument(metavar="DIR", help="The --cache directory.", parser=path_of("DIR"))
    ],
    older_than: Annotated[
        str, typer.Option("--older-than", help="Age such as 30d, 12h, 90m or 3600s.")
    ],
) -> None:
    """Delete the results stored longer ago than --older-than."""
    from batchrun import cachecmd

    try:
        with _usage_errors():
            deleted = cachecmd.prune(directory, cachecmd.parse_age(older_than))
    except LockedError as exc:
        _exit_locked(exc)
    typer.echo(f"batchrun: deleted {deleted:,} results older than {older_than} from {directory}")


@app.command("export")
def export_command(
    out: Annotated[
        Path, typer.Argument(metavar="OUT", help="The output a run wrote.", parser=path_of("OUT"))
    ],
    to: Annotated[
        Path,
        typer.Option("--to", help="The table: .parquet, .csv or .jsonl.", parser=path_of("--to")),
    ],
    format: Annotated[
        str | None, _opt("parquet | csv | jsonl (default: from --to's extension).")
    ] = None,
    input_path: Annotated[
        Path | None, _path_opt("The run's input, to copy --columns from.", None, "--input")
    ] = None,
    columns: Annotated[
        str | None, _opt("Top-level input fields to add, comma-separated (a,b).")
    ] = None,
    partial: Annotated[
        bool, typer.Option("--partial", help="Export an unfinished run's rows done so far.")
    ] = False,
) -> None:
    """Write OUT's rows as a table: text, tokens, cost, errors, parsed answers."""
    from batchrun.export import export

    names = [name.strip() for name in (columns or "").split(",") if name.strip()]
    with _writing_a_file():
        report = export(out, to, format=format, input=input_path, columns=names, partial=partial)
    typer.echo(
        f"batchrun: exported {report.rows:,} rows ({report.failed:,} failed) to"
        f" {report.path} ({report.format})",
        err=True,
    )


def _bounded(help_text: str, low: float, high: float | None = None) -> Any:
    return typer.Option(min=low, max=high, help=help_text)


@app.command("mock-server")
def mock_server_command(
    port: Annotated[int, _bounded("Port on 127.0.0.1 (0: any free port).", 0, 65535)] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    latency: Annotated[float, _bounded("Seconds added to every answer.", 0.0)] = 0.0,
    fail_rate: Annotated[float, _bounded("Share of answers that are 503.", 0.0, 1.0)] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the fault draw.")] = 0,
    rate_limit: Annotated[
        int | None, _bounded("Requests per second; beyond it, 429 + Retry-After.", 1)
    ] = None,
    sliding_window: Annotated[
        bool,
        typer.Option(
            "--sliding-window/--fixed-window",
            help="Count --rate-limit over the last second, or per whole second.",
        ),
    ] = False,
    batch_seconds: Annotated[
        float, _bounded("Seconds a batch takes from creation to its end.", 0.0)
    ] = 1.0,
    batch_expire_first: Annotated[
        int, _bounded("The first N batches expire with half their rows unfinished.", 0)
    ] = 0,
    batch_token_limit_first: Annotated[
        int, _bounded("The first N batches fail on the enqueued-token limit.", 0)
    ] = 0,
) -> None:
    """Serve the simulated provider (OpenAI and DashScope dialects, files and
    batches) until stopped."""
    from batchrun.mock.batches import BatchFaults
    from batchrun.mock.server import serve

    with _usage_errors():
        serve(
            host=host,
            port=port,
            latency=latency,
            fail_rate=fail_rate,
            seed=seed,
            rate_limit=rate_limit,
            sliding_window=sliding_window,
            batch_faults=BatchFaults(
                seconds=batch_seconds,
                expire_first=batch_expire_first,
                token_limit_first=batch_token_limit_first,
            ),
        )


# Failures that can only be a path given wrong: a name too long for the file
# system, or a loop of symbolic links.
_BAD_PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ELOOP, errno.EISDIR, errno.ENOTDIR})
# A directory where a file should be (or the reverse) inside a state
# directory: damage that --restart, which removes either, mends.
_WRONG_KIND = frozenset({errno.EISDIR, errno.ENOTDIR})


@contextmanager
def _usage_errors() -> Iterator[None]:
    """A ``UsageError``, or an ``OSError`` that says a path given is unusable,
    becomes its message on stderr and exit code 2."""
    try:
        yield
    except UsageError as exc:
        _exit_usage(str(exc))
    except OSError as exc:
        if exc.errno not in _BAD_PATH_ERRNOS:
            raise
        message = f"{exc.strerror}: {exc.filename}"
        if exc.errno in _WRONG_KIND and STATE_SUFFIX + "/" in str(exc.filename):
            message += " (the output's state directory is damaged: run again with --restart)"
        _exit_usage(message)


def _exit_locked(exc: LockedError) -> NoReturn:
    """A command refused because a live run holds the output: exit code 4."""
    from batchrun.runner import EXIT_LOCKED

    typer.echo(f"batchrun: error: {exc}", err=True)
    raise typer.Exit(EXIT_LOCKED) from None


def _exit_usage(message: str) -> NoReturn:
    from batchrun.runner import EXIT_USAGE

    typer.echo(f"batchrun: error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE) from None


@contextmanager
def _writing_a_file() -> Iterator[None]:
    """As ``_usage_errors``, and a full disk or an I/O error while writing
    becomes its message on stderr and exit code 74 (nothing is left half
    written: the file is put in place only when complete)."""
    try:
        with _usage_errors():
            yield
    except DiskError as exc:
        from batchrun.runner import EXIT_DISK

        typer.echo(
            f"batchrun: error: {exc}. Free some space (or fix the disk), then run the same"
            " command again",
            err=True,
        )
        raise typer.Exit(EXIT_DISK) from None


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("batchrun: %(levelname)s: %(message)s"))
    logger = logging.getLogger("batchrun")
    if not logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


# The exit code of a command ended by SIGTERM, as a shell reports one.
EXIT_TERMINATED = 128 + signal.SIGTERM


def stop_on_sigterm() -> None:
    """Make SIGTERM end a command as Ctrl-C does: its clean-up runs (an
    export's or merge's temporary is removed) and it exits 143, where the
    default would kill it outright. ``run`` receives both signals itself
    while it goes (``batchrun.signals``)."""

    def terminated(signum: int, frame: object) -> None:
        raise SystemExit(EXIT_TERMINATED)

    signal.signal(signal.SIGTERM, terminated)


def main() -> None:
    """Console entry point."""
    stop_on_sigterm()
    app()
