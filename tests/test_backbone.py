"""The front door: a backbone's name is resolved once, and with it the normalisation and stride."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dinov3_jax import backbone
from dinov3_jax.models.registry import get_spec, registry_matches
from dinov3_jax.weights import resolve_config


def test_satellite_file_name_gives_the_satellite_statistics():
    """An official SAT file is recognised by its hash, and its name decides the normalisation
    (the first wave's `show` used the LVD statistics for it)."""
    sat = get_spec("dinov3_vitl16_sat").config
    cfg, name = resolve_config(None, sat, Path("dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"))
    assert (cfg, name) == (sat, "dinov3_vitl16_sat")
    assert backbone._normalization(None, [name]) == "sat"
    # Without the hash, the structure alone names it (ViT-L SAT has the untied local CLS norm).
    assert resolve_config(None, sat, Path("renamed.pth"))[1] == "dinov3_vitl16_sat"


def test_ambiguous_architecture_warns_and_uses_lvd(caplog):
    both = registry_matches(get_spec("dinov3_vit7b16").config)
    assert sorted(both) == ["dinov3_vit7b16", "dinov3_vit7b16_sat"]
    assert resolve_config(None, get_spec("dinov3_vit7b16").config, Path("7b.safetensors"))[1] is None
    with caplog.at_level(logging.WARNING):
        assert backbone._normalization(None, both) == "lvd"
    assert "--normalization sat" in caplog.text
    assert backbone._normalization("sat", both) == "sat"


def test_stride_layers_and_errors():
    vit = backbone.load("dinov3_vit_tiny")
    cnx = backbone.load("dinov3_convnext_test")
    assert (vit.stride, vit.n_layers, cnx.stride, cnx.n_layers) == (16, 3, 32, 4)
    assert cnx.is_convnext and not vit.is_convnext and cnx.normalization == "lvd"
    with pytest.raises(ValueError, match="between 1 and the 4 stages"):
        cnx.check_outputs(backbone.Outputs(layers=5))
    with pytest.raises(ValueError, match="no attention"):
        cnx.check_outputs(backbone.Outputs(attention=True))
    with pytest.raises(ValueError, match="--model NAME"):
        backbone.load()
