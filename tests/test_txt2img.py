"""txt2img with the FA-VAE decoder: latents, scaling, decoder swap and the two CLIs.

Everything runs on a tiny randomly initialised Stable Diffusion pipeline built from configs
(no download): a tiny UNet2DConditionModel, a diffusers AutoencoderKL with the layout of
``autoencoder/kl_f8_tiny`` (the FA-VAE needs 32-channel group norms), a DDIM scheduler, a
tiny CLIPTextModel and a byte-level CLIPTokenizer whose vocabulary is built in memory.
"""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from fa_vae.cli import txt2img_decode, txt2img_latents  # noqa: E402
from fa_vae.txt2img import (  # noqa: E402
    TokenizerError,
    check_tokenizer,
    decode_latents,
    generate_latents,
    latent_name,
    read_latent,
    save_latent,
)
from ldm.checkpoint import save_pretrained  # noqa: E402
from ldm.config import instantiate, load_config  # noqa: E402
from ldm.data.image_io import read_image  # noqa: E402

#: deliberately not SD1.5's 0.18215: the code must use the VAE's own factor
SCALING = 0.5
LATENT = (4, 8, 8)  # tiny VAE: f8, 64 px images
SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def tiny_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    for tok in SPECIALS:
        vocab[tok] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def tiny_pipe(with_tokenizer: bool = True):
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    n = len(tokenizer)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=LATENT[1],
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=4,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 32, 64, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        layers_per_block=1,
        sample_size=64,
        scaling_factor=SCALING,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=n - 2,
            eos_token_id=n - 1,
            pad_token_id=n - 1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=n,
            max_position_embeddings=16,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer if with_tokenizer else None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_fa_vae():
    torch.manual_seed(1)
    config = load_config("fa_vae/kl_f8_fa_tiny")
    return instantiate(config).eval(), config


def direct_latents(pipe, prompt: str, seed: int, steps: int = 2, guidance: float = 3.0):
    """The pipeline's own (scaled) latents for one prompt and seed."""
    return pipe(
        prompt=[prompt],
        negative_prompt=[""],
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(seed)],
        output_type="latent",
    ).images


# --------------------------------------------------------------------------- library


