"""Pairing images for evaluation: two folders by file name, LR/HR folders by name and size.

Reading, listing and converting images is :mod:`ldm.data.image_io`'s."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ldm.data.image_io import list_images


def match_folders(pred_dir, ref_dir) -> list[tuple[Path, Path]]:
    """Pair the images of two folders by file name (the stem: ``a.png`` pairs with ``a.jpg``).

    Raises ``ValueError`` listing the unmatched names on each side (and duplicated stems).
    """
    pred, ref = list_images(pred_dir), list_images(ref_dir)
    if not ref:
        raise ValueError(f"no images in the reference folder {ref_dir}")
    if not pred:
        raise ValueError(f"no images in {pred_dir} (the folder to evaluate is empty)")
    by_stem: dict[str, dict[str, Path]] = {"pred": {}, "ref": {}}
    for side, files in (("pred", pred), ("ref", ref)):
        for f in files:
            if f.stem in by_stem[side]:
                raise ValueError(
                    f"two images named {f.stem!r} in {f.parent}: {by_stem[side][f.stem].name}, {f.name}"
                )
            by_stem[side][f.stem] = f
    only_pred = sorted(set(by_stem["pred"]) - set(by_stem["ref"]))
    only_ref = sorted(set(by_stem["ref"]) - set(by_stem["pred"]))
    if only_pred or only_ref:

        def fmt(names):
            shown = ", ".join(names[:20]) + (
                f" ... (+{len(names) - 20} more)" if len(names) > 20 else ""
            )
            return shown or "(none)"

        raise ValueError(
            "the folders do not pair up by file name:\n"
            f"  only in {pred_dir}: {fmt(only_pred)}\n"
            f"  only in {ref_dir}: {fmt(only_ref)}"
        )
    return [(by_stem["pred"][s], by_stem["ref"][s]) for s in sorted(by_stem["ref"])]


def image_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` from the file header (nothing decoded); ``None`` if unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError):
        return None


def check_lr_hr_pairs(lr_dir, hr_dir, scale: int) -> None:
    """Before an SR run whose outputs will be scored: every LR image has an HR image of the
    same name (stem) that is ``scale`` times its size, and every HR image an LR one. Raises
    ``ValueError`` listing the problems (from the file headers; nothing is decoded)."""
    lr = {p.stem: p for p in list_images(lr_dir)}
    hr = {p.stem: p for p in list_images(hr_dir)}
    if not lr:
        raise ValueError(f"no images in the LR folder {lr_dir}")
    problems = [
        f"{lr[s].name}: no HR image named {s}.* in {hr_dir}" for s in sorted(set(lr) - set(hr))
    ]
    problems += [
        f"{hr[s].name}: no LR image named {s}.* in {lr_dir}" for s in sorted(set(hr) - set(lr))
    ]
    for s in sorted(set(lr) & set(hr)):
        lr_size, hr_size = image_size(lr[s]), image_size(hr[s])
        if hr_size is None:
            problems.append(f"{hr[s]}: not a readable image")
        elif lr_size is not None and hr_size != (lr_size[0] * scale, lr_size[1] * scale):
            problems.append(
                f"{hr[s].name}: {hr_size[0]}x{hr_size[1]} is not {scale}x its LR image "
                f"({lr_size[0]}x{lr_size[1]})"
            )
    if problems:
        more = f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ValueError(
            f"the LR and HR folders do not pair up for {scale}x evaluation: "
            + "; ".join(problems[:10])
            + more
        )
