"""Behaviour of the autoencoder building blocks and models (tiny configs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ldm.autoencoders.autoencoder import AutoencoderKL, VQModel
from ldm.autoencoders.blocks import AttnBlock, Downsample, ResnetBlock
from ldm.autoencoders.decoder import Decoder
from ldm.autoencoders.regularizers import DiagonalGaussian, VectorQuantizer
from ldm.checkpoint import load_pretrained, save_pretrained
from ldm.config import ConfigError, instantiate, load_config


def _tiny(name: str):
    return instantiate(load_config(f"autoencoder/{name}")).eval()


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------- blocks


def test_attention_equals_the_explicit_ldm_formula():
    block = AttnBlock(32).eval()
    _perturb(block)
    x = torch.randn(2, 32, 5, 7)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = block.q(h), block.k(h), block.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)
        w = torch.softmax(torch.bmm(q, k.reshape(b, c, hh * ww)) * c**-0.5, dim=2)
        out = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        ref = x + block.proj_out(out)
        torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)


def test_resnet_block_gradients_match_out_of_place_reference():
    block = ResnetBlock(32, 64)
    x = torch.randn(1, 32, 6, 6, requires_grad=True)
    block(x).square().sum().backward()
    grad_inplace = x.grad.clone()
    x.grad = None

    def reference(x):
        h = block.conv1(F.silu(block.norm1(x)))
        h = block.conv2(F.silu(block.norm2(h)))
        return block.nin_shortcut(x) + h

    reference(x).square().sum().backward()
    torch.testing.assert_close(grad_inplace, x.grad)
    with torch.no_grad():  # in-place activations without a graph give the same values
        torch.testing.assert_close(block(x), reference(x))


def test_downsample_pads_right_and_bottom_only():
    down = Downsample(32, with_conv=True)
    x = torch.randn(1, 32, 8, 8)
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    torch.testing.assert_close(down(x), ref)
    assert down(torch.randn(1, 32, 7, 9)).shape[-2:] == (3, 4)  # odd sizes round down (LDM)


# --------------------------------------------------------------------------- quantizer


def test_vector_quantizer_legacy_semantics():
    vq = VectorQuantizer(n_embed=16, embed_dim=3, beta=0.25, legacy=True)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.randn(16, 3))
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    z_q, loss, idx = vq(z)
    assert idx.shape == (2, 4, 5) and idx.dtype == torch.long
    dists = torch.cdist(z.detach().permute(0, 2, 3, 1).reshape(-1, 3), vq.embedding.weight)
    assert torch.equal(idx.flatten(), dists.argmin(1))
    codes = vq.lookup(idx)
    torch.testing.assert_close(z_q, codes)
    mse = torch.mean((codes - z.detach()) ** 2)
    torch.testing.assert_close(loss, mse + 0.25 * mse)
    # straight-through: d z_q / d z is the identity
    (z_q * torch.arange(z.numel()).view_as(z)).sum().backward(retain_graph=True)
    torch.testing.assert_close(z.grad, torch.arange(z.numel()).view_as(z).float())
    # the loss reaches the codebook with weight beta (legacy), z with weight 1
    z.grad = None
    vq.embedding.weight.grad = None
    loss.backward()
    n = z.numel()
    torch.testing.assert_close(z.grad, 2.0 * (z - codes).detach() / n)


def test_vector_quantizer_non_legacy_puts_beta_on_commitment():
    vq = VectorQuantizer(8, 2, beta=0.5, legacy=False)
    z = torch.randn(1, 2, 3, 3, requires_grad=True)
    _, loss, idx = vq(z)
    loss.backward()
    codes = vq.lookup(idx)
    torch.testing.assert_close(z.grad, 0.5 * 2.0 * (z - codes).detach() / z.numel())


def test_diagonal_gaussian():
    moments = torch.randn(2, 8, 3, 3)
    moments[:, 4:, 0, 0] = 50.0  # clamped to 20
    post = DiagonalGaussian(moments)
    assert torch.equal(post.mean, moments[:, :4]) and torch.equal(post.mode(), post.mean)
    assert post.logvar.max() == 20.0
    torch.testing.assert_close(post.std, torch.exp(0.5 * post.logvar))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(post.sample(g1), post.sample(g2))
    kl = post.kl()
    ref = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(kl, ref)
    assert torch.allclose(DiagonalGaussian(torch.zeros(1, 8, 2, 2)).kl(), torch.zeros(1))
    nll = DiagonalGaussian(torch.zeros(1, 2, 1, 1)).nll(torch.zeros(1, 1, 1, 1))
    torch.testing.assert_close(nll, torch.tensor([0.5 * math.log(2 * math.pi)]))


# --------------------------------------------------------------------------- models


def test_vq_model_encode_decode_shapes_and_features():
    model = _tiny("vq_f4_tiny")
    assert isinstance(model, VQModel)
    assert model.downsample_factor == 4 and model.latent_channels == 3
    x = torch.randn(2, 3, 32, 24)
    with torch.no_grad():
        h, feats = model.encode(x, return_features=True)
        assert torch.equal(h, model.encode(x))
        assert h.shape == (2, 3, 8, 6)
        assert [tuple(f.shape) for f in feats] == [(2, 32, 32, 24), (2, 32, 16, 12)]
        quantized = model.quantize(h)[0]
        torch.testing.assert_close(model.decode(h), model.decode(quantized, quantize=False))
        assert not torch.allclose(model.decode(h, quantize=False), model.decode(h))
        assert model(x).shape == x.shape


def test_kl_model_encode_decode():
    model = _tiny("kl_f8_tiny")
    assert isinstance(model, AutoencoderKL)
    assert model.downsample_factor == 8 and model.scale_factor == pytest.approx(0.18215)
    x = torch.randn(1, 3, 16, 24)
    with torch.no_grad():
        post, feats = model.encode(x, return_features=True)
        assert post.mean.shape == (1, 4, 2, 3) and len(feats) == 3
        torch.testing.assert_close(model(x), model.decode(post.mean))
        g = torch.Generator().manual_seed(0)
        assert model(x, sample_posterior=True, generator=g).shape == x.shape


def test_vq_and_kl_share_encode_latent_and_decode():
    """One interface: callers use encode_latent / decode without knowing the kind; the results
    are those of each kind's own encode (VQ latent; KL posterior mean or sample)."""
    x = torch.randn(1, 3, 16, 16)
    vq, kl = _tiny("vq_f4_tiny").eval(), _tiny("kl_f8_tiny").eval()
    _perturb(vq), _perturb(kl)
    with torch.no_grad():
        assert torch.equal(vq.encode_latent(x), vq.encode(x))
        assert torch.equal(vq.encode_latent(x, sample=True), vq.encode(x))
        assert torch.equal(kl.encode_latent(x), kl.encode(x).mode())
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert torch.equal(kl.encode_latent(x, sample=True, generator=g1), kl.encode(x).sample(g2))
        for model in (vq, kl):
            z = model.encode_latent(x)
            assert torch.equal(model(x), model.decode(z, quantize=True))
        z = kl.encode_latent(x)
        assert torch.equal(kl.decode(z, quantize=False), kl.decode(z, None, quantize=True))


