"""Hugging Face ``Trainer`` support: loader state of the batches *consumed*, in each checkpoint.

accelerate reads one batch ahead of the trainer, so the loader's own state at a save points
one batch past what the model saw: resuming from it would skip a batch. ``LoaderStateCallback``
saves instead the state after the rows consumed, ``global_step * gradient_accumulation_steps *
train_batch_size``, into ``checkpoint-N/``, and on resume loads it back into the dataset before
the first batch is read. After each step it tells the ``LoaderDataset`` how many rows were
consumed, so that the dataset keeps the state of every batch read since, however many loader
batches a device batch holds (the Trainer's batch size need not be the loader's).

    dataset = LoaderDataset("demo", rows=True)          # the Trainer batches rows itself
    args = TrainingArguments(..., per_device_train_batch_size=b, max_steps=...,
                             ignore_data_skip=True, dataloader_num_workers=0)
    trainer = Trainer(model, args, train_dataset=dataset,
                      callbacks=[LoaderStateCallback(dataset)])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wf_data.atomic import read_json, write_json
from wf_data.extras import requires

with requires("torch", "hf", feature="the Hugging Face Trainer callback"):
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from wf_data.integrations.torch_dataset import LoaderDataset, check_model

__all__ = ["STATE_FILE", "LoaderStateCallback"]

STATE_FILE = "wf_data_loader_state.json"


class LoaderStateCallback(TrainerCallback):
    """Saves and restores a ``LoaderDataset``'s consumed-batch state with Trainer checkpoints.

    Needs ``ignore_data_skip=True`` (the Trainer would otherwise also skip batches after the
    restore) and ``dataloader_num_workers=0`` (use the loader's own ``num_workers``). Warns
    once if the model keeps ``use_cache=True`` (see ``check_model``).
    """

    def __init__(self, dataset: LoaderDataset):
        if not isinstance(dataset, LoaderDataset):
            raise TypeError(f"LoaderStateCallback needs a LoaderDataset, got {type(dataset)}")
        self.dataset = dataset

    def on_train_begin(self, args, state, control, model=None, **kwargs: Any):
        if not args.ignore_data_skip:
            raise ValueError(
                "LoaderStateCallback restores the loader from its saved state: set "
                "TrainingArguments(ignore_data_skip=True), or the Trainer skips batches again"
            )
        if args.dataloader_num_workers:
            raise ValueError(
                f"dataloader_num_workers={args.dataloader_num_workers}: the consumed-batch state "
                "lives in the main process; set it to 0 and use the loader's own num_workers"
            )
        if model is not None:
            check_model(model)
        if state.global_step > 0:
            path = checkpoint_dir(args, state.global_step) / STATE_FILE
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path}: no loader state for the checkpoint at step {state.global_step}; "
                    "restore it with dataset.load_state_dict(...) before trainer.train()"
                )
            self.dataset.load_state_dict(read_json(path))
        self.dataset.mark_consumed(consumed_rows(args, state))

    def on_step_end(self, args, state, control, **kwargs: Any):
        self.dataset.mark_consumed(consumed_rows(args, state))

    def on_save(self, args, state, control, **kwargs: Any):
        loader_state = self.dataset.state_at_rows(consumed_rows(args, state))
        if state.is_world_process_zero:  # the state is global: the same on every rank
            write_json(checkpoint_dir(args, state.global_step) / STATE_FILE, loader_state)


def consumed_rows(args, state) -> int:
    """Rows the Trainer has trained on after ``state.global_step`` steps: counted in rows, as
    the Trainer's batches need not be the loader's."""
    return state.global_step * args.gradient_accumulation_steps * args.train_batch_size


def checkpoint_dir(args, step: int) -> Path:
    """The folder the Trainer writes the checkpoint of ``step`` into."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
