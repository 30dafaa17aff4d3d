"""Typed params: the shipped params.yaml loads, and mistakes are rejected with clear messages."""

from pathlib import Path

import pytest
import yaml

from distill3r.config import CacheParams, Params, flatten, from_dict, load_params, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_load():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.cache.image_size[0] % 14 == 0 and params.cache.image_size[1] % 14 == 0


def test_unknown_key_names_section_key_and_file(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["learning_rate"] = 0.1
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"params\.yaml.*params\.train.*learning_rate"):
        load_params(path)


def test_wrong_type_rejected():
    with pytest.raises(ValueError, match="cache.views_per_sample: expected an integer"):
        from_dict(CacheParams, {"views_per_sample": "four"}, "cache")
    with pytest.raises(ValueError, match="expected a list"):
        from_dict(CacheParams, {"image_size": 112}, "cache")


def test_nested_sources_and_optional():
    params = from_dict(Params, {"data": {"sources": [{"kind": "images", "root": "x"}]},
                                "model": {"encoder_weights": None}})
    assert params.data.sources[0].kind == "images"
    with pytest.raises(ValueError, match=r"sources\[0\].*unknown key"):
        from_dict(Params, {"data": {"sources": [{"knd": "images"}]}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_params(bad)


def test_round_trip_and_flatten():
    params = Params()
    again = from_dict(Params, to_dict(params))
    assert again == params
    flat = flatten(to_dict(params))
    assert flat["train.lr"] == params.train.lr
    assert flat["cache.image_size"] == params.cache.image_size


def test_optional_and_mapping_types_are_named():
    with pytest.raises(ValueError, match=r"dataset_sampling\[0\]\.frame_stride: expected int "
                                         r"or null, got '4'"):
        from_dict(Params, {"cache": {"dataset_sampling": [{"dataset": "d",
                                                           "frame_stride": "4"}]}})
    with pytest.raises(ValueError, match=r"sources\[0\]\.options: expected a mapping"):
        from_dict(Params, {"data": {"sources": [{"kind": "images", "options": [1]}]}})
