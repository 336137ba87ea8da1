"""ParameterEMA: validation and checkpoints see the average, training the raw weights; resuming is exact."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from multimodal_rec.weight_averaging import ParameterEMA


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.register_buffer("table", torch.arange(6.0))  # a buffer: neither averaged nor touched
        self.seen_in_validation: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.seen_in_validation.append(self.net.weight.detach().clone())
        x, y = batch
        self.log("val/loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordRaw(pl.Callback):
    """The raw weight after every optimiser step (runs before ParameterEMA: callbacks go in list order)."""

    def __init__(self):
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(pl_module.net.weight.detach().clone())


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(64, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def fit(tmp_path, epochs: int, callbacks: list, ckpt_path=None) -> tuple[Regression, pl.Trainer]:
    torch.manual_seed(0)
    model = Regression()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(model, loader(), loader(), ckpt_path=ckpt_path)
    return model, trainer


def expected_average(raw: list[torch.Tensor], initial: torch.Tensor, decay: float) -> list[torch.Tensor]:
    average, out = initial.clone(), []
    for step, weight in enumerate(raw, start=1):
        rate = min(decay, (1 + step) / (10 + step))
        average = rate * average + (1 - rate) * weight
        out.append(average.clone())
    return out


def test_validation_and_checkpoints_use_the_average(tmp_path):
    torch.manual_seed(0)
    initial = Regression().net.weight.detach().clone()
    record, ema = RecordRaw(), ParameterEMA(decay=0.9)
    model, trainer = fit(tmp_path, 2, [record, ema])
    averages = expected_average(record.weights, initial, 0.9)
    steps_per_epoch = len(loader())
    # validation after epoch e saw the average of the steps so far, not the raw weights
    for epoch, seen in enumerate(model.seen_in_validation):
        step = (epoch + 1) * steps_per_epoch - 1
        assert torch.allclose(seen, averages[step], atol=1e-6)
        assert not torch.allclose(seen, record.weights[step], atol=1e-4)
    assert torch.allclose(model.net.weight, averages[-1], atol=1e-6)  # what test/export see after fit
    assert torch.equal(model.table, torch.arange(6.0))
    best = trainer.checkpoint_callback.best_model_path
    checkpoint = torch.load(best, weights_only=True)
    assert torch.allclose(checkpoint["state_dict"]["net.weight"], averages[-1], atol=1e-6)
    assert torch.allclose(checkpoint["ema_raw_weights"]["net.weight"], record.weights[-1], atol=1e-6)
    # testing the checkpoint (with the callback still on the trainer) evaluates the average, not the raw weights
    model.seen_in_validation.clear()
    trainer.validate(model, loader(), ckpt_path=best, weights_only=True, verbose=False)
    assert torch.allclose(model.seen_in_validation[0], averages[-1], atol=1e-6)


def test_resuming_continues_both_the_raw_and_the_averaged_weights(tmp_path):
    straight, _ = fit(tmp_path / "straight", 3, [ParameterEMA(decay=0.9)])
    first, trainer = fit(tmp_path / "first", 1, [ParameterEMA(decay=0.9)])
    resumed_ema = ParameterEMA(decay=0.9)
    resumed, _ = fit(tmp_path / "resumed", 3, [resumed_ema], ckpt_path=trainer.checkpoint_callback.best_model_path)
    assert torch.allclose(resumed.net.weight, straight.net.weight, atol=1e-6)
    assert not torch.allclose(first.net.weight, straight.net.weight, atol=1e-4)


def test_decay_must_be_a_fraction():
    with pytest.raises(ValueError, match="decay"):
        ParameterEMA(decay=1.0)
    with pytest.raises(ValueError, match="warmup"):
        ParameterEMA(warmup=1.0)


@pytest.mark.parametrize("warmup, step, expected", [(10, 0, 0.1), (10, 800, 801 / 810), (2, 98, 0.99), (2, 500, 0.99)])
def test_warmup_caps_the_decay_until_the_run_is_long_enough(warmup, step, expected):
    ema = ParameterEMA(decay=0.99, warmup=warmup)
    module = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(0.0)
    ema.average = {"weight": torch.ones(1, 1)}
    trainer = type("Trainer", (), {"global_step": step})()
    ema.on_train_batch_end(trainer, type("Module", (), {"named_parameters": module.named_parameters})(), None, None, 0)
    # average <- decay * 1 + (1 - decay) * 0
    assert ema.average["weight"].item() == pytest.approx(expected)