def test_input_not_divisible_by_factor_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by 8"):
        _tiny("kl_f8_tiny").encode(torch.randn(1, 3, 20, 16))


def test_decoder_hooks_are_called_per_level_before_upsample():
    calls = []

    class Recording(Decoder):
        def fuse_skip(self, level, h, skips):
            calls.append((level, tuple(h.shape[-2:]), skips))
            return h + skips[0].mean() if level == 1 else h

        def pre_out(self, h):
            calls.append(("pre_out", tuple(h.shape[-2:]), None))
            return h

    class RecordingVQ(VQModel):
        decoder_class = Recording

    cfg = load_config("autoencoder/vq_f4_tiny").params
    model = RecordingVQ(**cfg).eval()
    plain = VQModel(**cfg).eval()
    plain.load_state_dict(model.state_dict())
    z = torch.randn(1, 3, 4, 4)
    skip = [torch.ones(1)]
    with torch.no_grad():
        out = model.decode(z, [skip[0]], quantize=False)
        ref = plain.decode(z, quantize=False)
    assert [c[:2] for c in calls] == [
        (2, (4, 4)),
        (1, (8, 8)),
        (0, (16, 16)),
        ("pre_out", (16, 16)),
    ]
    assert not torch.allclose(out, ref)  # the hook's output is used
    calls.clear()
    with torch.no_grad():
        model.decoder.fuse_skip = lambda level, h, skips: h  # identity again
        torch.testing.assert_close(model.decode(z, quantize=False), ref)


def test_unknown_ddconfig_key_lists_valid_keys():
    cfg = load_config("autoencoder/vq_f4_tiny", overrides=["params.ddconfig.num_res_blokcs=2"])
    with pytest.raises(ValueError, match=r"unknown ddconfig key\(s\) \['num_res_blokcs'\]"):
        instantiate(cfg)


def test_unknown_model_parameter_fails_with_the_valid_list():
    cfg = load_config("autoencoder/kl_f8_tiny", overrides=["params.n_embed=16"])
    with pytest.raises(ConfigError, match="valid parameters"):
        instantiate(cfg)


@pytest.mark.parametrize("name", ["vq_f4_tiny", "kl_f8_tiny"])
def test_save_and_load_pretrained_round_trip(tmp_path, name):
    cfg = load_config(f"autoencoder/{name}")
    model = instantiate(cfg).eval()
    _perturb(model)
    path = save_pretrained(model, tmp_path / f"{name}.safetensors", cfg)
    back = load_pretrained(path)
    assert type(back) is type(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
