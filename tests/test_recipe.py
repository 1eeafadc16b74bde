"""The recipe schema: shipped recipes, overrides, and one-line errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from seiscli.recipe import Recipe, RecipeError, list_recipes, load_recipe, parse_set


def test_shipped_recipes_are_valid() -> None:
    names = list_recipes()
    assert {"smoke", "pretrain", "pretrain-long-context"} <= set(names)
    for name in names:
        assert isinstance(load_recipe(name), Recipe)


def test_pretrain_shapes() -> None:
    r = load_recipe("pretrain")
    assert r.num_tokens == 102_400 and r.cluster.world_size == 128 and r.parallelism.strategy == "zero2"
    lc = load_recipe("pretrain-long-context")
    assert lc.num_tokens == 1_179_648 and lc.parallelism.cp == 8 and lc.dp == 16


def test_overrides_apply_with_types() -> None:
    r = load_recipe("pretrain", {"cluster.nodes": 2, "model.encoder_depth": 12, "cluster.env.FOO": "bar"})
    assert r.cluster.nodes == 2 and r.model.encoder_depth == 12 and r.cluster.env == {"FOO": "bar"}
    assert parse_set("model.encoder_depth=24") == ("model.encoder_depth", 24)
    assert parse_set("data.crop=[64, 64, 128]") == ("data.crop", [64, 64, 128])
    assert parse_set("name=abc") == ("name", "abc")


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        ({"cluster.nodes": 0}, ["cluster.nodes", "greater than or equal to 1"]),
        ({"model.encoder_depth": "abc"}, ["model.encoder_depth", "integer", "'abc'"]),
        ({"model.dept": 3}, ["model.dept", "allowed:", "encoder_depth"]),
        ({"parallelism.strategy": "zero4"}, ["parallelism.strategy", "'ddp'", "'fsdp2'"]),
        ({"data.crop": [65, 64, 64]}, ["data.crop", "patch_size=8", "nearest valid: (64, 64, 64)"]),
        ({"parallelism.cp": 3}, ["parallelism.cp=3"]),
        ({"model.encoder_depth.x": 3}, ["model.encoder_depth", "not a section"]),
        ({"cluster.time_limit": "tomorrow"}, ["cluster.time_limit", "HH:MM:SS"]),
        ({"name": "a b"}, ["name", "letters"]),
        ({"train.global_batch": 7}, ["train.global_batch=7", "micro_batch"]),
    ],
)
def test_bad_values_name_the_field(overrides: dict, needles: list[str]) -> None:
    with pytest.raises(RecipeError) as exc:
        load_recipe("smoke", overrides)
    msg = str(exc.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg


def test_unknown_field_in_file_lists_allowed(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nmodel:\n  depth: 3\n")
    with pytest.raises(RecipeError, match=r"unknown field 'model.depth'; allowed: patch_size"):
        load_recipe(str(p))


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.yaml"))
    with pytest.raises(RecipeError, match="no recipe named 'nope'"):
        load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n")
    with pytest.raises(RecipeError, match="YAML mapping"):
        load_recipe(str(lst))


def test_resolved_recipe_round_trips(tmp_path: Path) -> None:
    r = load_recipe("pretrain-long-context", {"train.steps": 7})
    p = tmp_path / "resolved.yaml"
    p.write_text(r.to_yaml())
    assert load_recipe(str(p)) == r


def test_activation_checkpointing_modes_and_old_booleans() -> None:
    key = "parallelism.activation_checkpointing"
    for given, mode in ((True, "full"), (False, "none"), ("save_attention", "save_attention"), ("none", "none")):
        assert load_recipe("smoke", {key: given}).parallelism.activation_checkpointing == mode
    with pytest.raises(RecipeError, match=r"activation_checkpointing.*'none', 'full' or 'save_attention'"):
        load_recipe("smoke", {key: "selective"})
