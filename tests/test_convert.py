"""Weights in and out: exact round trips, export loadable by PyTorch, the CLI, and clear errors."""

from __future__ import annotations

import functools
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import DINOv3ViTModel

from dinov3_jax import WeightsError, create_backbone, load_backbone, save_backbone
from dinov3_jax.cli import main as cli
from dinov3_jax.convert.ours import model_to_flat
from dinov3_jax.models.config import default_rope_periods


@functools.cache
def tiny():
    """A tiny model with every released option and randomised (non-default) weights."""
    model = create_backbone("dinov3_vit_tiny", seed=3)
    flat = model_to_flat(model)
    rng = np.random.default_rng(0)
    for k, v in flat.items():
        flat[k] = (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
    d = model.config.embed_dim
    for k in [k for k in flat if k.endswith("attn.qkv.bias")]:
        flat[k][d : 2 * d] = 0.0  # the k bias is masked (mask_k_bias), so it carries no information
    from dinov3_jax.convert.ours import model_from_flat

    return model_from_flat(model.config, flat)


def assert_same_weights(a, b):
    fa, fb = model_to_flat(a), model_to_flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


X = np.random.default_rng(1).standard_normal((2, 48, 64, 3)).astype(np.float32)


@pytest.mark.parametrize("layout", ["meta", "hf", "ours"])
def test_round_trip_is_exact(layout, tmp_path):
    out = tmp_path / {"meta": "w.pth", "hf": "hf_dir", "ours": "w.safetensors"}[layout]
    save_backbone(tiny(), out, layout)
    back = load_backbone("dinov3_vit_tiny", out)
    assert_same_weights(tiny(), back)
    np.testing.assert_array_equal(back(jnp.asarray(X)), tiny()(jnp.asarray(X)))


def test_hf_export_loads_in_transformers(tmp_path):
    save_backbone(tiny(), tmp_path / "hf", "hf")
    ref = DINOv3ViTModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        out = ref(torch.from_numpy(X.transpose(0, 3, 1, 2)))
    ours = tiny().forward_features(jnp.asarray(X))
    np.testing.assert_allclose(ours["x_norm_clstoken"], out.pooler_output.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ours["x_norm_patchtokens"], out.last_hidden_state.numpy()[:, 5:], atol=1e-5, rtol=1e-5)


def test_meta_export_has_official_keys_and_buffers(tmp_path):
    save_backbone(tiny(), tmp_path / "w.pth", "meta")
    sd = torch.load(tmp_path / "w.pth", weights_only=True)
    d = tiny().config.embed_dim
    assert sd["patch_embed.proj.weight"].shape == (d, 3, 16, 16)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * d, d)
    assert sd["mask_token"].shape == (1, d)
    assert sd["storage_tokens"].shape == (1, 4, d)
    np.testing.assert_array_equal(sd["blocks.2.attn.qkv.bias_mask"].numpy(), np.repeat([1.0, 0.0, 1.0], d))
    base = 100.0
    expected = base ** (np.arange(4) * 4 / 16)  # period_j = base^(4j/Dh), Dh = 16
    np.testing.assert_allclose(sd["rope_embed.periods"].numpy(), expected, rtol=1e-6)
    assert "blocks.0.mlp.fc1.weight" in sd and "norm.weight" in sd and "blocks.1.ls2.gamma" in sd


@pytest.mark.parametrize(("src", "dst"), [("ours", "meta"), ("meta", "hf"), ("hf", "ours"), ("meta", "ours")])
def test_cli_convert(src, dst, tmp_path):
    names = {"meta": "a.pth", "hf": "a_hf", "ours": "a.safetensors"}
    save_backbone(tiny(), tmp_path / names[src], src)
    out = tmp_path / ("out_" + names[dst])
    assert (
        cli(["convert", "--from", src, "--to", dst, "--model", "dinov3_vit_tiny", str(tmp_path / names[src]), str(out)])
        == 0
    )
    assert_same_weights(tiny(), load_backbone("dinov3_vit_tiny", out))


