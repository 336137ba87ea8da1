"""The retrieval losses and scores: full softmax against a hand computation, dot vs cosine, cold items."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from multimodal_rec.models.build import build_model
from multimodal_rec.models.components.history_encoder import HistoryEncoder
from multimodal_rec.models.components.item_tower import ItemTower
from multimodal_rec.models.components.scoring import item_scores
from multimodal_rec.models.components.text_encoder import TextEncoder
from multimodal_rec.models.recommender import MultimodalRecommender
from multimodal_rec.models.softmax_terms import future_loss, smoothed_cross_entropy
from tests.conftest import tiny_datamodule

pytestmark = pytest.mark.filterwarnings("ignore:.*self.log.*")


def tiny_model(shop_dir, **settings) -> tuple[MultimodalRecommender, dict]:
    """An ID + attributes model (no encoders) on the tiny shop, in eval mode (no dropout), and one batch."""
    datamodule = tiny_datamodule(shop_dir, max_len=5)
    datamodule.setup()
    torch.manual_seed(0)
    recommender = partial(MultimodalRecommender, item_tower=partial(ItemTower, fusion="residual"),
                          history_encoder=partial(HistoryEncoder), ranker=None,
                          optimizer=partial(torch.optim.AdamW), dim=8, **settings)
    model = build_model(datamodule, recommender, modalities=("id", "attributes")).eval()
    batch = next(iter(datamodule.train_dataloader()))
    return model, batch


def hand_full_softmax(model: MultimodalRecommender, batch: dict, scale: float, mask_seen: bool = False,
                      vectors: torch.Tensor | None = None) -> float:
    """Mean over every target of -log softmax(scale * q . v) over the items seen in training, term by term;
    with mask_seen, without the window's items up to the position (the target excepted); `vectors`: score
    these candidate vectors instead of the model's (the queries stay the model's)."""
    with torch.no_grad():
        vectors = model.all_item_embeddings()[0] if vectors is None else vectors
        queries = model.queries(batch["history"], batch["user"], batch["context_hour"])
        trained = [i for i in range(model.n_items) if not model.untrained_items[i]]
        losses = []
        for row, position in zip(*torch.nonzero(batch["targets"] >= 0, as_tuple=True)):
            q = queries[row, position]
            target = int(batch["targets"][row, position])
            seen = set()
            if mask_seen:
                earlier = batch["history"][row, : position + 1].tolist() + batch["before"][row].tolist()
                seen = set(earlier) - {target}
            logits = {i: scale * float(q @ vectors[i]) for i in trained if i not in seen}
            top = max(logits.values())
            log_norm = top + math.log(sum(math.exp(v - top) for v in logits.values()))
            losses.append(log_norm - logits[target])
    return sum(losses) / len(losses)


@pytest.mark.parametrize("score, scale", [("dot", 1.0), ("cosine", 1 / 0.07)])
def test_full_softmax_equals_a_hand_computation(tiny_shop_dir, score, scale):
    model, batch = tiny_model(tiny_shop_dir, loss="full", score=score, temperature=0.07)
    assert model.full_softmax and model.untrained_items.any()  # the tiny shop holds cold items out
    with torch.no_grad():
        loss = float(model.training_step(batch, 0))
    assert loss == pytest.approx(hand_full_softmax(model, batch, scale), rel=1e-4)


def test_mask_seen_leaves_each_positions_earlier_items_out_of_its_softmax(tiny_shop_dir):
    model, batch = tiny_model(tiny_shop_dir, loss="full", score="dot", mask_seen=True)
    assert (batch["before"] != model.pad).any()  # windows that start after the user's first items
    with torch.no_grad():
        loss = float(model.training_step(batch, 0))
    assert loss == pytest.approx(hand_full_softmax(model, batch, 1.0, mask_seen=True), rel=1e-4)
    assert loss < hand_full_softmax(model, batch, 1.0)  # fewer competitors
    repeat = {k: v.clone() for k, v in batch.items()}  # a target that is also an earlier item stays a target
    row, position = [int(x[-1]) for x in torch.nonzero(batch["targets"] >= 0, as_tuple=True)]
    repeat["targets"][row, position] = repeat["history"][row, position]
    with torch.no_grad():
        assert math.isfinite(float(model.training_step(repeat, 0)))


def test_content_loss_adds_a_softmax_over_every_items_content_only_vector(tiny_shop_dir):
    base, batch = tiny_model(tiny_shop_dir, loss="full", score="dot")
    model, _ = tiny_model(tiny_shop_dir, loss="full", score="dot", content_loss_weight=0.5)
    with torch.no_grad():
        extra = float(model.training_step(batch, 0)) - float(base.training_step(batch, 0))
        inputs = dict(model.items(torch.arange(model.n_items)))
        inputs["known"] = torch.zeros_like(inputs["known"])  # every item as a cold one: the unknown ID
        content_only = model.item_tower(inputs)
    assert not torch.allclose(content_only, model.all_item_embeddings()[0])
    assert extra == pytest.approx(0.5 * hand_full_softmax(model, batch, 1.0, vectors=content_only), rel=1e-4)
    with pytest.raises(ValueError, match="full softmax"):
        tiny_model(tiny_shop_dir, loss="sampled", content_loss_weight=0.5)


def test_cold_items_get_no_gradient_from_the_full_softmax(tiny_shop_dir):
    model, batch = tiny_model(tiny_shop_dir, loss="full", score="dot")
    model.training_step(batch, 0).backward()
    grad = model.item_tower.id_embedding.weight.grad  # (N + 1, d)
    cold = model.untrained_items
    assert grad[:-1][cold].abs().max() == 0 and grad[:-1][~cold].abs().max() > 0


def test_loss_auto_switches_to_sampled_above_the_documented_size(tiny_shop_dir):
    small, _ = tiny_model(tiny_shop_dir)
    large, batch = tiny_model(tiny_shop_dir, full_softmax_max_items=10)
    assert small.full_softmax and not large.full_softmax
    large.on_fit_start()
    assert torch.isfinite(large.training_step(batch, 0))
    with pytest.raises(ValueError, match="loss must be"):
        tiny_model(tiny_shop_dir, loss="softmax")


def test_loss_auto_samples_when_an_encoder_is_fine_tuned(tiny_shop_dir):
    """The full softmax encodes every item per step: with a fine-tuned transformer, every text (OOM on a GPU)."""
    datamodule = tiny_datamodule(tiny_shop_dir, max_len=5)
    text = partial(TextEncoder, pretrained=False, trainable_layers=-1, tiny_hidden=16)
    recommender = partial(MultimodalRecommender, item_tower=partial(ItemTower), history_encoder=partial(HistoryEncoder),
                          ranker=None, optimizer=partial(torch.optim.AdamW), dim=8)
    fine_tuned = build_model(datamodule, recommender, modalities=("id", "text"), text_encoder=text)
    assert fine_tuned.item_tower.text_encoder is not None and not fine_tuned.full_softmax
    forced = build_model(datamodule, partial(recommender, loss="full"), modalities=("id", "text"), text_encoder=text)
    assert forced.full_softmax  # loss=full still means full


def test_catalogue_scores_stay_float32_under_bf16_autocast():
    queries, vectors = torch.randn(16, 64), torch.randn(500, 64)
    exact = queries @ vectors.T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        blurred = queries @ vectors.T
        scores = item_scores(queries, vectors)
    assert (blurred.float() - exact).abs().max() > 1e-2  # what bf16 does to a plain product
    assert scores.dtype == torch.float32 and torch.allclose(scores, exact, atol=1e-5)


def test_dot_scores_keep_the_norms_and_cosine_drops_them(tiny_shop_dir):
    for score in ("dot", "cosine"):
        model, batch = tiny_model(tiny_shop_dir, score=score)
        with torch.no_grad():
            vectors, _ = model.all_item_embeddings()
            query = model.queries(batch["history"], batch["user"], batch["context_hour"])[:, -1]
        norms = torch.cat([vectors.norm(dim=1), query.norm(dim=1)])
        unit = torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
        assert unit == (score == "cosine")


def test_future_loss_adds_the_softmax_on_the_items_further_ahead(tiny_shop_dir):
    base, batch = tiny_model(tiny_shop_dir, loss="full", score="dot")
    model, _ = tiny_model(tiny_shop_dir, loss="full", score="dot", future_steps=2, future_weight=0.5)
    with torch.no_grad():
        extra = float(model.training_step(batch, 0)) - float(base.training_step(batch, 0))
    ahead = []
    for step in (1, 2):  # position t's target `step` steps further: the next item of position t + step
        shifted = dict(batch, targets=torch.full_like(batch["targets"], -100))
        shifted["targets"][:, :-step] = batch["targets"][:, step:]
        shifted["targets"][batch["targets"] < 0] = -100  # only positions with a next item of their own
        ahead.append(hand_full_softmax(model, shifted, 1.0))
    assert extra == pytest.approx(0.5 * sum(ahead) / 2, rel=1e-4)
    with pytest.raises(ValueError, match="full softmax"):
        tiny_model(tiny_shop_dir, loss="sampled", future_steps=1)


def test_future_loss_is_zero_when_no_window_reaches_that_far():
    logits = torch.tensor([[0.5, 2.0, float("-inf")], [1.0, -1.0, float("-inf")]])  # column 2: a cold item
    short = torch.tensor([[1, -100]])  # a window with one target: nothing further ahead
    assert float(future_loss(logits[:1], short, short >= 0, steps=2, ignore=-100)) == 0.0
    window = torch.tensor([[0, 1]])  # position 0's next item is 0, the one after it 1
    expected = torch.nn.functional.cross_entropy(logits[:1], torch.tensor([1]))
    assert float(future_loss(logits, window, window >= 0, steps=2, ignore=-100)) == pytest.approx(float(expected))


def test_label_smoothing_spreads_the_target_over_the_trained_items_only():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 5), torch.tensor([0, 2, 4])
    torch.testing.assert_close(smoothed_cross_entropy(logits, labels, 0.1),
                               torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1))
    untrained = torch.cat([logits, torch.full((3, 2), float("-inf"))], dim=1)  # two cold columns
    expected = 0.0
    for row, label in zip(logits, labels):  # by hand, over the five trained items
        log_p = row - torch.logsumexp(row, 0)
        expected += float(-(0.9 * log_p[label] + 0.1 * log_p.mean())) / 3
    assert smoothed_cross_entropy(untrained, labels, 0.1).item() == pytest.approx(expected, rel=1e-5)
    assert smoothed_cross_entropy(untrained, labels, 0.0).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
