"""Model options for small, briefly trained models: GroupNorm groups (0 = none), the box-codec
start of an autoencoder, the identity start of the FA parts, and the plain autoencoder inside
an FA-VAE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fa_vae.init import identity_fa_init
from fa_vae.model import FAVQModel, base_autoencoder
from ldm.autoencoders.autoencoder import VQModel
from ldm.autoencoders.blocks import ChannelAffine
from ldm.autoencoders.init import box_codec_init
from ldm.config import instantiate


def _ddconfig(**kw):
    cfg = {"double_z": False, "z_channels": 3, "resolution": 64, "in_channels": 3, "out_ch": 3,
           "ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": []}  # fmt: skip
    cfg.update(kw)
    return cfg


def _image(seed: int = 0, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=size, mode="bilinear")
    return smooth * 1.6 - 0.8


def test_norm_groups_zero_is_a_channel_affine_with_groupnorm_names():
    grouped = VQModel(_ddconfig(norm_groups=8), n_embed=16, embed_dim=3)
    plain = VQModel(_ddconfig(norm_groups=0), n_embed=16, embed_dim=3)
    assert isinstance(plain.encoder.norm_out, ChannelAffine)
    # the same parameter names and shapes: checkpoints of either layout fit the other
    shapes = {k: v.shape for k, v in grouped.state_dict().items()}
    assert shapes == {k: v.shape for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match="cannot be split into 5 groups"):
        VQModel(_ddconfig(norm_groups=5), n_embed=16, embed_dim=3)


def test_decoder_follows_a_global_colour_change():
    """The colour issue of the old demo: with 32 groups at 32 channels (an instance norm) a
    constant shift of the latent barely reaches the output; with several channels per group it
    does (at random init), and the box-codec start passes it as it is."""
    torch.manual_seed(0)
    z = torch.randn(1, 3, 8, 8)
    shift = torch.zeros(1, 3, 1, 1)
    shift[0, 0] = 3.0
    moved = {}
    for groups in (32, 8):
        torch.manual_seed(10)
        model = VQModel(_ddconfig(ch=32, norm_groups=groups), 16, 3).eval()
        with torch.no_grad():
            a = model.decode(z, quantize=False)
            b = model.decode(z + shift, quantize=False)
        moved[groups] = (b - a).mean((0, 2, 3)).abs().max().item()
    assert moved[32] < 0.01  # instance norm at the output: the shift is mostly erased
    assert moved[8] > 5 * moved[32]
    box = VQModel(_ddconfig(ch=32, norm_groups=0), 16, 3).eval()
    box_codec_init(box)
    with torch.no_grad():
        delta = box.decode(z + shift, quantize=False) - box.decode(z, quantize=False)
    assert torch.allclose(delta[0, 0].mean(), torch.tensor(3.0), atol=0.1)  # red follows


def test_box_codec_starts_as_area_down_and_nearest_up():
    model = VQModel(_ddconfig(norm_groups=0), n_embed=16, embed_dim=3).eval()
    box_codec_init(model)
    x = _image()
    with torch.no_grad():
        z = model.encode(x)
        y = model.decode(z, quantize=False)
    f = model.downsample_factor
    # SiLU at +5 is close to linear, not exactly: a few thousandths
    assert torch.allclose(z, F.avg_pool2d(x, f), atol=0.02)
    assert torch.allclose(y, F.interpolate(F.avg_pool2d(x, f), scale_factor=f), atol=0.04)


def test_box_codec_refuses_normalised_models():
    with pytest.raises(ValueError, match="norm_groups: 0"):
        box_codec_init(VQModel(_ddconfig(norm_groups=8), n_embed=16, embed_dim=3))


def _fa_model(groups: int = 0) -> FAVQModel:
    return FAVQModel(_ddconfig(norm_groups=groups), n_embed=16, embed_dim=3, num_fuse_block=1)


@pytest.mark.parametrize("groups", [0, 8])
def test_fa_identity_init_makes_the_fa_decoder_equal_the_base(groups):
    torch.manual_seed(0)
    model = _fa_model(groups)
    identity_fa_init(model)
    base = base_autoencoder(model)
    x = _image(1)
    lr_up = F.interpolate(F.avg_pool2d(x, 8), scale_factor=8, mode="bilinear")
    with torch.no_grad():
        z_q = model.quantize(model.encode(x))[0]
        fa = model.decode(z_q, skips=model.lr_features(lr_up), quantize=False)
        plain = base.decode(z_q, quantize=False)
    assert torch.allclose(fa, plain, atol=1e-5)
    # and it is not frozen there: the FA parts get gradients
    model.train()
    out = model.decode(z_q, skips=model.lr_features(lr_up), quantize=False)
    out.square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("decoder.unet_1.")]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_base_autoencoder_copies_the_shared_weights():
    model = _fa_model()
    base = base_autoencoder(model)
    assert type(base) is VQModel
    own = model.state_dict()
    for k, v in base.state_dict().items():
        assert torch.equal(v, own[k])
    with pytest.raises(TypeError, match="VQ FA-VAE"):
        base_autoencoder(base)


def test_init_schemes_by_name_in_the_training_module():
    from ldm.config import ConfigError
    from ldm.training.autoencoder_module import AutoencoderGANModule

    cfg = {"target": "vq_model", "params": {"ddconfig": _ddconfig(norm_groups=0),
                                            "n_embed": 16, "embed_dim": 3}}  # fmt: skip
    module = AutoencoderGANModule(
        cfg, trainable=[""], use_lr_features=False, perceptual_weight=0.0, disc_factor=0.0,
        disc_num_layers=1, disc_ndf=8, init_scheme="box_codec",
    )  # fmt: skip
    x = _image(2)
    with torch.no_grad():
        assert torch.allclose(module.model.encode(x), F.avg_pool2d(x, 4), atol=0.02)
    with pytest.raises(ConfigError, match="init_scheme 'nope'"):
        AutoencoderGANModule(cfg, trainable=[""], use_lr_features=False, perceptual_weight=0.0,
                             disc_factor=0.0, init_scheme="nope")  # fmt: skip
    assert instantiate  # the registry resolves the names through ldm.config