def test_cli_convert_wrong_source_layout(tmp_path, capsys):
    save_backbone(tiny(), tmp_path / "a.safetensors", "ours")
    code = cli(["convert", "--from", "meta", "--to", "hf", str(tmp_path / "a.safetensors"), str(tmp_path / "o")])
    assert code == 2
    assert "'ours' layout, not 'meta'" in capsys.readouterr().err


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path):
    flat = model_to_flat(tiny())
    del flat["blocks.1.mlp.fc2.bias"]
    flat["blocks.0.attn.extra"] = np.zeros(3, np.float32)
    flat["norm.scale"] = np.ones(65, np.float32)
    path = tmp_path / "bad.safetensors"
    from dinov3_jax.convert.ours import save_ours

    save_ours(path, flat, tiny().config)
    with pytest.raises(WeightsError) as err:
        load_backbone("dinov3_vit_tiny", path)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys (1): blocks.1.mlp.fc2.bias" in msg
    assert "unexpected keys (1): blocks.0.attn.extra" in msg
    assert "norm.scale: expected (64,), found (65,)" in msg


def test_wrong_architecture_is_named(tmp_path):
    save_backbone(tiny(), tmp_path / "w.pth", "meta")
    with pytest.raises(WeightsError, match=r"does not hold a dinov3_vits16 backbone[\s\S]*embed_dim"):
        load_backbone("dinov3_vits16", tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="does not hold a dinov3_vit_tiny_swiglu"):
        load_backbone("dinov3_vit_tiny_swiglu", tmp_path / "w.pth")


def test_nan_weights_are_refused(tmp_path):
    flat = model_to_flat(tiny())
    flat["blocks.0.ls1.gamma"] = np.full_like(flat["blocks.0.ls1.gamma"], np.nan)
    from dinov3_jax.convert.ours import save_ours

    save_ours(tmp_path / "nan.safetensors", flat, tiny().config)
    with pytest.raises(WeightsError, match=r"blocks\.0\.ls1\.gamma holds NaN"):
        load_backbone(weights=tmp_path / "nan.safetensors")


def test_bad_bias_mask_is_refused(tmp_path):
    save_backbone(tiny(), tmp_path / "w.safetensors", "meta")
    sd = load_file(tmp_path / "w.safetensors")
    sd["blocks.0.attn.qkv.bias_mask"] = np.ones_like(sd["blocks.0.attn.qkv.bias_mask"])
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match="bias_mask: expected a 0/1 mask with a zero k third"):
        load_backbone(weights=tmp_path / "bad.safetensors")


def test_all_zero_released_bias_mask_is_accepted(tmp_path):
    """Released ViT files hold all-zero qkv biases and masks (dinov3 issue #195)."""
    save_backbone(tiny(), tmp_path / "w.safetensors", "meta")
    sd = load_file(tmp_path / "w.safetensors")
    for k in [k for k in sd if k.endswith("bias_mask")]:
        sd[k] = np.zeros_like(sd[k])
    save_file(sd, tmp_path / "zero.safetensors")
    flat = model_to_flat(load_backbone(weights=tmp_path / "zero.safetensors"))
    assert all(not flat[k].any() for k in flat if k.endswith("attn.qkv.bias"))


