"""Hugging Face: a real tiny LlamaForCausalLM on wf-data batches, and Trainer resume."""

import json
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader as TorchDataLoader
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from tests.clients.streams import assert_streams_equal
from wf_data.data.deliver.factory import get_loader
from wf_data.integrations.hf_trainer import STATE_FILE, LoaderStateCallback
from wf_data.integrations.torch_dataset import LoaderDataset, check_model

VOCAB = 8192  # the shipped wf-data-demo tokenizer


def tiny_llama(use_cache=False, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        use_cache=use_cache,
    )
    return LlamaForCausalLM(config)


def test_model_forward_backward_on_a_batch(demo_config):
    batch = next(iter(TorchDataLoader(LoaderDataset(demo_config), batch_size=None)))
    model = tiny_llama()
    out = model(**batch)  # segment_ids / domain_ids ride along unused
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == batch["input_ids"].shape
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_packed_documents_do_not_attend_across_without_cache():
    model = tiny_llama().eval()
    first, second = torch.arange(5, 12)[None], torch.arange(40, 46)[None]
    packed = torch.cat([first, second], 1)
    positions = torch.cat([torch.arange(7), torch.arange(6)])[None]
    with torch.no_grad():
        alone = model(input_ids=second, position_ids=torch.arange(6)[None]).logits
        together = model(input_ids=packed, position_ids=positions).logits[:, 7:]
        cached = model(input_ids=packed, position_ids=positions, use_cache=True).logits[:, 7:]
    torch.testing.assert_close(together, alone)  # the second document sees only itself
    assert not torch.allclose(cached, alone, atol=1e-4)  # why check_model warns


def test_check_model_warns_once_for_use_cache():
    cached, plain = tiny_llama(use_cache=True), tiny_llama(use_cache=False)
    with pytest.warns(UserWarning, match="use_cache=True.*crosses document boundaries"):
        assert check_model(cached) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_model(cached) is False  # once per model
        assert check_model(plain) is True


class RecordInputs(TrainerCallback):
    """Stops training at ``stop_at`` (an interruption) without touching the data path."""

    def __init__(self, stop_at=None):
        self.stop_at = stop_at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.stop_at:
            control.should_training_stop = True


def run_trainer(
    config, output_dir, max_steps, stop_at=None, resume=None, per_device=None, accumulation=1
):
    dataset = LoaderDataset(config, rows=True)
    model = tiny_llama()
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append({"input_ids": kwargs["input_ids"].clone()}),
        with_kwargs=True,
    )
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=2,
        save_strategy="steps",
        per_device_train_batch_size=per_device or config.global_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-3,
        ignore_data_skip=True,
        dataloader_num_workers=0,
        report_to="none",
        use_cpu=True,
        logging_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        callbacks=[LoaderStateCallback(dataset), RecordInputs(stop_at)],
    )
    trainer.train(resume_from_checkpoint=resume)
    return seen, dataset


@pytest.mark.slow
def test_trainer_resume_sees_the_uninterrupted_batches(demo_config, tmp_path):
    straight, _ = run_trainer(demo_config, tmp_path / "straight", max_steps=4)
    assert len(straight) == 4
    first, dataset = run_trainer(demo_config, tmp_path / "run", max_steps=4, stop_at=2)
    assert_streams_equal(first, straight[:2])
    # accelerate read ahead: the loader's own state would resume one batch too late.
    assert dataset.loader.step > 2
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / STATE_FILE).read_text())
    assert saved["loader"]["step"] == 2
    resumed, _ = run_trainer(
        demo_config, tmp_path / "run", max_steps=4, resume=str(tmp_path / "run" / "checkpoint-2")
    )
    assert_streams_equal(resumed, straight[2:])


@pytest.mark.slow
@pytest.mark.parametrize("per_device", [3, 8])
def test_trainer_batches_of_other_sizes_than_the_loaders_resume_exactly(
    demo_config, tmp_path, per_device
):
    # The consumed state used to count trainer steps as loader batches: with 3 rows per
    # trainer step and 4 per loader batch, the resume skipped rows (8 per step: repeated).
    straight, _ = run_trainer(demo_config, tmp_path / "straight", 4, per_device=per_device)
    run_trainer(demo_config, tmp_path / "run", 4, stop_at=2, per_device=per_device)
    checkpoint = str(tmp_path / "run" / "checkpoint-2")
    resumed, _ = run_trainer(
        demo_config, tmp_path / "run", 4, resume=checkpoint, per_device=per_device
    )
    assert_streams_equal(resumed, straight[2:])


@pytest.mark.slow
def test_device_batches_of_many_loader_batches_with_accumulation_resume_exactly(
    demo_config, tmp_path
):
    # A device batch of 17 loader batches of 4 rows, 2 micro-batches per step: accelerate reads
    # one micro-batch ahead, so the save at step 2 needs the state 17 + 1 loader batches back.
    # With a fixed history of the last 16 batch states it failed: "no saved state for step 68".
    options = dict(per_device=68, accumulation=2)
    run_trainer(demo_config, tmp_path / "run", 3, stop_at=2, **options)
    checkpoint = str(tmp_path / "run" / "checkpoint-2")
    resumed, _ = run_trainer(demo_config, tmp_path / "run", 3, resume=checkpoint, **options)
    # The uninterrupted stream's micro-batches 4 and 5: rows 272..407 of the loader's stream.
    loader = get_loader(demo_config, framework="numpy")
    rows = np.concatenate([next(loader)["input_ids"] for _ in range(102)])
    want = [{"input_ids": rows[start : start + 68]} for start in (272, 340)]
    assert_streams_equal(resumed, want)


def test_trainer_callback_refuses_data_skip(demo_config, tmp_path):
    dataset = LoaderDataset(demo_config, rows=True)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=4,
    )
    trainer = Trainer(
        model=tiny_llama(),
        args=args,
        train_dataset=dataset,
        callbacks=[LoaderStateCallback(dataset)],
    )
    with pytest.raises(ValueError, match="ignore_data_skip=True"):
        trainer.train()