def test_latents_shape_and_scaling():
    pipe = tiny_pipe()
    prompts, seeds = ["a red cat", "a house"], [3, 7, 11]
    z = generate_latents(pipe, prompts, seeds, steps=2, guidance=3.0, batch_size=2)
    assert z.shape == (2, 3, *LATENT) and z.dtype == torch.float32
    # saved latents = the pipeline's latents / the VAE's own scaling factor
    ref = direct_latents(pipe, "a house", 11)[0]
    torch.testing.assert_close(z[1, 2], ref / SCALING, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(z[1, 2], ref / 0.18215, rtol=1e-3, atol=1e-3)
    # one generator per image: batching does not change a sample
    z1 = generate_latents(pipe, ["a house"], [11], steps=2, guidance=3.0, batch_size=1)
    torch.testing.assert_close(z1[0, 0], z[1, 2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(z[0, 0], z[1, 0])  # prompts matter
    assert not torch.allclose(z[0, 0], z[0, 1])  # seeds matter


def test_prompt_embeds_without_tokenizer():
    pipe = tiny_pipe(with_tokenizer=False)
    embeds = torch.randn(2, 16, 32)
    z = generate_latents(pipe, None, [0, 1], steps=2, guidance=1.0, prompt_embeds=embeds)
    assert z.shape == (2, 2, *LATENT)
    with pytest.raises(TokenizerError, match="no tokenizer"):
        generate_latents(pipe, None, [0], steps=2, guidance=3.0, prompt_embeds=embeds)
    neg = torch.zeros(1, 16, 32)
    z = generate_latents(
        pipe, None, [0], steps=2, guidance=3.0, prompt_embeds=embeds, negative_prompt_embeds=neg
    )
    assert z.shape == (2, 1, *LATENT)
    with pytest.raises(TokenizerError, match="no tokenizer"):
        generate_latents(pipe, ["a cat"], [0], steps=2, guidance=1.0)


def test_broken_offline_tokenizer_is_refused():
    from transformers import CLIPTokenizer

    pipe = tiny_pipe()
    check_tokenizer(pipe)  # the tiny byte-level tokenizer is fine
    pipe.tokenizer = CLIPTokenizer()  # what from_pretrained returns offline: 2 tokens
    with pytest.raises(TokenizerError, match="broken .*2 tokens"):
        check_tokenizer(pipe)
    with pytest.raises(TokenizerError, match="broken"):
        generate_latents(pipe, ["a cat"], [0], steps=2, guidance=1.0)


def test_decoder_swap_matches_fa_decode():
    from fa_vae.diffusers_swap import swap_vae_decoder

    pipe = tiny_pipe()
    fa, _ = tiny_fa_vae()
    encoder = pipe.vae.encoder
    z = generate_latents(pipe, ["a boat"], [5], steps=2, guidance=3.0)[0]

    def images() -> torch.Tensor:
        return pipe(
            prompt=["a boat"],
            num_inference_steps=2,
            guidance_scale=3.0,
            generator=[torch.Generator().manual_seed(5)],
            output_type="pt",
        ).images

    plain = images()
    swap_vae_decoder(pipe, fa)
    assert pipe.vae.encoder is encoder and pipe.vae.config.scaling_factor == SCALING
    out = images()
    expected = decode_latents(fa, z)
    assert out.shape == expected.shape == (1, 3, 64, 64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert (out - plain).abs().max() > 1e-2  # the decoder really changed


def test_latent_files_round_trip(tmp_path):
    z = torch.randn(*LATENT)
    path = save_latent(z, tmp_path / f"{latent_name(3, 42)}.safetensors", {"prompt": "x"})
    assert path.name == "00003_s42.safetensors"
    assert json.loads(path.with_suffix(".json").read_text())["prompt"] == "x"
    torch.testing.assert_close(read_latent(path), z)
    torch.save(z[None], tmp_path / "img_0000.pt")  # the release's files: [1, C, h, w]
    torch.testing.assert_close(read_latent(tmp_path / "img_0000.pt"), z)
    torch.save({"a": z}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="expected a tensor"):
        read_latent(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="latent"):
        decode_latents(tiny_fa_vae()[0], torch.randn(1, 3, 8, 8))


# --------------------------------------------------------------------------- CLIs


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("txt2img")
    pipe = tiny_pipe()
    pipe.save_pretrained(root / "pipe")
    fa, config = tiny_fa_vae()
    save_pretrained(fa, root / "fa_vae_kl_f8_tiny.safetensors", config)
    return root, pipe, fa


def test_cli_latents_then_decode(saved_models, tmp_path, capsys):
    root, pipe, fa = saved_models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\n# a comment\na house by the sea\n", encoding="utf-8")
    latents = tmp_path / "latents"
    argv = [
        *("--model", str(root / "pipe"), "--prompts", str(prompts), "-o", str(latents)),
        *("--seeds", "5", "3", "--steps", "2", "--guidance", "3.0", "--device", "cpu"),
        "--quiet",
    ]
    assert txt2img_latents.main(argv) == 0
    names = sorted(p.name for p in latents.glob("*.safetensors"))
    assert names == [f"{i:05d}_s{s}.safetensors" for i in (0, 1) for s in (3, 5)]
    meta = json.loads((latents / "00001_s5.json").read_text())
    assert meta["prompt"] == "a house by the sea" and meta["seed"] == 5
    assert meta["scaling_factor"] == SCALING
    z = read_latent(latents / "00001_s5.safetensors")
    ref = direct_latents(pipe, "a house by the sea", 5)[0]
    torch.testing.assert_close(z, ref / SCALING, rtol=1e-5, atol=1e-5)

    before = (latents / "00000_s3.safetensors").stat().st_mtime_ns
    assert txt2img_latents.main(argv) == 0  # resume: nothing regenerated
    assert (latents / "00000_s3.safetensors").stat().st_mtime_ns == before

    out = tmp_path / "images"
    argv = [
        str(latents),
        *("--ckpt", str(root / "fa_vae_kl_f8_tiny.safetensors"), "-o", str(out)),
        *("--compare-sd-vae", str(root / "pipe"), "--device", "cpu", "--quiet"),
    ]
    assert txt2img_decode.main(argv) == 0
    for kind in ("fa_vae", "sd_vae", "side_by_side"):
        assert sorted(p.stem for p in (out / kind).glob("*.png")) == [n[:-12] for n in names]
    fa_img = read_image(out / "fa_vae" / "00001_s5.png")
    expected = decode_latents(fa, z)[0]
    assert fa_img.shape == (3, 64, 64)
    assert (fa_img - expected).abs().max() <= 0.5 / 255 + 1e-6
    sd_img = read_image(out / "sd_vae" / "00001_s5.png")
    sd_expected = decode_latents(pipe.vae, z)[0]
    assert (sd_img - sd_expected).abs().max() <= 0.5 / 255 + 1e-6
    both = read_image(out / "side_by_side" / "00001_s5.png")
    assert both.shape == (3, 64, 128)
    torch.testing.assert_close(both, torch.cat([sd_img, fa_img], dim=-1))


def test_cli_decode_compare_with_vae_file(saved_models, tmp_path):
    """--compare-sd-vae with a checkpoint file in diffusers naming (converted to ours)."""
    from safetensors.torch import save_file

    root, pipe, _ = saved_models
    vae_file = tmp_path / "sd_vae.safetensors"
    save_file({k: v.contiguous() for k, v in pipe.vae.state_dict().items()}, str(vae_file))
    z = torch.randn(*LATENT)
    save_latent(z, tmp_path / "lat" / "00000_s1.safetensors")
    out = tmp_path / "out"
    argv = [
        str(tmp_path / "lat"),
        *("--ckpt", str(root / "fa_vae_kl_f8_tiny.safetensors"), "-o", str(out)),
        *("--compare-sd-vae", str(vae_file), "--sd-vae-config", "autoencoder/kl_f8_tiny"),
        *("--device", "cpu", "--quiet"),
    ]
    assert txt2img_decode.main(argv) == 0
    sd_img = read_image(out / "sd_vae" / "00000_s1.png")
    sd_expected = decode_latents(pipe.vae, z)[0]  # diffusers' own decode of the same latent
    assert (sd_img - sd_expected).abs().max() <= 0.5 / 255 + 1e-5


def test_cli_latents_errors(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    hub_id = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert txt2img_latents.main(["--model", hub_id, "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert hub_id in err and "local" in err and "folder" in err
    assert txt2img_latents.main(["--model", "./no/such/dir", "--prompts", str(prompts)]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n# only a comment\n", encoding="utf-8")
    argv = ["--model", hub_id, "--prompts", str(tmp_path / "empty.txt")]
    assert txt2img_latents.main(argv) == 2
    assert "holds no prompts" in capsys.readouterr().err


def test_cli_decode_errors(saved_models, tmp_path, capsys):
    root, _, _ = saved_models
    ckpt = str(root / "fa_vae_kl_f8_tiny.safetensors")
    torch.save(torch.randn(*LATENT), tmp_path / "a.pt")
    save_latent(torch.randn(*LATENT), tmp_path / "a.safetensors")
    assert txt2img_decode.main([str(tmp_path), "--ckpt", ckpt, "--quiet"]) == 2
    assert "same output name 'a'" in capsys.readouterr().err
    assert txt2img_decode.main([str(tmp_path / "nope"), "--ckpt", ckpt]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    # a plain KL autoencoder is not the FA-VAE: the loader says what the file is
    plain = load_config("autoencoder/kl_f8_tiny")
    save_pretrained(instantiate(plain), tmp_path / "plain.safetensors", plain)
    argv = [str(tmp_path / "a.pt"), "--ckpt", str(tmp_path / "plain.safetensors")]
    assert txt2img_decode.main(argv) == 2
    assert "kl_model" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float16_paths(saved_models, tmp_path):
    """GPU check: both CLIs and the swapped pipeline in float16 on CUDA."""
    from fa_vae.diffusers_swap import swap_vae_decoder

    root, _, fa = saved_models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n", encoding="utf-8")
    latents, out = tmp_path / "latents", tmp_path / "images"
    argv = [
        *("--model", str(root / "pipe"), "--prompts", str(prompts), "-o", str(latents)),
        *("--seeds", "1", "--steps", "2", "--device", "cuda", "--dtype", "float16", "--quiet"),
    ]
    assert txt2img_latents.main(argv) == 0
    z = read_latent(latents / "00000_s1.safetensors")
    assert z.shape == LATENT and torch.isfinite(z).all()
    argv = [
        str(latents),
        *("--ckpt", str(root / "fa_vae_kl_f8_tiny.safetensors"), "-o", str(out)),
        *("--compare-sd-vae", str(root / "pipe"), "--device", "cuda", "--dtype", "float16"),
        "--quiet",
    ]
    assert txt2img_decode.main(argv) == 0
    img = read_image(out / "fa_vae" / "00000_s1.png")
    assert (img - decode_latents(fa, z)[0]).abs().max() < 0.05  # fp16 GPU vs fp32 CPU

    pipe = tiny_pipe().to("cuda", torch.float16)
    fa16, _ = tiny_fa_vae()
    swap_vae_decoder(pipe, fa16)
    kwargs = {"prompt": ["a boat"], "num_inference_steps": 2, "guidance_scale": 3.0}
    gen = [torch.Generator("cuda").manual_seed(5)]
    got = pipe(**kwargs, generator=gen, output_type="pt").images
    z16 = generate_latents(pipe, ["a boat"], [5], steps=2, guidance=3.0)[0]
    torch.testing.assert_close(got.float(), decode_latents(fa16, z16), rtol=0, atol=1e-2)


def test_cli_decode_checks_the_output_type_before_loading(tmp_path, capsys, monkeypatch):
    """Issue: an unknown --suffix failed only when the first image was written."""
    save_latent(torch.randn(*LATENT), tmp_path / "lat" / "00000_s1.safetensors")
    monkeypatch.setattr(txt2img_decode, "load_fa_vae", lambda *a, **k: pytest.fail("loaded"))
    argv = [str(tmp_path / "lat"), "--ckpt", "x.pth", "-o", str(tmp_path / "o")]
    assert txt2img_decode.main([*argv, "--suffix", ".xyz"]) == 2
    assert "cannot write images of type '.xyz'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
