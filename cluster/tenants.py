"""Tenants: who a request belongs to, its fair-share weight, cache salt and prices.

Plain Python (pydantic validates the file at the config edge). A tenant is
named by the request's API key when the server knows it, else by the request's
`user` field (tenant `user:<user>`, with the default record's settings), else
it is the anonymous default tenant. A cache salt comes only from the server's
record, never from the request: it goes into the engine's block hashes
(`extra_keys=(salt,)`), so a salted tenant's blocks never match anyone else's.

The tenants file (YAML or JSON):

    require_api_key: false        # true: requests without a known key are refused (401)
    default:                      # the anonymous tenant and the template for `user:` tenants
      weight: 1.0
      max_queued: 64
    tenants:
      - id: acme
        api_keys: [sk-acme-1]
        weight: 2.0               # fair share relative to other tenants
        max_queued: 512           # requests it may have queued; past it: 429
        cache_salt: acme-4f1c     # isolates its prefix cache
        prices: {prompt: 0.50, cached: 0.05, completion: 1.50}   # per 1M tokens

`UsageLedger` charges every finished request's tokens and time to (tenant,
model, replica); the owner drains what accrued with `take_usage()`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ANONYMOUS_ID = "anonymous"
USER_PREFIX = "user:"


class UnknownApiKey(ValueError):
    """The server requires a known API key and the request has none (HTTP 401)."""


@dataclass(slots=True, frozen=True)
class Prices:
    """Price per 1M tokens, in the operator's currency."""

    # Prompt tokens computed (not served from the prefix cache).
    prompt: float = 0.0
    # Prompt tokens served from the prefix cache.
    cached: float = 0.0
    completion: float = 0.0


@dataclass(slots=True, frozen=True)
class Tenant:
    """One tenant's record."""

    tenant_id: str
    # Fair-share weight in the global queue (relative).
    weight: float = 1.0
    # Requests it may have queued at once.
    max_queued: int = 256
    # Mixed into its block hashes; None: shares the cache with other unsalted tenants.
    cache_salt: bytes | None = None
    prices: Prices = Prices()

    @property
    def extra_keys(self) -> tuple[bytes, ...]:
        """The engine's `extra_keys` for this tenant's block hashes."""
        return (self.cache_salt,) if self.cache_salt else ()


class _PricesModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: float = Field(0.0, ge=0, description="per 1M uncached prompt tokens")
    cached: float = Field(0.0, ge=0, description="per 1M prompt tokens served from cache")
    completion: float = Field(0.0, ge=0, description="per 1M generated tokens")


class _DefaultModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, gt=0, description="fair-share weight")
    max_queued: int = Field(64, ge=1, description="requests it may have queued")
    cache_salt: str | None = Field(None, min_length=1, description="isolates its prefix cache")
    prices: _PricesModel = Field(default_factory=_PricesModel)


class _TenantModel(_DefaultModel):
    id: str = Field(min_length=1, description="tenant id")
    api_keys: list[str] = Field(default_factory=list, description="API keys that name this tenant")
    max_queued: int = Field(256, ge=1, description="requests it may have queued")


class _FileModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    require_api_key: bool = False
    default: _DefaultModel = Field(default_factory=_DefaultModel)
    tenants: list[_TenantModel] = Field(default_factory=list)


def _tenant(tenant_id: str, m: _DefaultModel) -> Tenant:
    return Tenant(
        tenant_id=tenant_id,
        weight=m.weight,
        max_queued=m.max_queued,
        cache_salt=m.cache_salt.encode() if m.cache_salt else None,
        prices=Prices(m.prices.prompt, m.prices.cached, m.prices.completion),
    )


