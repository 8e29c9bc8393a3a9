"""Loading released stage checkpoints and our expert safetensors (moe_sr/checkpoints.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import CheckpointError, CheckpointMismatchError
from moe_sr.checkpoints import (
    ema_key_map,
    load_expert,
    load_released_stage,
    read_expert_metadata,
    resolve_expert_order,
    save_expert,
    stage_from_filename,
)
from tests.moe_sr_helpers import (
    FakeSchedule,
    fake_ldm_buffers,
    manifest_unet_shapes,
    module_from_shapes,
    released_state_dict,
)

TINY = {
    "time_embed.0.weight": [8, 4],
    "input_blocks.0.0.weight": [4, 6, 3, 3],
    "input_blocks.1.1.norm.weight": [4],
    "input_blocks.11.0.weight": [4, 4],
    "middle_block.2.moe_blocks.10.0.weight": [8, 4],
    "out.2.bias": [3],
}


def _tiny_release(tmp_path: Path, name: str = "moe_stage0.ckpt"):
    raw = {k: torch.randn(s) for k, s in TINY.items()}
    ema = {k: torch.randn(s) for k, s in TINY.items()}
    buffers = fake_ldm_buffers()
    path = tmp_path / name
    torch.save(released_state_dict(raw, ema, buffers), path)
    return path, raw, ema, buffers


def test_ema_key_map_matches_the_release_naming():
    m = ema_key_map(["input_blocks.5.2.moe_blocks.0.0.weight"])
    assert m == {
        "input_blocks.5.2.moe_blocks.0.0.weight": "model_ema.diffusion_modelinput_blocks52moe_blocks00weight"
    }


def test_ema_key_map_rejects_ambiguous_names():
    with pytest.raises(CheckpointError, match="ambiguous"):
        ema_key_map(["blocks.1.10.weight", "blocks.11.0.weight"])


def test_ema_key_map_is_a_bijection_onto_the_manifest(manifests_dir):
    manifest = json.loads((manifests_dir / "moe_stage_ckpt.json").read_text())
    shapes = manifest_unet_shapes(manifests_dir)
    ema_keys = {k for k in manifest if k.startswith("model_ema.")}
    mapped = set(ema_key_map(shapes).values())
    assert len(mapped) == len(shapes) == 702
    assert ema_keys - mapped == {"model_ema.decay", "model_ema.num_updates"}


def test_sr8x_config_builds_the_released_unet_and_fa_vae(manifests_dir):
    """configs/moe_sr/sr8x.yaml: the expert UNet has exactly the released keys and shapes, so
    the EMA map covers every model_ema.* weight; the FA-VAE matches fa_vae.pth."""
    from ldm.config import instantiate
    from moe_sr.build import load_pipeline_config

    cfg = load_pipeline_config("moe_sr/sr8x")
    with torch.device("meta"):
        unet = instantiate(cfg["unet"])
        vae = instantiate(cfg["vae"])
    shapes = manifest_unet_shapes(manifests_dir)
    assert {k: list(v.shape) for k, v in unet.state_dict().items()} == shapes
    vae_manifest = json.loads((manifests_dir / "fa_vae_vqf4.json").read_text())
    assert {k: list(v.shape) for k, v in vae.state_dict().items()} == {
        k: s for k, (s, _) in vae_manifest.items()
    }


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_load_released_tiny(tmp_path, weights):
    path, raw, ema, buffers = _tiny_release(tmp_path)
    unet = module_from_shapes(TINY)
    info = load_released_stage(path, unet, weights=weights, schedule=FakeSchedule(buffers))
    want = ema if weights == "ema" else raw
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0)
    assert info.stage == 0 and info.source == f"released-{weights}"
    assert info.ema_num_updates == (1234 if weights == "ema" else None)


def test_load_released_is_strict(tmp_path):
    path, *_ = _tiny_release(tmp_path)
    extra = dict(TINY, **{"out.2.weight": [3, 4, 3, 3]})
    with pytest.raises(CheckpointMismatchError, match=r"missing \(1\): out.2.weight"):
        load_released_stage(path, module_from_shapes(extra))
    fewer = {k: v for k, v in TINY.items() if k != "out.2.bias"}
    with pytest.raises(CheckpointMismatchError, match="unexpected"):
        load_released_stage(path, module_from_shapes(fewer))
    wrong = dict(TINY, **{"out.2.bias": [4]})
    with pytest.raises(CheckpointMismatchError, match=r"out.2.bias: file \(3,\) vs model \(4,\)"):
        load_released_stage(path, module_from_shapes(wrong))


def test_schedule_mismatch_errors_or_warns(tmp_path):
    path, _, ema, buffers = _tiny_release(tmp_path)
    other = dict(buffers, betas=buffers["betas"] * 1.01)
    with pytest.raises(CheckpointMismatchError, match="betas"):
        load_released_stage(path, module_from_shapes(TINY), schedule=FakeSchedule(other))
    unet = module_from_shapes(TINY)
    with pytest.warns(UserWarning, match="noise schedule differs"):
        load_released_stage(path, unet, schedule=FakeSchedule(other), schedule_check="warn")
    torch.testing.assert_close(unet.state_dict()["out.2.bias"], ema["out.2.bias"])


def test_missing_group_and_bad_files(tmp_path):
    only_raw = {"model.diffusion_model." + k: torch.randn(s) for k, s in TINY.items()}
    torch.save(only_raw, tmp_path / "raw_only.ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"no ema UNet weights.*weights='raw'"):
        load_released_stage(tmp_path / "raw_only.ckpt", module_from_shapes(TINY))
    (tmp_path / "trunc.ckpt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="not a PyTorch zip checkpoint"):
        load_released_stage(tmp_path / "trunc.ckpt", module_from_shapes(TINY))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_released_stage(tmp_path / "nope.ckpt", module_from_shapes(TINY))


def test_safetensors_round_trip_and_metadata(tmp_path):
    unet = module_from_shapes(TINY)
    cfg = {"target": "some_unet", "params": {"width": 4}}
    path = save_expert(
        unet, tmp_path / "e.safetensors", config=cfg, stage=2, num_stages=4, t_range=(500, 750)
    )
    meta = read_expert_metadata(path)
    assert meta == {"stage": 2, "num_stages": 4, "t_range": (500, 750), "config": cfg}
    fresh = module_from_shapes(TINY)
    info = load_expert(path, fresh)
    assert info.stage == 2 and info.t_range == (500, 750)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, unet.state_dict()[k])
    with pytest.raises(CheckpointMismatchError, match="missing"):
        load_expert(path, module_from_shapes(dict(TINY, extra=[1])))


def test_stage_from_filename():
    assert stage_from_filename("models/Unet/moe_stage2.ckpt") == 2
    assert stage_from_filename("expert_stage_3.safetensors") == 3
    assert stage_from_filename("unet.ckpt") is None


def test_order_from_filenames_and_metadata(tmp_path):
    names = [tmp_path / f"moe_stage{k}.ckpt" for k in range(4)]
    assert resolve_expert_order(names, 4) == names
    swapped = [names[0], names[2], names[1], names[3]]
    with pytest.raises(ValueError, match="moe_stage2.ckpt is at stage position 1"):
        resolve_expert_order(swapped, 4)
    with pytest.raises(ValueError, match="3 expert checkpoint"):
        resolve_expert_order(names[:3], 4)
    # our files: metadata decides, whatever order the user gives
    unet = module_from_shapes(TINY)
    files = []
    for k in range(4):
        files.append(
            save_expert(
                unet,
                tmp_path / f"e{k}.safetensors",
                config={"target": "x"},
                stage=k,
                num_stages=4,
                t_range=(250 * k, 250 * k + 250),
            )
        )
    assert resolve_expert_order(files[::-1], 4) == files
    dup = [files[0], files[0], files[2], files[3]]
    with pytest.raises(ValueError, match="both say they are stage 0"):
        resolve_expert_order(dup, 4)


# ----------------------------------------------------------------------------- memory

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from moe_sr.checkpoints import load_released_stage, ema_key_map
    from tests.moe_sr_helpers import manifest_unet_shapes, module_from_shapes

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    path, manifests = Path(sys.argv[1]), Path(sys.argv[2])
    shapes = manifest_unet_shapes(manifests)
    unet = module_from_shapes(shapes, empty=True)
    before = hwm()
    info = load_released_stage(path, unet, weights="ema")
    after = hwm()
    keymap = ema_key_map(shapes)
    order = {k: i for i, k in enumerate(keymap)}
    bad = []
    for k, v in unet.state_dict().items():
        flat = v.reshape(-1)
        if flat[0].item() != order[k] + 1 or flat[-1].item() != -(order[k] + 1):
            bad.append(k)
    print(json.dumps({"before": before, "after": after, "bad": bad[:5],
                      "n": len(keymap), "updates": info.ema_num_updates}))
    """
)

