"""`mixer predict CHECKPOINT IMAGE...`: the top-5 classes of each image, by name."""

from __future__ import annotations

import argparse
import glob
import io
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..recipes import EVAL_MODES
from . import add_permute_arguments, at_least, run_eval_mode, run_permutation

if TYPE_CHECKING:  # torch is imported when the command runs: `mixer predict --help` needs none of it
    import torch


def register(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Classify images with a checkpoint (or run directory), or with published "
        "weights via --model NAME --pretrained TAG (then every argument is an image)."
    )
    # One list whose first item is the checkpoint unless --pretrained: the usage says so, not a metavar repeated.
    p.usage = ("%(prog)s [options] CHECKPOINT IMAGE [IMAGE ...]\n"
               "       %(prog)s [options] --model NAME --pretrained TAG IMAGE [IMAGE ...]")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="checkpoint (unless --pretrained), then images")
    p.add_argument("--model", help="variant of the published weights, e.g. B/16")
    p.add_argument("--pretrained", metavar="TAG", help="published weights, e.g. imagenet1k")
    p.add_argument("--top", type=at_least(1), default=5, metavar="N", help="classes to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument("--eval-mode", "--mode", dest="mode", choices=EVAL_MODES,
                   help="preprocessing, as mixer eval's (SPEC §4): resize to the model's size, or resize the "
                   "shorter side and crop the centre (default: the one the run validated with, else resize)")
    add_permute_arguments(p)
    p.set_defaults(func=run)