class TenantRegistry:
    """API key -> tenant, tenant id -> record.

    Args:
        tenants: configured tenants.
        api_keys: API key -> tenant id.
        default: the anonymous tenant; `user:` tenants copy its settings.
        require_api_key: refuse requests without a known key (`UnknownApiKey`).
    """

    def __init__(
        self,
        tenants: Sequence[Tenant] = (),
        api_keys: Mapping[str, str] | None = None,
        default: Tenant = Tenant(ANONYMOUS_ID, max_queued=64),
        require_api_key: bool = False,
    ):
        self._tenants = {t.tenant_id: t for t in tenants}
        if len(self._tenants) != len(tenants):
            raise ValueError("tenant ids must be unique")
        self._keys = dict(api_keys or {})
        for key, tid in self._keys.items():
            if tid not in self._tenants:
                raise ValueError(f"API key ...{key[-4:]} names unknown tenant {tid!r}")
        self.default = default
        self.require_api_key = require_api_key

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TenantRegistry":
        """From the parsed file (see the module docstring); ValueError on a bad field."""
        try:
            m = _FileModel.model_validate(data)
        except ValidationError as e:
            raise ValueError(f"invalid tenants config: {e}") from None
        tenants = [_tenant(t.id, t) for t in m.tenants]
        keys: dict[str, str] = {}
        for t in m.tenants:
            for key in t.api_keys:
                if key in keys:
                    raise ValueError(f"API key ...{key[-4:]} is given to both {keys[key]!r} and {t.id!r}")
                keys[key] = t.id
        return cls(tenants, keys, _tenant(ANONYMOUS_ID, m.default), m.require_api_key)

    @classmethod
    def from_file(cls, path: str | Path) -> "TenantRegistry":
        """Load a `.yaml`/`.yml` or `.json` tenants file."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"tenants file must end in .yaml, .yml or .json, got {path.name!r}")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(data)

    def resolve(self, api_key: str | None = None, user: str | None = None) -> Tenant:
        """The tenant of a request: its known API key, else its `user` field, else anonymous.

        An unknown key counts as no key (clients often send a placeholder),
        unless `require_api_key`, which refuses it.
        """
        tid = self._keys.get(api_key) if api_key else None
        if tid is not None:
            return self._tenants[tid]
        if self.require_api_key:
            raise UnknownApiKey("a valid API key is required" if api_key else "an API key is required")
        if user:
            return self.get(USER_PREFIX + user)
        return self.default

    def get(self, tenant_id: str) -> Tenant:
        """A tenant's record; unknown ids get the default record's settings."""
        tenant = self._tenants.get(tenant_id)
        if tenant is not None:
            return tenant
        if tenant_id == self.default.tenant_id:
            return self.default
        return Tenant(tenant_id, self.default.weight, self.default.max_queued, self.default.cache_salt, self.default.prices)

    def tenants(self) -> list[Tenant]:
        return list(self._tenants.values())


@dataclass(slots=True, frozen=True)
class UsageKey:
    """What a charge is attributed to."""

    tenant_id: str
    model: str
    replica_id: str


@dataclass(slots=True)
class Usage:
    """Accrued usage; prompt tokens include cached ones, as OpenAI counts them."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    # Seconds from binding to the last token, summed.
    seconds: float = 0.0
    cost: float = 0.0

    def add(self, other: "Usage") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def price_of(prices: Prices, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
    """Cost of one request's tokens."""
    return (
        (prompt_tokens - cached_tokens) * prices.prompt
        + cached_tokens * prices.cached
        + completion_tokens * prices.completion
    ) / 1e6


@dataclass
class UsageLedger:
    """Charges tokens and time to (tenant, model, replica). Pure: no I/O.

    Args:
        registry: where prices come from.
    """

    registry: TenantRegistry
    _totals: dict[UsageKey, Usage] = field(default_factory=dict)
    _pending: dict[UsageKey, Usage] = field(default_factory=dict)

    def charge(
        self,
        tenant_id: str,
        model: str,
        replica_id: str,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
        seconds: float,
    ) -> Usage:
        """Record one finished request; returns its charge."""
        if min(prompt_tokens, cached_tokens, completion_tokens) < 0 or cached_tokens > prompt_tokens or seconds < 0:
            raise ValueError(
                f"usage must be non-negative with cached <= prompt, got prompt={prompt_tokens}, "
                f"cached={cached_tokens}, completion={completion_tokens}, seconds={seconds}"
            )
        prices = self.registry.get(tenant_id).prices
        usage = Usage(
            1, prompt_tokens, cached_tokens, completion_tokens, seconds,
            price_of(prices, prompt_tokens, cached_tokens, completion_tokens),
        )
        key = UsageKey(tenant_id, model, replica_id)
        for book in (self._totals, self._pending):
            book.setdefault(key, Usage()).add(usage)
        return usage

    def take_usage(self) -> dict[UsageKey, Usage]:
        """Usage accrued since the last call (for export), oldest key first."""
        pending, self._pending = self._pending, {}
        return pending

    def totals(self) -> dict[UsageKey, Usage]:
        """Usage since the ledger was created (copies)."""
        return {k: Usage(**{f.name: getattr(v, f.name) for f in fields(v)}) for k, v in self._totals.items()}

    def by_tenant(self) -> dict[str, Usage]:
        out: dict[str, Usage] = {}
        for key, usage in self._totals.items():
            out.setdefault(key.tenant_id, Usage()).add(usage)
        return out
