"""The independent PyTorch references: Hugging Face `DINOv3ViTModel` and `DINOv3ConvNextModel` with
every weight randomised (PARITY.md §3–4), and official-layout state dicts synthesised from them
(PARITY.md §5.8).

Nothing here uses dinov3_jax's converters: the official layout is written from RECIPE.md §2.1.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel, DINOv3ViTConfig, DINOv3ViTModel

# Tiny configurations exercising every branch the released models use (PARITY.md §3).
CASES = {
    # plain MLP, 4 registers, LN eps 1e-5, q/v bias and no k bias (the released ViT-S/B/L).
    "mlp_reg4": dict(use_gated_mlp=False, hidden_act="gelu", intermediate_size=256, num_register_tokens=4),
    # SwiGLU with the official width rounding (int(256·2/3)=170 → 176), no registers, eps 1e-6.
    "swiglu_reg0": dict(
        use_gated_mlp=True, hidden_act="silu", intermediate_size=176, num_register_tokens=0, layer_norm_eps=1e-6
    ),
    # SwiGLU without any qkv bias (the ViT-7B layout).
    "swiglu_nobias": dict(
        use_gated_mlp=True,
        hidden_act="silu",
        intermediate_size=176,
        num_register_tokens=4,
        query_bias=False,
        value_bias=False,
    ),
}


def make_hf_model(case: str, seed: int = 0) -> DINOv3ViTModel:
    config = DINOv3ViTConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=3,
        patch_size=16,
        layerscale_value=1e-5,
        rope_theta=100.0,
        **CASES[case],
    )
    torch.manual_seed(seed)
    model = DINOv3ViTModel(config).eval()
    randomize_(model, seed)
    return model


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrites every parameter (PARITY.md §4): layer scale U(0.5, 1.5), norm weights 1 + 0.2·N,
    biases 0.2·N, tokens N(0, 1), other weights += 0.05·N."""
    rng = np.random.default_rng(seed)

    def draw(shape, scale=1.0, loc=0.0):
        return torch.from_numpy((loc + scale * rng.standard_normal(shape)).astype(np.float32))

    for name, p in model.named_parameters():
        if "lambda1" in name or name.endswith("gamma"):
            p.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, p.shape).astype(np.float32)))
        elif "norm" in name and name.endswith("weight"):
            p.copy_(draw(p.shape, 0.2, 1.0))
        elif name.endswith("bias"):
            p.copy_(draw(p.shape, 0.2))
        elif "token" in name:
            p.copy_(draw(p.shape))
        else:
            p.add_(draw(p.shape, 0.05))


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def official_state_dict(model: DINOv3ViTModel, seed: int = 1) -> dict[str, torch.Tensor]:
    """The official-layout state dict of the same network (RECIPE.md §2.1), built by hand.

    q/k/v are fused in that order; where the model has q/v biases a *random non-zero* k bias is
    inserted with `bias_mask` = [1, 0, 1], so an importer that ignores the mask fails;
    `rope_embed.periods` = 1 / inv_freq; `mask_token` is flattened to [1, D].
    """
    cfg = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    d = cfg.hidden_size
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "mask_token": sd["embeddings.mask_token"].reshape(1, d),
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
        "rope_embed.periods": 1.0 / model.rope_embeddings.inv_freq.detach().clone(),
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    if cfg.num_register_tokens:
        out["storage_tokens"] = sd["embeddings.register_tokens"]
    mlp = (
        {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"}
        if cfg.use_gated_mlp
        else {"up_proj": "fc1", "down_proj": "fc2"}
    )
    for i in range(cfg.num_hidden_layers):
        hf, us = f"model.layer.{i}.", f"blocks.{i}."
        att = hf + "attention."
        out[us + "attn.qkv.weight"] = torch.cat([sd[att + f"{c}_proj.weight"] for c in "qkv"], dim=0)
        if cfg.query_bias:
            k_bias = torch.randn(d, generator=g)
            out[us + "attn.qkv.bias"] = torch.cat([sd[att + "q_proj.bias"], k_bias, sd[att + "v_proj.bias"]])
            out[us + "attn.qkv.bias_mask"] = torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)])
        out[us + "attn.proj.weight"] = sd[att + "o_proj.weight"]
        out[us + "attn.proj.bias"] = sd[att + "o_proj.bias"]
        for j in (1, 2):
            out[us + f"norm{j}.weight"] = sd[hf + f"norm{j}.weight"]
            out[us + f"norm{j}.bias"] = sd[hf + f"norm{j}.bias"]
            out[us + f"ls{j}.gamma"] = sd[hf + f"layer_scale{j}.lambda1"]
        for hf_name, name in mlp.items():
            out[us + f"mlp.{name}.weight"] = sd[hf + f"mlp.{hf_name}.weight"]
            out[us + f"mlp.{name}.bias"] = sd[hf + f"mlp.{hf_name}.bias"]
    return out


@torch.no_grad()
def run_hf(model: DINOv3ViTModel, images_nchw: np.ndarray, masks: np.ndarray | None = None):
    x = torch.from_numpy(images_nchw)
    kwargs = {} if masks is None else {"bool_masked_pos": torch.from_numpy(masks)}
    return model(x, output_hidden_states=True, **kwargs)


def make_hf_convnext(seed: int = 0) -> DINOv3ConvNextModel:
    """The tiny ConvNeXt of PARITY.md §3 (depths 1, 2, 1, 1; widths 8–64), every weight randomised."""
    config = DINOv3ConvNextConfig(depths=[1, 2, 1, 1], hidden_sizes=[8, 16, 32, 64], layer_norm_eps=1e-6)
    torch.manual_seed(seed)
    model = DINOv3ConvNextModel(config).eval()
    randomize_(model, seed)
    return model


def official_convnext_state_dict(model: DINOv3ConvNextModel) -> dict[str, torch.Tensor]:
    """The official-layout ConvNeXt state dict (RECIPE.md §2.3) of the same network, renamed by
    hand, with the final norm stored twice (`norm.*` and `norms.3.*`) as the official files do."""
    block = {"depthwise_conv": "dwconv", "layer_norm": "norm", "pointwise_conv1": "pwconv1",
             "pointwise_conv2": "pwconv2"}  # fmt: skip
    out = {}
    for key, value in model.state_dict().items():
        parts = key.removeprefix("model.").split(".")
        if parts[0] == "layer_norm":
            names = [f"norm.{parts[1]}", f"norms.3.{parts[1]}"]
        elif parts[2] == "downsample_layers":  # stages.i.downsample_layers.k.leaf
            names = [f"downsample_layers.{parts[1]}.{parts[3]}.{parts[4]}"]
        else:  # stages.i.layers.j.module(.leaf)
            module = ".".join([block.get(parts[4], parts[4]), *parts[5:]])
            names = [f"stages.{parts[1]}.{parts[3]}.{module}"]
        for name in names:
            out[name] = value.detach().clone()
    return out
