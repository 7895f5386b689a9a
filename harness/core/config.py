"""The harness's configuration, resolved once into a frozen object: CLI > ini > env > default."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, cast

from harness.core.cell import (
    BROKERS,
    DEFAULT_BROKERS,
    DEFAULT_LOOP_MODES,
    DEFAULT_POOLS,
    IN_PROCESS,
    MATRIX_MODES,
    POOLS,
    RUNNERS,
    SERVICE_MODES,
    Cell,
    RunnerName,
    ServiceModeName,
    mode_applies,
)
from harness.core.errors import UsageError
from harness.core.shard import Shard, ShardError, parse_shard

__all__ = [
    "ConfigError",
    "HarnessConfig",
    "check_image",
    "parse_choices",
]

# The same defaults as harness.services (which this module must not import: it is loaded by
# every pytest process before anything else); tests/test_config.py keeps them equal.
DEFAULT_POSTGRES_IMAGE: Final = "postgres:16-alpine"
DEFAULT_REDIS_IMAGE: Final = "redis:7-alpine"


class ConfigError(UsageError):
    """A harness option has a value it cannot use; the message names the fix."""


# An image reference as Docker reads it: [registry[:port]/]name[/name...][:tag][@digest].
_IMAGE_REF: Final = re.compile(
    r"(?:[a-zA-Z0-9.-]+(?::\d+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
    r"(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
)


def check_image(value: str, *, option: str) -> str:
    """`value` if it reads as a Docker image reference, else a ConfigError naming `option`."""
    if not _IMAGE_REF.fullmatch(value):
        raise ConfigError(
            f"{option}: {value!r} is not a Docker image reference; give one such as "
            f"{DEFAULT_POSTGRES_IMAGE!r} (lower-case name, optional :tag)"
        )
    return value


def parse_choices(
    raw: str | Iterable[str] | None,
    *,
    option: str,
    allowed: tuple[str, ...],
    default: tuple[str, ...],
) -> tuple[str, ...]:
    """``"a,b"`` or ``["a", "b"]`` or ``"all"`` into a de-duplicated tuple in ``allowed`` order."""
    if raw is None:
        return default
    items = [raw] if isinstance(raw, str) else list(raw)
    values: list[str] = []
    for item in items:
        values.extend(v.strip() for v in item.split(",") if v.strip())
    if not values:
        return default
    if "all" in values:
        return allowed
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ConfigError(
            f"{option}: unknown value(s) {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(allowed)} (comma-separated) or 'all'"
        )
    return tuple(v for v in allowed if v in values)


def _runner_error(value: str) -> str:
    return (
        f"--runner: unknown value {value!r}; choose from {', '.join(RUNNERS)} (fixed: the "
        "service's run_async_safe; prefix: the pre-fix plain asyncio.run(), to see the "
        "running_* cells fail)"
    )


FORK_SERVER_VALUES: Final = ("on", "off")


@dataclass(frozen=True)
class HarnessConfig:
    """Everything the harness needs to know about a session, decided in one place."""

    services: ServiceModeName = "auto"
    loop_modes: tuple[str, ...] = DEFAULT_LOOP_MODES
    pools: tuple[str, ...] = DEFAULT_POOLS
    brokers: tuple[str, ...] = DEFAULT_BROKERS
    runner: RunnerName = "fixed"
    # The docker backend's images (the official ones unless set; scripts/docker-engine.sh
    # builds stand-ins where no registry answers).
    postgres_image: str = DEFAULT_POSTGRES_IMAGE
    redis_image: str = DEFAULT_REDIS_IMAGE
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ), repr=False)
    # --shard K/N: this session runs shard K's cells only (harness.core.shard).
    shard: Shard | None = None
    # --fork-server on|off: the farm forks its workers from a fork server (off: exec each).
    fork_server: bool = True

    def __post_init__(self) -> None:
        if self.services not in SERVICE_MODES:
            raise ConfigError(
                f"--services: unknown value {self.services!r}; choose from "
                f"{', '.join(SERVICE_MODES)} (auto: docker where an engine answers, else local "
                "binaries, else an error listing what was tried)"
            )
        if self.runner not in RUNNERS:
            raise ConfigError(_runner_error(self.runner))
        for name in ("postgres_image", "redis_image"):
            check_image(getattr(self, name), option=f"--{name.replace('_', '-')}")

    @classmethod
    def resolve(
        cls,
        *,
        get_option: Callable[[str], object | None],
        get_ini: Callable[[str], object | None],
        env: Mapping[str, str] | None = None,
    ) -> HarnessConfig:
        """Resolve every setting from the command line, then the ini file, then ``HARNESS_*``.

        An error names where the bad value came from: the flag, the ini key or the variable.
        """
        environ = dict(os.environ if env is None else env)
        sources: dict[str, str] = {}

        def pick(name: str) -> str | None:
            candidates = (
                (f"--{name.replace('_', '-')}", get_option(name)),
                (f"harness_{name} (ini)", get_ini(name)),
                (f"HARNESS_{name.upper()}", environ.get(f"HARNESS_{name.upper()}")),
            )
            for label, source in candidates:
                if source not in (None, "", []):
                    sources[name] = label
                    if isinstance(source, list | tuple):
                        return ",".join(str(s) for s in source)
                    return str(source)
            return None

        services = pick("services") or "auto"
        if services not in SERVICE_MODES:
            raise ConfigError(
                f"{sources['services']}: unknown value {services!r}; choose from "
                f"{', '.join(SERVICE_MODES)}"
            )
        runner = pick("runner") or "fixed"
        if runner not in RUNNERS:
            raise ConfigError(_runner_error(runner).replace("--runner", sources["runner"], 1))
        images = {}
        for name, default in (
            ("postgres_image", DEFAULT_POSTGRES_IMAGE),
            ("redis_image", DEFAULT_REDIS_IMAGE),
        ):
            images[name] = check_image(pick(name) or default, option=sources.get(name, name))
        loop_modes = pick("loop_mode")
        pools = pick("pool")
        brokers = pick("broker")
        fork_server = pick("fork_server") or "on"
        if fork_server not in FORK_SERVER_VALUES:
            raise ConfigError(
                f"{sources['fork_server']}: unknown value {fork_server!r}; choose from "
                f"{', '.join(FORK_SERVER_VALUES)} (on: fork the workers of the solo, threads and "
                "prefork pools from a process that has imported Celery; off: exec each worker)"
            )
        shard_value = pick("shard")
        shard_option = sources.get("shard", "--shard")
        try:
            shard = parse_shard(shard_value, option=shard_option) if shard_value else None
        except ShardError as exc:
            raise ConfigError(str(exc)) from None
        config = cls(
            services=cast(ServiceModeName, services),
            loop_modes=parse_choices(
                loop_modes,
                option=sources.get("loop_mode", "--loop-mode"),
                allowed=MATRIX_MODES,
                default=DEFAULT_LOOP_MODES,
            ),
            pools=parse_choices(
                pools,
                option=sources.get("pool", "--pool"),
                allowed=POOLS,
                default=DEFAULT_POOLS,
            ),
            brokers=parse_choices(
                brokers,
                option=sources.get("broker", "--broker"),
                allowed=BROKERS,
                default=DEFAULT_BROKERS,
            ),
            runner=cast(RunnerName, runner),
            postgres_image=images["postgres_image"],
            redis_image=images["redis_image"],
            env=environ,
            shard=shard,
            fork_server=fork_server == "on",
        )
        if shard is not None:
            try:
                config.cells()
            except ShardError as exc:
                raise ConfigError(str(exc).replace("--shard", shard_option, 1)) from None
        return config

    def cells(self) -> list[Cell]:
        """The matrix cells this session runs: the selection's, or with ``shard`` its part."""
        selected = self.all_cells()
        return selected if self.shard is None else self.shard.cells(selected)

    def all_cells(self) -> list[Cell]:
        """Every cell the selection names, whatever the shard.

        ``in_process`` runs the task's function in the test process (no worker, no broker), so
        it is a single cell with pool and broker ``-``. A mode that exists on some pools only
        (``inherited_loop``: prefork) has no cell on the others.
        """
        cells: list[Cell] = []
        for mode in self.loop_modes:
            if mode == IN_PROCESS:
                cells.append(Cell(mode))
                continue
            cells.extend(
                Cell(mode, pool, broker)
                for broker in self.brokers
                for pool in self.pools
                if mode_applies(mode, pool)
            )
        return cells