def test_training_checkpoint_wrapper_and_bf16_periods(tmp_path):
    """`teacher_checkpoint.pth` = {"teacher": {"backbone.*", "dino_head.*", ...}}; released files
    store bf16-rounded periods, which are kept so the model matches the official one exactly."""
    save_backbone(tiny(), tmp_path / "w.pth", "meta")
    sd = torch.load(tmp_path / "w.pth", weights_only=True)
    rounded = sd["rope_embed.periods"].to(torch.bfloat16).to(torch.float32)
    assert not torch.equal(rounded, sd["rope_embed.periods"])
    sd["rope_embed.periods"] = rounded
    teacher = {f"backbone.{k}": v for k, v in sd.items()}
    teacher["dino_head.last_layer.weight"] = torch.zeros(8, 4)
    torch.save({"teacher": teacher}, tmp_path / "teacher_checkpoint.pth")
    model = load_backbone("dinov3_vit_tiny", tmp_path / "teacher_checkpoint.pth")
    assert model.config.rope_periods == tuple(rounded.tolist())
    assert model.config.rope_periods != default_rope_periods(model.config)
    assert_same_weights(tiny(), model)
    # The rounded periods change the output a little, as they do in the official model.
    diff = np.abs(np.asarray(model(jnp.asarray(X))) - np.asarray(tiny()(jnp.asarray(X)))).max()
    assert 0 < diff < 0.1
    # ... and they survive a round trip through our format.
    save_backbone(model, tmp_path / "ours.safetensors")
    assert load_backbone(weights=tmp_path / "ours.safetensors").config.rope_periods == model.config.rope_periods


def test_architecture_from_official_file_name(tmp_path):
    from dinov3_jax.models.registry import model_from_filename

    assert model_from_filename("dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth") == "dinov3_vitl16_sat"
    assert model_from_filename("dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth") == "dinov3_vit7b16"
    assert model_from_filename("my_weights.pth") is None


def test_missing_file_and_unknown_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        load_backbone("dinov3_vit_tiny", tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="did you mean dinov3_vits16"):
        load_backbone("dinov3_vits17")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=r"junk\.safetensors: not a readable safetensors file"):
        load_backbone("dinov3_vit_tiny", tmp_path / "junk.safetensors")


# ---------------------------------------------------------------------------------------------
# Nothing the user has is destroyed (issue 11 §1)
# ---------------------------------------------------------------------------------------------


def test_convert_refuses_an_existing_output_unless_forced(tmp_path, capsys):
    src = save_backbone(tiny(), tmp_path / "a.safetensors")
    out = tmp_path / "existing.pth"
    out.write_bytes(b"the user's file")
    assert cli(["convert", "--to", "meta", str(src), str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == b"the user's file"
    assert cli(["convert", "--to", "meta", "--force", str(src), str(out)]) == 0
    assert_same_weights(tiny(), load_backbone("dinov3_vit_tiny", out))


@pytest.mark.parametrize(("to", "name"), [("ours", "out.pth"), ("hf", "out.safetensors"), ("meta", "out.npz")])
def test_the_output_name_must_match_the_layout(to, name, tmp_path, capsys):
    src = save_backbone(tiny(), tmp_path / "a.safetensors")
    assert cli(["convert", "--to", to, str(src), str(tmp_path / name)]) == 2
    assert f"the {to} layout" in capsys.readouterr().err
    assert not (tmp_path / name).exists()


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    """A write that dies half-way (here: torch.save raising after writing some bytes) leaves the
    previous file as it was and no partial file beside it."""
    out = save_backbone(create_backbone("dinov3_vit_tiny", seed=9), tmp_path / "w.pth", "meta")
    before = out.read_bytes()

    def dies_half_way(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_backbone(tiny(), out, "meta")
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["w.pth"]


def test_hf_folder_loses_a_stale_shard_index(tmp_path):
    """Converting into a folder that held a sharded checkpoint removes its index and shards, so
    the folder loads the new weights (the index would otherwise win)."""
    folder = tmp_path / "hf"
    save_backbone(create_backbone("dinov3_vit_tiny", seed=9), folder, "hf")
    (folder / "model-00001-of-00002.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"x": "model-00001-of-00002.safetensors"}}')
    src = save_backbone(tiny(), tmp_path / "a.safetensors")
    assert cli(["convert", "--to", "hf", "--force", str(src), str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_weights(tiny(), load_backbone("dinov3_vit_tiny", folder))