_SYNTH_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from moe_sr.checkpoints import ema_key_map
    # Full-size release layout: tensors of the manifest's shapes/dtypes, uninitialised (zero
    # pages) except markers that identify the EMA tensors after loading.
    manifest = json.loads(Path(sys.argv[2], "moe_stage_ckpt.json").read_text())
    pre = "model.diffusion_model."
    unet_keys = [k[len(pre):] for k in manifest if k.startswith(pre)]
    inverse = {v: i for i, v in enumerate(ema_key_map(unet_keys).values())}
    dtypes = {"float32": torch.float32, "int32": torch.int32, "int64": torch.int64}
    sd = {}
    for k, (shape, dt) in manifest.items():
        t = torch.zeros(shape, dtype=dtypes[dt]) if not shape else torch.empty(shape, dtype=dtypes[dt])
        if k in inverse and t.numel():
            t.view(-1)[0] = inverse[k] + 1
            t.view(-1)[-1] = -(inverse[k] + 1)
        elif k.startswith(pre) and t.numel():
            t.view(-1)[0] = 1e6
        sd[k] = t
    torch.save(sd, sys.argv[1])
    """
)


def _run(script: str, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, cwd=root
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_full_size_release_loads_with_one_expert_of_memory(tmp_path, manifests_dir):
    """A synthesised full-size moe_stage2.ckpt (3.65 GB) loads with ~1 UNet of peak memory."""
    manifest = json.loads((manifests_dir / "moe_stage_ckpt.json").read_text())
    ckpt = tmp_path / "moe_stage2.ckpt"
    t0 = time.perf_counter()
    _run(_SYNTH_SCRIPT, str(ckpt), str(manifests_dir))
    file_bytes = ckpt.stat().st_size
    assert file_bytes == pytest.approx(3_650_000_000, rel=0.01)
    expert_bytes = 4 * sum(
        int(torch.tensor(s).prod()) if s else 1
        for k, (s, _) in manifest.items()
        if k.startswith("model.diffusion_model.")
    )
    out = json.loads(_run(_MEMORY_SCRIPT, str(ckpt), str(manifests_dir)).strip().splitlines()[-1])
    grew = out["after"] - out["before"]
    print(
        f"file {file_bytes / 1e9:.2f} GB, one UNet {expert_bytes / 1e9:.2f} GB, peak RSS growth "
        f"while loading {grew / 1e9:.2f} GB, total {time.perf_counter() - t0:.0f} s"
    )
    assert out["bad"] == [] and out["n"] == 702
    assert grew < 1.1 * expert_bytes + 150e6, grew
    assert grew < 0.6 * file_bytes


def test_tiny_release_loads_without_reading_the_other_groups(tmp_path):
    """Tiny-size version of the memory check: huge unused groups do not raise peak RSS."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux)")
    raw = {k: torch.randn(s) for k, s in TINY.items()}
    ema = {k: torch.randn(s) for k, s in TINY.items()}
    big = {"encoder.big.weight": torch.randn(64, 1024, 1024)}  # 256 MB of unused first stage
    ckpt = tmp_path / "moe_stage1.ckpt"
    torch.save(released_state_dict(raw, ema, fake_ldm_buffers(), first_stage=big), ckpt)
    del big
    script = textwrap.dedent(
        """
        import json, sys, torch
        from moe_sr.checkpoints import load_released_stage
        from tests.moe_sr_helpers import module_from_shapes
        from tests.test_moe_checkpoints import TINY
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        unet = module_from_shapes(TINY)
        before = hwm()
        load_released_stage(sys.argv[1], unet)
        print(json.dumps({"grew": hwm() - before}))
        """
    )
    out = json.loads(_run(script, str(ckpt)).strip().splitlines()[-1])
    assert out["grew"] < 64e6, out


def test_released_schedule_buffers_pass_the_check(reference_root):
    """The 12 buffers the official model stores (schedule fixture) agree with the sr8x
    schedule; a cosine schedule is caught."""
    from safetensors.torch import load_file

    from ldm.diffusion.schedule import NoiseSchedule
    from moe_sr.build import build_schedule, load_pipeline_config
    from moe_sr.checkpoints import SCHEDULE_BUFFER_NAMES, check_schedule_buffers

    io = load_file(str(reference_root / "fixtures" / "schedule" / "io.safetensors"))
    released = {n: io[n] for n in SCHEDULE_BUFFER_NAMES}
    ours = build_schedule(load_pipeline_config("moe_sr/sr8x")["schedule"])
    assert check_schedule_buffers(released, ours) == []
    with pytest.raises(CheckpointMismatchError, match="betas"):
        check_schedule_buffers(released, NoiseSchedule.cosine())
