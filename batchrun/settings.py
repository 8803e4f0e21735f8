"""The settings of a run, one row each: the one place a setting is named.

A row gives the job-file key (also the key of ``build_config``'s mapping),
the flag (the key with dashes, unless ``decls`` spells it otherwise), the
type the flag parses, the default, the help line, the job file's table
(``section``), the ``--help`` panel, and the ``RunConfig`` field it fills
(``target``: ``"limits.max_async"`` is ``RunConfig.limits.max_async``).
``cli`` builds the ``run`` command's options from this table, ``jobfile``
checks job files and builds the ``RunConfig`` with it, and ``config`` takes
its defaults and the flags its messages name from it.

The rule the table keeps: every setting is a flag and a job-file key of the
same name, and flags override the job file. The only exceptions are marked
here: ``params`` (a table in the job file, ``--param KEY=JSON`` on the
command line), and ``restart`` and ``retry_failed`` (what one invocation
does, not a property of the job: ``job_key=False``).

Nothing here imports the rest of batchrun: ``batchrun --version`` stays fast
and every layer may read the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

# The only spellings of these values: the tuples below are derived from them.
ProviderName = Literal["openai", "dashscope", "mock"]
# off: results reach the OS at once; batch: fsync per written batch; always: per result.
FsyncPolicy = Literal["off", "batch", "always"]
# online: one request per row; batch: the provider's Batch API (half price, up to 24 h).
Mode = Literal["online", "batch"]
# What batch mode does with rows of an expired or cancelled batch: resubmit them, or send online.
Fallback = Literal["none", "online"]
LoopName = Literal["auto", "asyncio", "uvloop"]

PROVIDERS: tuple[ProviderName, ...] = get_args(ProviderName)
FSYNC_POLICIES: tuple[FsyncPolicy, ...] = get_args(FsyncPolicy)
MODES: tuple[Mode, ...] = get_args(Mode)
FALLBACKS: tuple[Fallback, ...] = get_args(Fallback)
LOOPS: tuple[LoopName, ...] = get_args(LoopName)

# The job file's tables: a key may stand at the top level or in its own table.
SECTIONS = ("limits", "timeouts", "retry", "costs", "batch")

# Panels of ``batchrun run --help`` (None: the general "Options").
LIMITS = "Limits (DashScope SDK knobs)"
TIMEOUTS = "Timeouts (seconds)"
RETRY = "Retries"
RESUME = "Resume and durability"
PAYING = "Paying once"
BATCH = "Batch mode (the provider's Batch API, half price)"

MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting. ``help`` may hold ``{default}`` and ``{default_mib}``
    (the default in MiB) and ``{choices}`` ("a | b | c")."""

    key: str
    type: type[Any]  # what the flag parses: str, int, float, bool, Path, list
    default: Any  # None: unset (nothing, or derived from other settings)
    help: str
    target: str = ""  # the RunConfig field; "" means the key itself
    section: str = "run"  # the job file's table ("run": top level only)
    panel: str | None = None
    decls: tuple[str, ...] = ()  # the flag's spellings when not --key (or --key/--no-key)
    # Further spellings, accepted but not shown in --help: the job key's own
    # name, where the shown flag (older than the rule) differs from it.
    hidden_decls: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()  # further job keys for the same setting
    choices: tuple[str, ...] = ()
    text: bool = False  # checked as non-empty text before anything else
    argument: bool = False  # a positional argument on the command line
    job_key: bool = True  # False: a flag only (what one invocation does)

    @property
    def field(self) -> str:
        """The dotted ``RunConfig`` field this setting fills."""
        return self.target or self.key

    @property
    def flag(self) -> str:
        """The flag's name as messages give it."""
        return self.key.upper() if self.argument else self.flag_decls[0].split("/")[0]

    @property
    def flag_decls(self) -> tuple[str, ...]:
        """The flag's spellings as ``typer.Option`` takes them."""
        if self.decls:
            return self.decls
        name = "--" + self.key.replace("_", "-")
        return (f"{name}/--no-{name[2:]}",) if self.type is bool else (name,)

    @property
    def help_text(self) -> str:
        """``help`` with its placeholders filled in."""
        default = self.default
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        mib = f"{default // MIB} MiB" if isinstance(default, int) else ""
        return self.help.format(default=shown, default_mib=mib, choices=" | ".join(self.choices))


def _s(key: str, type_: type[Any], default: Any, help_: str, **more: Any) -> Setting:
    return Setting(key, type_, default, help_, **more)