def load_image(path: str, in_chans: int) -> tuple[torch.Tensor, list[str]]:
    """An image file as a uint8 (1, C, H, W) tensor, C = 1 or 3, decoded as training and evaluation decode
    it (`decode_image_bytes`: upright, transparency over white), and notes on the conversions made to
    feed a model with `in_chans` channels."""
    from PIL import ExifTags, Image

    from ..sources import UnknownPixelRange, decode_image_bytes, is_16_bit, read_image_file

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{p} is a folder; give its image files (a shell pattern such as {p}/*.jpg lists them).")
    if not p.is_file():
        if p.exists():  # a named pipe, socket or device: reading it could wait for ever
            raise ValueError(f"{p} is not a regular file (a pipe, socket or device); give an image file.")
        if not any(c in path for c in "*?["):
            raise FileNotFoundError(f"No image at {p}; check the path.")
        # A pattern reaches us as it is when it was quoted, or when it matched nothing (bash passes it on): which
        # one, its matches say.
        matches = len(glob.glob(path))
        if not matches:
            raise FileNotFoundError(f"No file matches {path}; check the pattern.")
        raise FileNotFoundError(f"{path} is a pattern, which the shell expands only unquoted (it matches {matches} "
                                f"file{'s' if matches > 1 else ''}); leave the pattern unquoted for the shell to expand.")
    try:
        data = read_image_file(p)
    except OSError as e:  # said for this image; the others are still classified
        raise ValueError(f"{p} cannot be read ({e.strerror}); check its permissions.") from None
    try:
        image = decode_image_bytes(data)
    except ValueError as e:
        if str(e).startswith("too large"):  # whole, but beyond PIL's limit
            raise ValueError(f"{p} is {e}; give a smaller copy of it.") from None
        if isinstance(e, UnknownPixelRange):  # readable, but its values cannot be made pixels without a guess
            raise ValueError(f"{p} is {e}.") from None
        raise ValueError(f"{p} is not a readable image ({e}); give a whole image file (JPEG, PNG, WebP, GIF, BMP "
                         "or TIFF).") from None
    # The file's own mode and tags (and the alpha of an image with transparency data, which decoding composited
    # through PIL): PIL's guard against decompression bombs, which decoding has already passed where it applies
    # (torchvision's decoders have none), would only stop (or, past half its limit, interrupt with a warning)
    # an image that decoded.
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(data)) as header:
            mode, sixteen_bit = header.mode, is_16_bit(header)
            # An alpha channel (or tRNS chunk) that is opaque everywhere leaves nothing to composite; 16-bit
            # greyscale is decoded without its transparency.
            transparent = (header.has_transparency_data and not sixteen_bit
                           and header.convert("RGBA").getextrema()[3][0] < 255)
            turned = header.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9)  # 1 upright; others invalid
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    decoded_as = "greyscale" if image.shape[0] == 1 else "RGB"
    wanted = "greyscale" if in_chans == 1 else "RGB"
    notes = []
    if sixteen_bit:  # rather than clipping every value above 255 to white
        notes.append("kept the top 8 bits of 16-bit greyscale")
    elif mode not in ("L", "RGB"):
        notes.append(f"read {'black-and-white' if mode == '1' else f'mode {mode}'} as {decoded_as}")
    if turned:
        notes.append("turned upright as its EXIF orientation says")
    if transparent:
        notes.append("composited its transparent pixels over white")
    if decoded_as != wanted:
        notes.append(f"converted {decoded_as} to {wanted}")
    return image[None], notes


def run(args: argparse.Namespace) -> int:
    import torch

    from ..transforms import eval_transform

    if args.pretrained or args.model:
        if not (args.pretrained and args.model):
            raise ValueError("Give both --model NAME and --pretrained TAG for published weights, or a checkpoint.")
        if not args.inputs:  # checked before the weights are fetched
            raise ValueError("Give at least one image: mixer predict --model NAME --pretrained TAG IMAGE...")
        if args.permute or args.permute_seed is not None:  # would be ignored without a word
            raise ValueError("--permute and --permute-seed apply a run's permutation, and published weights saw their "
                             "images unpermuted; leave them out with --pretrained.")
        from ..pretrained import load_pretrained

        model, images = load_pretrained(args.model, args.pretrained), args.inputs
        permute = None  # published weights saw their images as they are
        mode = run_eval_mode(None, args.mode)
    else:
        if len(args.inputs) < 2:
            raise ValueError("Give a checkpoint and at least one image: mixer predict CHECKPOINT IMAGE...")
        from ..checkpoints import load_checkpoint

        model, images = load_checkpoint(args.inputs[0]), args.inputs[1:]
        permute = run_permutation(args.inputs[0], model.config, args.permute, args.permute_seed)
        mode = run_eval_mode(args.inputs[0], args.mode)
    if model.num_classes == 0:
        raise ValueError("The model has no classification head, so it cannot predict classes; give it one with "
                         "mixer finetune --from CHECKPOINT --data DATA, or measure its features with mixer fewshot.")
    names = list(model.class_names or [])
    if len(names) != model.num_classes and model.num_classes == 1000:
        from ..pretrained import imagenet_class_names

        names = list(imagenet_class_names())
    if len(names) != model.num_classes:
        names = [f"class {i}" for i in range(model.num_classes)]
    cfg = model.config
    h, w = cfg.img_size
    prepare = eval_transform(cfg.img_size, cfg.in_chans, mode)  # as mixer eval prepares a dataset's images
    model.eval()
    k = min(args.top, model.num_classes)
    unreadable = 0
    for path in images:
        try:
            image, notes = load_image(path, cfg.in_chans)
        except (FileNotFoundError, ValueError) as e:  # said, and the other images are still classified
            unreadable += 1
            print(f"mixer predict: error: {e}", file=sys.stderr)
            if args.json:
                print(json.dumps({"image": path, "error": str(e)}))
            continue
        # Sizes as height×width, as every size of ours (img_size, the errors, the data's); said so where not square.
        ih, iw = image.shape[-2:]
        sizes = f"{ih}×{iw}" + (" (height×width)" if ih != iw or h != w else "")
        if mode == "resmall-crop":
            notes.append(f"resized and cropped its centre from {sizes} to the model's {h}×{w}")
        elif (ih, iw) != (h, w):
            notes.append(f"resized {sizes} to the model's {h}×{w}")
        if permute is not None:  # said, as mixer eval says it: the probabilities are of the permuted image
            notes.append(f"permuted ({permute.mode}, seed {permute.seed}) as the model was trained")
        x = prepare(image[0])[None]
        with torch.no_grad():
            probs = model(permute(x) if permute is not None else x).softmax(-1)[0]
        top = probs.topk(k)
        best = [(names[i], float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist())]
        for note in notes:
            print(f"{path}: note: {note}.", file=sys.stderr)
        if args.json:
            print(json.dumps({"image": path, "top": [{"class": n, "prob": p} for n, p in best], "notes": notes}))
        else:
            print(f"{path}:")
            for rank, (name, p) in enumerate(best, 1):
                print(f"  {f'{rank}.':<3} {name:<30} {p:7.2%}")  # aligned past 9 ranks too
    return 2 if unreadable else 0  # the status of a user error, as when nothing could be read
