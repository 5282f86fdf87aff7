"""Tenant records from a file, tenant resolution, and the usage ledger."""

from __future__ import annotations

import json

import pytest

from shardline.cluster.tenants import (
    Prices,
    Tenant,
    TenantRegistry,
    UnknownApiKey,
    Usage,
    UsageKey,
    UsageLedger,
)

YAML = """
require_api_key: false
default:
  weight: 0.5
  max_queued: 8
tenants:
  - id: acme
    api_keys: [sk-acme-1, sk-acme-2]
    weight: 2.0
    max_queued: 100
    cache_salt: acme-4f1c
    prices: {prompt: 0.5, cached: 0.05, completion: 1.5}
  - id: globex
    api_keys: [sk-globex]
"""


@pytest.fixture
def registry(tmp_path) -> TenantRegistry:
    path = tmp_path / "tenants.yaml"
    path.write_text(YAML)
    return TenantRegistry.from_file(path)


def test_load_yaml_and_resolve(registry):
    acme = registry.resolve("sk-acme-2")
    assert acme == Tenant("acme", 2.0, 100, b"acme-4f1c", Prices(0.5, 0.05, 1.5))
    assert acme.extra_keys == (b"acme-4f1c",)
    assert registry.resolve("sk-globex") == Tenant("globex", 1.0, 256, None, Prices())
    assert registry.resolve("sk-globex").extra_keys == ()
    # The key wins over the user field.
    assert registry.resolve("sk-acme-1", user="bob").tenant_id == "acme"
    # No key (or an unknown placeholder key): the user field, with the default's settings.
    bob = registry.resolve(None, user="bob")
    assert bob == Tenant("user:bob", 0.5, 8, None, Prices())
    assert registry.resolve("EMPTY", user="bob") == bob
    assert registry.resolve().tenant_id == "anonymous"
    assert registry.get("anonymous") == registry.default
    assert registry.get("acme") == acme


def test_json_file_and_require_api_key(tmp_path):
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"require_api_key": True, "tenants": [{"id": "a", "api_keys": ["k"]}]}))
    reg = TenantRegistry.from_file(path)
    assert reg.resolve("k").tenant_id == "a"
    with pytest.raises(UnknownApiKey, match="valid API key"):
        reg.resolve("nope")
    with pytest.raises(UnknownApiKey, match="an API key is required"):
        reg.resolve(None, user="bob")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"tenants": [{"id": "a", "weight": 0}]}, "weight"),
        ({"tenants": [{"id": "a", "colour": "red"}]}, "colour"),
        ({"tenants": [{"id": "a", "api_keys": ["k"]}, {"id": "b", "api_keys": ["k"]}]}, "both 'a' and 'b'"),
        ({"tenants": [{"id": "a"}, {"id": "a"}]}, "unique"),
        ({"default": {"max_queued": 0}}, "max_queued"),
    ],
)
def test_bad_config_says_what_is_wrong(data, message):
    with pytest.raises(ValueError, match=message):
        TenantRegistry.from_dict(data)


def test_bad_file_suffix(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text("")
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.json"):
        TenantRegistry.from_file(path)


def test_ledger_charges_and_drains(registry):
    ledger = UsageLedger(registry)
    u = ledger.charge("acme", "smollm2", "r1", prompt_tokens=1000, cached_tokens=800, completion_tokens=100, seconds=2.0)
    # 200 uncached * 0.5 + 800 cached * 0.05 + 100 * 1.5, per 1M
    assert u.cost == pytest.approx((200 * 0.5 + 800 * 0.05 + 100 * 1.5) / 1e6)
    ledger.charge("acme", "smollm2", "r1", 10, 0, 5, 1.0)
    ledger.charge("acme", "smollm2", "r2", 10, 0, 5, 1.0)
    drained = ledger.take_usage()
    key = UsageKey("acme", "smollm2", "r1")
    assert set(drained) == {key, UsageKey("acme", "smollm2", "r2")}
    assert (drained[key].requests, drained[key].prompt_tokens, drained[key].cached_tokens) == (2, 1010, 800)
    assert (drained[key].completion_tokens, drained[key].seconds) == (105, 3.0)
    assert ledger.take_usage() == {}
    ledger.charge("user:bob", "smollm2", "r1", 10, 0, 5, 1.0)
    assert ledger.take_usage()[UsageKey("user:bob", "smollm2", "r1")].cost == 0.0
    totals = ledger.by_tenant()
    assert totals["acme"].requests == 3 and totals["user:bob"].requests == 1
    assert ledger.totals()[key] == Usage(2, 1010, 800, 105, 3.0, drained[key].cost)


def test_ledger_rejects_impossible_usage(registry):
    with pytest.raises(ValueError, match="cached <= prompt"):
        UsageLedger(registry).charge("acme", "m", "r", 10, 11, 0, 0.0)
