"""`repsim distill` and `repsim finetune`: training options in, the run's report printed."""

from __future__ import annotations

import argparse

from repsim.distill import distill_command, finetune_command


def training_kwargs(args: argparse.Namespace) -> dict:
    """The options `distill` and `finetune` share, as keyword arguments of the library."""
    return dict(data=args.data, val_data=args.val_data, max_train=args.max_train, max_val=args.max_val,
                task=args.task, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                max_length=args.max_length, seed=args.seed, checkpoint_every=args.checkpoint_every,
                device=args.device, progress=not args.no_progress, out=args.out)


def run_distill(args: argparse.Namespace) -> int:
    print(distill_command(args.teacher, args.student, **training_kwargs(args), losses=args.loss,
                          seeds=args.seeds, alpha=args.alpha, beta=args.beta, temperature=args.temperature,
                          layer_map=args.layer_map, features=args.features,
                          first_token=args.first_token, feature_scale=args.feature_scale,
                          calibration_batches=args.calibration_batches, projection_init=args.projection_init,
                          projection_lr=args.projection_lr, max_grad_norm=args.max_grad_norm,
                          finetune_teacher=args.finetune_teacher,
                          teacher_epochs=args.teacher_epochs, teacher_lr=args.teacher_lr,
                          teacher_batch_size=args.teacher_batch_size, keep_students=args.keep_students,
                          geometry_permutations=args.geometry))
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    print(finetune_command(args.model, **training_kwargs(args)))
    return 0
