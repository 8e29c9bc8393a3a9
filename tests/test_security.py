"""A weight file is data, never code (issue: loading a .safetensors ran arbitrary code).

Every loader and CLI that rebuilds a model from the config in a safetensors file's metadata is
fed files whose config tries to run code: a dotted import path, a nested target, a ``${...}``
interpolation, a registered name with smuggled parameters, a network of the wrong kind. Each
must be refused with a one-line error, and nothing may run: no marker file appears and the
probe module is never imported.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.checkpoint import CONFIG_KEY, CheckpointError, load_pretrained, read_safetensors_metadata
from ldm.config import ConfigError, instantiate, validate_untrusted

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "assets" / "demo"
PROBE = "moe_sr_pwn_probe"


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """An importable module whose import and whose ``run`` each leave a marker file; and the
    folder where ``os.system`` payloads would touch theirs."""
    pkg = tmp_path / "probe_pkg"
    pkg.mkdir()
    imported, ran, touched = tmp_path / "IMPORTED", tmp_path / "RAN", tmp_path / "PWNED"
    (pkg / f"{PROBE}.py").write_text(
        f"open({str(imported)!r}, 'w').close()\n"
        f"def run(*a, **k):\n    open({str(ran)!r}, 'w').close()\n"
    )
    monkeypatch.syspath_prepend(str(pkg))
    sys.modules.pop(PROBE, None)
    yield {"imported": imported, "ran": ran, "touched": touched}
    sys.modules.pop(PROBE, None)


def _nothing_ran(probe) -> None:
    assert not probe["imported"].exists(), "the probe module was imported"
    assert not probe["ran"].exists(), "the probe's code ran"
    assert not probe["touched"].exists(), "os.system ran"
    assert PROBE not in sys.modules


def _payloads(probe) -> dict[str, dict]:
    cmd = f"touch {probe['touched']}"
    unet_params = json.loads(
        read_safetensors_metadata(DEMO / "expert_stage0.safetensors")[CONFIG_KEY]
    )["params"]
    return {
        "os.system": {"target": "os.system", "params": {"command": cmd}},
        "dotted probe": {"target": f"{PROBE}.run", "params": {}},
        "nested target": {
            "target": "vq_model",
            "params": {
                "ddconfig": {"target": "os.system", "params": {"command": cmd}},
                "n_embed": 16,
                "embed_dim": 3,
            },
        },
        "nested probe in a list": {
            "target": "unet",
            "params": {**unet_params, "attention_resolutions": [{"target": f"{PROBE}.run"}]},
        },
        "interpolation": {
            "target": "vq_model",
            "params": {"ddconfig": "${oc.env:HOME}", "n_embed": 16, "embed_dim": 3},
        },
        "resolver import": {"target": "${oc.create:{target: os.system}}", "params": {}},
        "smuggled param": {
            "target": "unet",
            "params": {**unet_params, "attention_backend": {"target": f"{PROBE}.run"}},
        },
        "unknown param": {"target": "unet", "params": {**unet_params, "command": cmd}},
        "wrong type": {"target": "unet", "params": {**unet_params, "model_channels": "32; rm"}},
        "training module": {
            "target": "diffusion_sr",
            "params": {"unet": {"target": f"{PROBE}.run"}, "first_stage": "x.safetensors"},
        },
    }


def _rewrite(src: Path, dst: Path, config: dict) -> Path:
    meta = read_safetensors_metadata(src)
    meta[CONFIG_KEY] = json.dumps(config)
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


def test_validate_untrusted_refuses_every_payload(probe):
    for name, cfg in _payloads(probe).items():
        with pytest.raises(ConfigError) as err:
            validate_untrusted(cfg, source="file.safetensors", kinds=("autoencoder", "unet"))
        assert "file.safetensors" in str(err.value), name
        with pytest.raises(ConfigError):
            instantiate(cfg, trusted=False, source="file.safetensors")
    _nothing_ran(probe)


def test_validate_untrusted_accepts_our_own_files():
    for f in sorted(DEMO.glob("*.safetensors")):
        cfg = json.loads(read_safetensors_metadata(f)[CONFIG_KEY])
        assert validate_untrusted(cfg, source=str(f), kinds=("autoencoder", "unet")) == cfg


def test_trusted_configs_still_take_dotted_paths():
    """A config the user passes explicitly may name their own classes by import path."""
    layer = instantiate({"target": "torch.nn.Identity"})
    assert isinstance(layer, torch.nn.Identity)


def test_load_pretrained_refuses_payloads(probe, tmp_path):
    src = DEMO / "fa_vae.safetensors"
    for name, cfg in _payloads(probe).items():
        bad = _rewrite(src, tmp_path / f"{name.replace(' ', '_')}.safetensors", cfg)
        with pytest.raises(CheckpointError) as err:
            load_pretrained(bad)
        assert str(bad) in str(err.value), name
        assert "\n" not in str(err.value).strip(), name
    _nothing_ran(probe)


def test_wrong_kind_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"holds a unet \('unet'\), expected autoencoder"):
        load_pretrained(DEMO / "expert_stage0.safetensors", kinds=("autoencoder",))
    with pytest.raises(CheckpointError, match=r"holds an autoencoder .* expected unet"):
        load_pretrained(DEMO / "fa_vae.safetensors", kinds=("unet",))


def test_config_bigger_than_the_file_is_refused_before_allocation(tmp_path):
    """A registered target with parameters that ask for more than the file holds (e.g. a
    huge width) is refused on the meta device, before any memory is spent."""
    cfg = json.loads(read_safetensors_metadata(DEMO / "expert_stage0.safetensors")[CONFIG_KEY])
    cfg["params"]["model_channels"] = 32 * 4096
    bad = _rewrite(DEMO / "expert_stage0.safetensors", tmp_path / "huge.safetensors", cfg)
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_pretrained(bad, kinds=("unet",))


def test_non_json_metadata_names_the_file(tmp_path):
    src = DEMO / "fa_vae.safetensors"
    meta = read_safetensors_metadata(src)
    meta[CONFIG_KEY] = "{not json"
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(src)), str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"{bad}.*not valid JSON"):
        load_pretrained(bad)


# --------------------------------------------------------------------------- every loader / CLI


@pytest.fixture
def evil_folder(tmp_path, probe):
    """A copy of the demo weights whose files carry payload configs (one folder per payload)."""
    folders = {}
    for name, cfg in _payloads(probe).items():
        for victim in ("fa_vae", "expert_stage0"):
            folder = tmp_path / f"{victim}-{name.replace(' ', '_')}"
            folder.mkdir()
            for f in DEMO.glob("*.safetensors"):
                shutil.copy(f, folder / f.name)
            # only the config changes: an expert keeps its stage metadata
            _rewrite(folder / f"{victim}.safetensors", folder / f"{victim}.safetensors", cfg)
            folders[(victim, name)] = folder
    return folders


def test_python_loaders_refuse(evil_folder, probe):
    from fa_vae.released import load_released
    from ldm.autoencoders.loading import load_autoencoder
    from ldm.training.first_stage import build_first_stage
    from moe_sr.build import build_pipeline_from_folder

    for (victim, _name), folder in evil_folder.items():
        f = folder / f"{victim}.safetensors"
        with pytest.raises((CheckpointError, ConfigError, FileNotFoundError)):
            build_pipeline_from_folder(folder, "demo/sr8x_demo")
        if victim == "fa_vae":
            with pytest.raises((CheckpointError, ConfigError)):
                load_autoencoder(None, f)
            with pytest.raises((CheckpointError, ConfigError)):
                build_first_stage(str(f))
            with pytest.raises((CheckpointError, ConfigError)):
                load_released(f, "vq_f4")
    _nothing_ran(probe)


@pytest.mark.parametrize(
    "cli",
    ["sr-weights-dir", "sr-vae-ckpt", "sr-ckpt", "demo", "reconstruct"],
)
def test_clis_refuse_with_one_line(cli, evil_folder, probe, tmp_path, capsys):
    from ldm.cli import reconstruct
    from moe_sr.cli import demo, sr

    lr_dir = REPO / "assets" / "examples" / "lr"
    for (victim, name), folder in evil_folder.items():
        vae, e0 = folder / "fa_vae.safetensors", folder / "expert_stage0.safetensors"
        e1 = folder / "expert_stage1.safetensors"
        out = tmp_path / "out" / cli
        cfg = ["--config", "configs/demo/sr8x_demo.yaml", "--steps", "1", "--quiet"]
        argv = {
            "sr-weights-dir": [*cfg, "--weights-dir", str(folder), "-i", str(lr_dir), "-o", str(out)],
            "sr-vae-ckpt": [*cfg, "--ckpt", str(DEMO / "expert_stage0.safetensors"),
                            str(DEMO / "expert_stage1.safetensors"), "--vae-ckpt", str(vae),
                            "-i", str(lr_dir), "-o", str(out)],
            "sr-ckpt": [*cfg, "--ckpt", str(e0), str(e1), "--vae-ckpt",
                        str(DEMO / "fa_vae.safetensors"), "-i", str(lr_dir), "-o", str(out)],
            "demo": ["--demo-weights", str(folder), "--steps", "1", "-o", str(out), "--quiet"],
            "reconstruct": [str(lr_dir / "chelsea.png"), "--ckpt", str(vae), "-o", str(out),
                            "--lr-from-hr", "--quiet"],
        }[cli]  # fmt: skip
        if cli in ("sr-vae-ckpt", "reconstruct") and victim != "fa_vae":
            continue
        if cli == "sr-ckpt" and victim != "expert_stage0":
            continue
        main = {"demo": demo.main, "reconstruct": reconstruct.main}.get(cli, sr.main)
        code = main(argv)
        err = capsys.readouterr().err
        assert code != 0, (cli, victim, name)
        assert "Traceback" not in err
        assert not (out.exists() and any(out.rglob("*.png"))), (cli, victim, name)
    _nothing_ran(probe)
