"""Property tests of the config, driven by its own JSON schema: every scalar key with a range accepts
values inside it (and round-trips them through ``--set`` and YAML) and refuses values outside it with a
one-line message naming the key. Because the values are drawn from the schema, these also check that
the schema editors see says what the validator does."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from moleflow.config import PRESETS, ConfigError, apply_overrides, dump_yaml, load_config, preset, schema_text, to_dict

SCHEMA = json.loads(schema_text())
FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    """Follow ``$ref`` and the ``anyOf [X, null]`` of optional values to the schema of X."""
    if "anyOf" in node:
        node = next(n for n in node["anyOf"] if n.get("type") != "null")
    if "$ref" in node:
        node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _leaves(node: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Dotted key -> schema of every scalar value (integer, number, boolean, enum)."""
    out: dict[str, dict[str, Any]] = {}
    for name, sub in node.get("properties", {}).items():
        key, sub = f"{prefix}{name}", _resolve(sub)
        if sub.get("type") == "object" and "properties" in sub:
            out.update(_leaves(sub, key + "."))
        elif "enum" in sub or sub.get("type") in ("integer", "number", "boolean"):
            out[key] = sub
    return out


LEAVES = _leaves(SCHEMA)


def _bounds(schema: dict[str, Any]) -> dict[str, float]:
    return {k: schema[k] for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum") if k in schema}


BOUNDED = {k: s for k, s in LEAVES.items() if s.get("type") in ("integer", "number") and _bounds(s)}


@st.composite
def valid_value(draw: st.DrawFn, schema: dict[str, Any]) -> Any:
    """A value the schema allows."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return draw(st.sampled_from(schema["enum"]))
    if schema["type"] == "boolean":
        return draw(st.booleans())
    if schema["type"] == "integer":
        low = schema.get("minimum", -1000)
        step = schema.get("multipleOf", 1)
        first = math.ceil(low / step) * step
        value = first + step * draw(st.integers(0, 200))
        if schema.get("not") == {"multipleOf": 2} and value % 2 == 0:
            value += 1
        return value
    low = schema.get("minimum", schema.get("exclusiveMinimum", -1e6))
    high = schema.get("maximum", schema.get("exclusiveMaximum", 1e6))
    return draw(
        st.floats(
            low,
            high,
            exclude_min="exclusiveMinimum" in schema,
            exclude_max="exclusiveMaximum" in schema,
            allow_nan=False,
            allow_infinity=False,
        )
    )


@st.composite
def invalid_value(draw: st.DrawFn, schema: dict[str, Any]) -> Any:
    """A number just or far outside one of the schema's bounds."""
    bound, limit = draw(st.sampled_from(sorted(_bounds(schema).items())))
    gap = draw(st.sampled_from([0, 1, 7, 1000])) if schema["type"] == "integer" else draw(st.floats(0, 1e6))
    if bound == "minimum":
        return limit - max(gap, 1) if schema["type"] == "integer" else limit - max(gap, 1e-3)
    if bound == "maximum":
        return limit + max(gap, 1) if schema["type"] == "integer" else limit + max(gap, 1e-3)
    if bound == "exclusiveMinimum":
        return limit - gap
    return limit + gap


def _router_rules_hold(name: str, values: dict[str, Any]) -> bool:
    """RouterConfig's cross-field rules (tested in tests/test_routing.py): patch_gaussian needs the mahalanobis
    metric; a pooled covariance needs it and an image-level feature."""
    router = {**to_dict(preset(name).router), **{k[7:]: v for k, v in values.items() if k.startswith("router.")}}
    mahalanobis, gaussian = router["metric"] == "mahalanobis", router["feature"] == "patch_gaussian"
    return (mahalanobis or not gaussian) and (router["covariance"] != "pooled" or (mahalanobis and not gaussian))


def _start(key: str, name: str, value: Any = None):
    assume(not (name == "v5" and key.startswith("model.scale_context")))  # the ViT has no multi-layer maps
    assume(_router_rules_hold(name, {key: value}) if key.startswith("router.") else True)
    return preset(name)


def _get(cfg, key: str) -> Any:
    node: Any = to_dict(cfg)
    for part in key.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("name", sorted(PRESETS))
@FAST
@given(data=st.data())
def test_values_inside_the_range_round_trip_through_set_and_yaml(name, data, tmp_path):
    key = data.draw(st.sampled_from(sorted(LEAVES)))
    value = data.draw(valid_value(LEAVES[key]))
    cfg = apply_overrides(_start(key, name, value), [f"{key}={json.dumps(value)}"])
    assert _get(cfg, key) == value
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    again = load_config(path)
    assert again == cfg and dump_yaml(again) == path.read_text()


@FAST
@given(data=st.data())
def test_values_outside_the_range_are_refused_naming_the_key(data):
    key = data.draw(st.sampled_from(sorted(BOUNDED)))
    value = data.draw(invalid_value(BOUNDED[key]))
    with pytest.raises(ConfigError) as info:
        apply_overrides(_start(key, "offline"), [f"{key}={json.dumps(value)}"])
    (line,) = str(info.value).splitlines()
    assert line.startswith(f"{key}: must be ") and line.endswith(f"got {value!r}")


@FAST
@given(overrides=st.lists(st.sampled_from(sorted(LEAVES)), min_size=1, max_size=4, unique=True), data=st.data())
def test_several_overrides_compose_in_any_order(overrides, data):
    values = {k: data.draw(valid_value(LEAVES[k])) for k in overrides}
    assume(_router_rules_hold("offline", values))
    items = [f"{k}={json.dumps(v)}" for k, v in values.items()]
    forward = apply_overrides(preset("offline"), items)
    backward = apply_overrides(preset("offline"), items[::-1])
    assert forward == backward
    assert all(_get(forward, k) == v for k, v in values.items())
