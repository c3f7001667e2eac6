"""What a run's generator draws, against the real images: which classes, how smooth, how sure.

A student learns only what its teacher says about the generator's images. A class the generator
never draws (the teacher's argmax never lands on it) is a class the student is never shown, and
it scores about 0 on it whatever the rest of the recipe does. This diagnostic loads a run's
checkpoint (its generator, its configuration and its teacher), draws ``--images`` synthetic images,
and puts them beside as many real validation images in the teacher's normalised space:

* ``per_image_std``: the spread of values inside an image (mean over images);
* ``total_variation``: the mean absolute difference between neighbouring pixels (roughness);
* ``teacher_confidence``: the teacher's mean top softmax probability;
* ``classes``: how many images the teacher puts in each class (its argmax).

    python -m bench.synthetic_images runs/distill/photo-patches-.../checkpoint.pt

Classes the generator draws under a quarter of their even share are listed as rare (every run's
progress line counts them too, per epoch: ``rare classes N``). It runs on the CPU and reads only
validation images, which every run reads anyway.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench import positive_int
from lrra.config import LRRAConfig
from lrra.distiller_state import CheckpointError, load_checkpoint
from lrra.splits import EvaluationSplits
from lrra.teacher import prepare_teacher
from lrra.train import Distiller, rare_classes


def image_statistics(images: torch.Tensor, teacher: torch.nn.Module, num_classes: int) -> dict:
    with torch.no_grad():
        probabilities = teacher(images).float().softmax(1)
    rows = (images[:, :, 1:] - images[:, :, :-1]).abs().mean()
    columns = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().mean()
    return {"per_image_std": images.flatten(1).std(1).mean().item(),
            "total_variation": ((rows + columns) / 2).item(),
            "teacher_confidence": probabilities.max(1).values.mean().item(),
            "classes": torch.bincount(probabilities.argmax(1), minlength=num_classes).tolist()}


def synthetic_images(checkpoint: dict, count: int,
                     seed: int) -> tuple[torch.Tensor, torch.nn.Module, LRRAConfig, EvaluationSplits]:
    """``count`` images of the checkpoint's generator (in training mode, as the run draws them), then
    its teacher, configuration and evaluation splits, all on the CPU."""
    cfg = LRRAConfig.from_dict({**checkpoint["config"], "device": "cpu"})
    teacher, meta, _, evaluation = prepare_teacher(cfg)
    distiller = Distiller(cfg, teacher, evaluation, teacher_meta=meta)
    distiller.load_state_dict(checkpoint)
    latent = torch.randn(count, cfg.latent_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        images = distiller.generator(latent)
    return images, distiller.teacher, cfg, evaluation


def real_images(evaluation: EvaluationSplits, count: int) -> torch.Tensor:
    return torch.stack([evaluation.validation[i][0] for i in range(min(count, len(evaluation.validation)))])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.synthetic_images", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a run's checkpoint.pt (its run folder holds one)")
    parser.add_argument("--images", type=positive_int, default=512,
                        help="synthetic and real images compared (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator's latents (default 0)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    try:  # not a checkpoint, or its teacher or dataset gone: the usage error (exit 2)
        images, teacher, cfg, evaluation = synthetic_images(load_checkpoint(args.checkpoint), args.images, args.seed)
    except (CheckpointError, ValueError) as err:
        parser.error(str(err))
    figures = {"synthetic": image_statistics(images, teacher, cfg.num_classes),
               "real": image_statistics(real_images(evaluation, args.images), teacher, cfg.num_classes)}
    figures["rare_classes"] = rare_classes(figures["synthetic"]["classes"])
    print(f"{'':<10}{'per-image std':>14}{'roughness':>11}{'teacher sure':>14}  images per class (teacher's argmax)")
    for name, row in figures.items():
        if name != "rare_classes":
            print(f"{name:<10}{row['per_image_std']:>14.3f}{row['total_variation']:>11.3f}"
                  f"{row['teacher_confidence']:>14.3f}  {row['classes']}")
    if figures["rare_classes"]:
        print(f"rare: the generator draws classes {figures['rare_classes']} under a quarter of an even share; "
              "the student is hardly shown them")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
