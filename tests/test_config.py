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


def test_dataclass_defaults_are_the_shipped_params():
    """One source of defaults: ``Params()`` is exactly ``params.yaml``."""
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert to_dict(Params()) == shipped
    Params().validate()


PAPER_KEYS = {
    "cache.image_size", "cache.views_per_sample", "cache.max_samples_per_scene",
    "teacher.name", "model.name", "model.encoder_weights",
    "train.accelerator", "train.devices", "train.strategy", "train.accumulate_grad_batches",
    "train.batch_size", "train.max_steps", "train.optimizer", "train.lr", "train.warmup_steps", "train.min_lr",
    "train.num_workers", "train.val_every_steps", "train.checkpoint_every_steps", "infer.size",
    "bench.profile", "bench.device", "bench.threads", "bench.head_chunk_size",
}


def test_paper_params_load_and_differ_only_in_the_published_setup():
    paper = flatten(to_dict(load_params(ROOT / "params-paper.yaml")))
    demo = flatten(to_dict(load_params(ROOT / "params.yaml")))
    assert paper.keys() == demo.keys()
    assert {k for k in paper if paper[k] != demo[k]} == PAPER_KEYS
    assert paper["model.name"] == "paper" and paper["teacher.name"] == "fast3r"


def test_choice_error_names_key_value_and_choices(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["loss"]["weighting"] = "teachr"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError) as err:
        load_params(path)
    assert str(err.value) == (f"{path}: params.loss.weighting: 'teachr' is not one of "
                              "'teacher', 'none', 'student'")


@pytest.mark.parametrize("section, key, value, match", [
    ("train", "precision", "bf16", r"params\.train\.precision: 'bf16' is not one of 'bf16-mixed'"),
    ("cache", "sampling", "every", r"params\.cache\.sampling: 'every' is not one of"),
    ("cache", "compression", "zstd", r"params\.cache\.compression: 'zstd' is not one of"),
    ("teacher", "dtype", "fp16", r"params\.teacher\.dtype: 'fp16' is not one of 'bf16', 'fp32'"),
    ("bench", "models", ["paper", "nope"], r"params\.bench\.models\[1\]: 'nope' is not one of"),
    ("train", "lr", -1.0, r"train\.lr=-1\.0: must be > 0"),
    ("train", "min_lr", 0.1, r"train\.min_lr=0\.1: must be in \[0, lr\]"),
    ("eval", "device", "gpu0", r"eval\.device: 'gpu0' is not a device"),
    ("runtime", "threads", 0, r"runtime\.threads=0: must be >= 1 or null"),
    ("demo", "num_scenes", 0, r"demo\.num_scenes=0: must be >= 1"),
    ("model", "merge", {"enabled": True, "ratio": 0.9, "keep_views": 1},
     r"model\.merge\.ratio=0\.9: must be in \[0, 0\.75\]"),
    ("model", "merge", {"enabled": True, "ratio": 0.5, "keep_views": 0},
     r"model\.merge\.keep_views=0"),
    ("model", "merge", {"enabled": True, "ratio": 0.5, "keep": 1}, r"model\.merge.*keep"),
])
def test_every_section_is_validated_at_load(tmp_path, section, key, value, match):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=match):
        load_params(path)


def test_validate_applies_choices_to_sections_built_in_code():
    from distill3r.config import LossParams

    with pytest.raises(ValueError, match=r"^loss\.weighting: 'teachr' is not one of"):
        LossParams(weighting="teachr").validate()  # type: ignore[arg-type]


def test_model_names_are_the_registry():
    import typing

    from distill3r.config import ModelName
    from distill3r.models import MODEL_CONFIGS

    assert set(typing.get_args(ModelName)) == set(MODEL_CONFIGS)
