"""User-level DP-SGD: Opacus's accountant, per-user gradients, clipping in force, the budget never exceeded."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial

import pytest
import torch
from opacus.accountants import RDPAccountant

from multimodal_rec.data.sequences import IGNORE_TARGET
from multimodal_rec.data.user_sampling import UserWindows, user_sampled_loader
from multimodal_rec.models.build import build_model
from multimodal_rec.models.components.history_encoder import HistoryEncoder
from multimodal_rec.models.components.item_tower import ItemTower
from multimodal_rec.models.privacy import UserLevelPrivacy, per_sample_gradients, per_user_losses
from multimodal_rec.models.recommender import MultimodalRecommender
from tests.conftest import PROJECT_ROOT, tiny_datamodule

pytestmark = pytest.mark.filterwarnings("ignore:.*Optimal order.*")
PRIVATE = {"enabled": True, "epsilon": 3.0, "delta": None, "max_grad_norm": 1.0}


def test_epsilon_grows_with_steps_and_is_opacus_own_figure():
    privacy = UserLevelPrivacy(epsilon=2.0, delta=1e-3)
    privacy.plan(n_users=200, expected_batch=20, epochs=3)
    reference, spent = RDPAccountant(), []
    for _ in range(privacy.planned_steps):
        assert not privacy.would_exceed()
        privacy.step()
        reference.step(noise_multiplier=privacy.noise_multiplier, sample_rate=privacy.sample_rate)
        spent.append(privacy.spent())
        assert spent[-1] == pytest.approx(reference.get_epsilon(1e-3))
    assert spent == sorted(spent) and spent[0] < spent[-1]
    assert 1.9 < spent[-1] <= 2.0  # the planned epochs spend the target, not more
    assert privacy.would_exceed()  # one step more would


def _private_model(shop_dir, **privacy):
    datamodule = tiny_datamodule(shop_dir, max_len=5)
    datamodule.setup()
    torch.manual_seed(0)
    recommender = partial(MultimodalRecommender, item_tower=partial(ItemTower, fusion="residual"),
                          history_encoder=partial(HistoryEncoder), ranker=None,
                          optimizer=partial(torch.optim.SGD, lr=0.1), dim=8, loss="full", score="dot",
                          rerank_top=0, privacy={**PRIVATE, **privacy})
    model = build_model(datamodule, recommender, modalities=("id", "attributes")).eval()  # eval: no dropout
    batch = next(iter(user_sampled_loader(datamodule.train_set, 4)))
    while len(batch["targets"]) < 2:  # Poisson sampling: draw until two users came
        batch = next(iter(user_sampled_loader(datamodule.train_set, 4)))
    return model, batch, datamodule


def test_per_user_gradients_are_each_users_own(tiny_shop_dir):
    model, batch, _ = _private_model(tiny_shop_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    grad_samples, _ = per_sample_gradients(model, batch, IGNORE_TARGET, params)
    for user in range(len(batch["targets"])):
        alone = {key: value[user:user + 1] for key, value in batch.items()}
        loss = per_user_losses(model, alone, IGNORE_TARGET, model.all_item_embeddings()[0])[0]
        expected = torch.autograd.grad(loss, params, allow_unused=True)
        for param, grad_sample, own in zip(params, grad_samples, expected):
            assert torch.allclose(grad_sample[user], torch.zeros_like(param) if own is None else own, atol=1e-6)


def test_one_users_influence_is_clipped_to_max_grad_norm(tiny_shop_dir):
    model, batch, datamodule = _private_model(tiny_shop_dir, max_grad_norm=0.5)
    params = [p for p in model.parameters() if p.requires_grad]
    grad_samples, _ = per_sample_gradients(model, batch, IGNORE_TARGET, params)
    model.privacy.plan(len(datamodule.train_set.user_items), 4, 1)
    model.privacy.noise_multiplier = 0.0  # clipping alone, to see it
    optimizer = model.privacy.wrap(torch.optim.SGD(params, lr=1.0))
    users = len(batch["targets"])
    for param, grad_sample in zip(params, grad_samples):
        param.grad_sample = grad_sample * 1000.0  # a user whose gradient is huge
    optimizer.pre_step()
    summed = torch.sqrt(sum((p.summed_grad ** 2).sum() for p in params))
    raw = torch.sqrt(sum((g ** 2).sum() for g in grad_samples)) * 1000.0
    assert raw > 100 * users * 0.5 and summed <= users * 0.5 + 1e-4  # each of the users: at most 0.5


def test_one_window_per_user_and_step(tiny_shop_dir):
    datamodule = tiny_datamodule(tiny_shop_dir, max_len=2)
    datamodule.setup()
    users = UserWindows(datamodule.train_set)
    assert len(users) == len(datamodule.train_set.user_items) < len(datamodule.train_set)  # several windows a user
    for index in range(len(users)):
        assert int(users[index]["user"]) == int(users.users[index])


@pytest.mark.slow
def test_a_run_stops_before_it_would_exceed_its_epsilon(tmp_path):
    """Trained for the planned epochs, then resumed with more: the resumed run takes no step past the target."""
    common = ["debug=fast", f"data.processed_dir={tmp_path / 'data'}", f"paths.cache_dir={tmp_path / 'cache'}",
              "trainer.fast_dev_run=false", "privacy=dp", "privacy.epsilon=1.5", "test=false"]
    first = subprocess.run([sys.executable, str(PROJECT_ROOT / "train.py"), *common, "trainer.max_epochs=2",
                            f"hydra.run.dir={tmp_path / 'first'}"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    planned = json.loads((tmp_path / "first" / "metrics.json").read_text())["privacy"]
    assert 1.4 < planned["epsilon_spent"] <= 1.5 and planned["unit"] == "user"
    checkpoint = torch.load(tmp_path / "first" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["multimodal_rec"]["privacy"]["epsilon_spent"] == planned["epsilon_spent"]
    more = subprocess.run([sys.executable, str(PROJECT_ROOT / "train.py"), *common, "trainer.max_epochs=5",
                           f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}",
                           f"hydra.run.dir={tmp_path / 'more'}"], capture_output=True, text=True, timeout=600)
    assert more.returncode == 0, more.stderr[-3000:]
    resumed = json.loads((tmp_path / "more" / "metrics.json").read_text())["privacy"]
    assert resumed["steps"] == planned["steps"] and resumed["epsilon_spent"] <= 1.5
    assert "would spend more than epsilon" in more.stderr + (tmp_path / "more" / "train.log").read_text()
    from multimodal_rec.export import export
    from multimodal_rec.serving.service import RecommenderService
    from tests.conftest import export_config

    manifest = export(export_config(tmp_path / "first" / "checkpoints" / "last.ckpt", tmp_path / "artifacts"))
    assert manifest["privacy"]["epsilon_spent"] == planned["epsilon_spent"]
    assert RecommenderService(tmp_path / "artifacts").describe()["privacy"]["unit"] == "user"  # what /readyz shows


@pytest.mark.parametrize("setting", [{"future_steps": 1}, {"label_smoothing": 0.1}])
def test_private_training_refuses_terms_it_does_not_compute(tiny_shop_dir, setting):
    datamodule = tiny_datamodule(tiny_shop_dir, max_len=5)
    recommender = partial(MultimodalRecommender, item_tower=partial(ItemTower, fusion="residual"),
                          history_encoder=partial(HistoryEncoder), ranker=None,
                          optimizer=partial(torch.optim.SGD, lr=0.1), dim=8, loss="full", score="dot",
                          rerank_top=0, privacy=PRIVATE, **setting)
    with pytest.raises(ValueError, match="future_steps=0 and label_smoothing=0"):
        build_model(datamodule, recommender, modalities=("id", "attributes"))