SETTINGS: tuple[Setting, ...] = (
    # The run: what to send where, and what to write.
    _s("input", Path, None, "JSONL (or .jsonl.gz) requests.", argument=True, text=True),
    _s(
        "out",
        Path,
        None,
        "Output JSONL, one line per input line.",
        decls=("--out", "-o"),
        text=True,
    ),
    _s("provider", str, "mock", "{choices} (default {default}).", choices=PROVIDERS, text=True),
    _s(
        "base_url",
        list[str],
        (),
        "API base URL, e.g. https://host/v1; repeat it to spread over replicas.",
        target="base_urls",
        aliases=("base_urls",),
    ),
    _s("model", str, None, "Model for lines that name none.", text=True),
    _s("api_key_env", str, None, "Environment variable holding the API key.", text=True),
    _s(
        "params",
        list[str],
        None,
        "Default request parameter KEY=JSON (repeatable).",
        decls=("--param",),
    ),
    _s(
        "ca_bundle",
        Path,
        None,
        "PEM file of CA certificates to trust besides the system's (a private CA).",
        text=True,
    ),
    _s(
        "reorder_window",
        int,
        10_000,
        "Rows held at most while an earlier one is unfinished ({default}).",
    ),
    _s(
        "reorder_bytes",
        int,
        256 * MIB,
        "Bytes of results kept in memory while an earlier row is unfinished; past it"
        " they wait in the journal ({default}: {default_mib}).",
    ),
    _s("progress", bool, True, "Progress bar or log lines."),
    _s(
        "summary",
        Path,
        None,
        "Also write the summary as JSON here.",
        target="summary_path",
        text=True,
    ),
    _s("shard", str, None, "Process shard I of N (I/N, from 0): every N-th row, from row I."),
    _s(
        "metrics_file",
        Path,
        None,
        "Prometheus textfile, rewritten during the run (node_exporter).",
        text=True,
    ),
    _s(
        "loop",
        str,
        "auto",
        "Event loop: auto (default: uvloop where installed), asyncio or uvloop.",
        choices=LOOPS,
        text=True,
    ),
    _s(
        "response_schema",
        Path,
        None,
        "JSON Schema file: ask for JSON answers and check each (online, retry those that fail).",
        text=True,
    ),
    # Limits: the DashScope SDK's knobs and defaults, and the rate limits.
    _s(
        "connection_pool_size",
        int,
        32,
        "Connections kept ({default}).",
        target="limits.pool_size",
        section="limits",
        panel=LIMITS,
    ),
    _s(
        "max_async_requests",
        int,
        32,
        "Requests in flight ({default}).",
        target="limits.max_async",
        section="limits",
        panel=LIMITS,
    ),
    _s(
        "max_async_requests_per_host",
        int,
        32,
        "Requests in flight per host ({default}).",
        target="limits.per_host",
        section="limits",
        panel=LIMITS,
    ),
    _s(
        "rpm",
        float,
        None,
        "Requests per minute, spread smoothly.",
        target="limits.rpm",
        section="limits",
        panel=LIMITS,
    ),
    _s(
        "tpm",
        float,
        None,
        "Tokens per minute (estimated, then corrected).",
        target="limits.tpm",
        section="limits",
        panel=LIMITS,
    ),
    _s(
        "shared_limits",
        str,
        None,
        "redis://HOST:PORT/DB (or rediss://): share --rpm, --tpm and Retry-After pauses"
        " with every process using it (password in the URL or BATCHRUN_REDIS_PASSWORD).",
        target="limits.shared_limits",
        section="limits",
        panel=LIMITS,
    ),
    _s(
        "limits_key",
        str,
        None,
        "Which shared budget (default: provider, host and model).",
        target="limits.limits_key",
        section="limits",
        panel=LIMITS,
    ),
    _s(
        "adaptive_concurrency",
        bool,
        True,
        "Start low, grow while answers are good, halve on 429/503/timeouts (default on).",
        target="limits.adaptive",
        section="limits",
        panel=LIMITS,
        hidden_decls=("--adaptive/--no-adaptive",),  # the short spelling of earlier releases
    ),
    _s(
        "max_response_bytes",
        int,
        64 * MIB,
        "Largest response body read; a larger one fails its row ({default_mib}).",
        section="limits",
        panel=LIMITS,
    ),
    # Timeouts, in seconds (DashScope SDK defaults).
    _s(
        "connect_timeout",
        float,
        120.0,
        "Connecting ({default}).",
        target="timeouts.connect",
        section="timeouts",
        panel=TIMEOUTS,
    ),
    _s(
        "read_timeout",
        float,
        300.0,
        "Each wait for response bytes ({default}).",
        target="timeouts.read",
        section="timeouts",
        panel=TIMEOUTS,
    ),
    _s(
        "write_timeout",
        float,
        60.0,
        "Sending the request body ({default}).",
        target="timeouts.write",
        section="timeouts",
        panel=TIMEOUTS,
    ),
    _s(
        "request_timeout",
        float,
        600.0,
        "One whole attempt: connect, send, wait and read ({default}).",
        target="timeouts.request",
        section="timeouts",
        panel=TIMEOUTS,
    ),
    _s(
        "connection_idle_timeout",
        float,
        300.0,
        "Keeping an idle connection ({default}).",
        target="timeouts.idle",
        section="timeouts",
        panel=TIMEOUTS,
    ),
    # Retries of one row.
    _s(
        "max_attempts",
        int,
        6,
        "Attempts per row ({default}).",
        target="retry.max_attempts",
        section="retry",
        panel=RETRY,
    ),
    _s(
        "retry_budget",
        float,
        900.0,
        "Seconds per row from its first attempt, in-flight attempt included ({default}).",
        target="retry.budget",
        section="retry",
        panel=RETRY,
    ),
    _s(
        "backoff_initial",
        float,
        1.0,
        "First backoff wait in seconds, doubling with full jitter ({default}).",
        target="retry.backoff_initial",
        section="retry",
        panel=RETRY,
    ),
    _s(
        "backoff_max",
        float,
        60.0,
        "Longest backoff wait in seconds; also caps a run-wide Retry-After pause ({default}).",
        target="retry.backoff_max",
        section="retry",
        panel=RETRY,
    ),
    # Paying once: the result store, the prices and the budget.
    _s(
        "cache",
        Path,
        None,
        "Result store shared by jobs: rows answered there are not sent again.",
        panel=PAYING,
        text=True,
    ),
    _s(
        "max_cost",
        float,
        None,
        "Stop sending once the spend would pass this (exit 5); needs [costs] prices.",
        target="costs.max_cost",
        section="costs",
        panel=PAYING,
    ),
    _s(
        "price_input_per_million",
        float,
        None,
        "Price of a million input tokens, in the provider's currency.",
        target="costs.price_input_per_million",
        section="costs",
        panel=PAYING,
    ),
    _s(
        "price_output_per_million",
        float,
        None,
        "Price of a million output tokens, in the provider's currency.",
        target="costs.price_output_per_million",
        section="costs",
        panel=PAYING,
    ),
    _s(
        "batch_price_share",
        float,
        0.5,
        "Share of those prices a --mode batch answer costs ({default}: half price).",
        target="costs.batch_price_share",
        section="costs",
        panel=PAYING,
    ),
    _s(
        "context_limit",
        int,
        None,
        "The model's context window in tokens: validate reports the rows past it.",
        target="costs.context_limit",
        section="costs",
        panel=PAYING,
    ),
    # Resume and durability.
    _s(
        "restart",
        bool,
        False,
        "Discard this output's unfinished state; start over (replacing an OUT without state).",
        panel=RESUME,
        decls=("--restart",),
        job_key=False,
    ),
    _s(
        "retry_failed",
        bool,
        False,
        "Send again the rows of a finished output whose error is retryable.",
        panel=RESUME,
        decls=("--retry-failed",),
        job_key=False,
    ),
    _s(
        "fsync",
        str,
        "off",
        "off (default): results reach the OS at once; batch: the disk too,"
        " per written batch; always: per result.",
        panel=RESUME,
        choices=FSYNC_POLICIES,
        text=True,
    ),
    _s(
        "grace",
        float,
        3.0,
        "Seconds in-flight requests get after SIGINT/SIGTERM ({default}).",
        panel=RESUME,
    ),
    # Batch mode.
    _s(
        "mode",
        str,
        "online",
        "online (default), or batch: the provider's Batch API.",
        panel=BATCH,
        choices=MODES,
    ),
    _s(
        "batch_rows",
        int,
        50_000,
        "Requests per batch file ({default}).",
        target="batch.rows",
        section="batch",
        panel=BATCH,
    ),
    _s(
        "batch_bytes",
        int,
        None,
        "Bytes per batch file (default: the provider's cap).",
        target="batch.bytes",
        section="batch",
        panel=BATCH,
    ),
    _s(
        "poll_interval",
        float,
        30.0,
        "Seconds between polls of running batches ({default}; at most a day).",
        target="batch.poll_interval",
        section="batch",
        panel=BATCH,
    ),
    _s(
        "keep_files",
        bool,
        False,
        "Keep the uploaded and result files on the provider.",
        target="batch.keep_files",
        section="batch",
        panel=BATCH,
    ),
    _s(
        "fallback",
        str,
        "none",
        "none (default): resubmit an expired batch's rows; online: send them online.",
        target="batch.fallback",
        section="batch",
        panel=BATCH,
        choices=FALLBACKS,
    ),
)

BY_KEY: dict[str, Setting] = {setting.key: setting for setting in SETTINGS}
BY_FIELD: dict[str, Setting] = {setting.field: setting for setting in SETTINGS}


def default(key: str) -> Any:
    """The default of setting ``key`` (for the dataclasses in ``config``)."""
    return BY_KEY[key].default


def flag(field: str) -> str:
    """The flag of the setting filling ``RunConfig`` field ``field`` (dotted)."""
    return BY_FIELD[field].flag


def job_sections() -> dict[str, str]:
    """Every job-file key (aliases too) and the table it belongs to."""
    sections = {}
    for setting in SETTINGS:
        if setting.job_key:
            for key in (setting.key, *setting.aliases):
                sections[key] = setting.section
    return sections
