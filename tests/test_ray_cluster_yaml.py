"""deploy/ray/cluster.yaml is a valid `ray up` config (the JSON schema shipped in the Ray wheel,
and Ray's own check after filling in defaults), and its node types offer the custom resources
the launcher asks for by default."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from deploy.ray.launch import build_parser

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "ray" / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_the_schema_in_the_ray_wheel(config):
    jsonschema.validate(config, SCHEMA)
    broken = copy.deepcopy(config)
    broken["available_node_types"]["target_gpu8"]["resources"]["target_device"] = "8"  # the schema wants integers
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_ray_accepts_the_config_with_its_defaults_filled_in(config):
    # Private helpers, but the ones `ray up` itself runs before it launches anything.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_node_types_offer_the_resources_the_launcher_asks_for(config):
    defaults = build_parser().parse_args([])
    types = config["available_node_types"]
    offering = {name: set(spec["resources"]) for name, spec in types.items()}
    assert any(defaults.target_resource in r for r in offering.values())
    assert any(defaults.draft_resource in r for r in offering.values())
    assert "public_ingress" in offering[config["head_node_type"]]  # README: --orchestrator-resource public_ingress
    for spec in types.values():
        resources = spec["resources"]
        # One rank or draft worker per GPU: the launcher gives each actor one GPU and one device unit.
        devices = resources.get(defaults.target_resource, 0) + resources.get(defaults.draft_resource, 0)
        assert devices == resources.get("GPU", 0)
