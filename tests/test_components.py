"""Components: shapes, no NaN, missing modalities, exact masking of padding."""

from __future__ import annotations

import pytest
import torch

from multimodal_rec.models.components.history_encoder import HistoryEncoder
from multimodal_rec.models.components.image_encoder import ImageEncoder
from multimodal_rec.models.components.item_tower import ItemTower
from multimodal_rec.models.components.ranker import Ranker
from multimodal_rec.models.components.text_encoder import TextEncoder


def test_image_encoders_shapes():
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    tiny = ImageEncoder("tiny", pretrained=False)
    assert tiny(pixels).shape == (2, tiny.out_dim)
    lite = ImageEncoder("efficientnet_lite0", pretrained=True).eval()
    out = lite(pixels)
    assert out.shape == (2, 1280) and torch.isfinite(out).all()
    assert not any(p.requires_grad for p in lite.parameters())


def test_text_encoder_masks_padding():
    encoder = TextEncoder(pretrained=False, tiny_hidden=32).eval()
    ids = torch.tensor([[101, 2000, 3000, 102]])
    short = encoder(ids, torch.ones_like(ids))
    padded_ids = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 4), torch.zeros(1, 6)], dim=1).long()
    torch.testing.assert_close(encoder(padded_ids, mask), short, atol=1e-5, rtol=1e-4)
    pretrained = TextEncoder(trainable_layers=2)
    trainable = {n.split(".")[3] for n, p in pretrained.named_parameters() if p.requires_grad and "layer." in n}
    assert trainable == {"4", "5"}  # the top two of six layers


def _tower_inputs(batch: int, n_items: int) -> dict:
    return {
        "item": torch.arange(batch) % n_items,
        "known": torch.tensor([True, False] * (batch // 2)),
        "image": torch.randn(batch, 16),
        "has_image": torch.tensor([True, False] * (batch // 2)),
        "text": torch.randn(batch, 12),
        "has_text": torch.ones(batch, dtype=torch.bool),
        "categorical": torch.randint(0, 3, (batch, 2)),
        "multi_hot": torch.zeros(batch, 4),
        "numeric": torch.randn(batch, 1),
        "numeric_missing": torch.zeros(batch, 1, dtype=torch.bool),
    }


def test_item_tower_handles_missing_modalities_and_unknown_items():
    for fusion in ("gated", "concat", "residual"):
        tower = ItemTower(8, n_items=10, image_dim=16, text_dim=12, categorical_sizes=(3, 3), n_multi=4,
                          n_numeric=1, fusion=fusion).eval()
        inputs = _tower_inputs(4, 10)
        out = tower(inputs)
        assert out.shape == (4, 8) and torch.isfinite(out).all()
        # an item without an image ignores whatever is in its image slot
        changed = dict(inputs, image=torch.randn_like(inputs["image"]))
        torch.testing.assert_close(tower(changed)[1], out[1])
        assert not torch.allclose(tower(changed)[0], out[0])
    text_only = ItemTower(8, n_items=10, text_dim=12, modalities=("text",))
    assert text_only(_tower_inputs(2, 10)).shape == (2, 8)


def test_residual_fusion_adds_content_to_the_id_vector_at_its_scale():
    torch.manual_seed(0)
    tower = ItemTower(16, n_items=10, image_dim=16, text_dim=12, categorical_sizes=(3, 3), n_multi=4, n_numeric=1,
                      fusion="residual", dropout=0.0).eval()
    captured = []
    tower.fusion.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    inputs = _tower_inputs(4, 10)
    out = tower(inputs)
    parts = captured[0]  # (B, M, d): id, image, text, attributes
    fused = parts.sum(-2)
    torch.testing.assert_close(out, fused + tower.fusion.mlp(fused))
    # every modality starts at the scale of the ID embedding, so none drowns the others
    scales = parts[:2].std(dim=(0, 2))
    assert (scales < 0.1).all() and (scales > 0.002).all(), scales
    # an unseen item is its content plus the learned unknown-ID vector
    unseen = dict(inputs, known=torch.zeros(4, dtype=torch.bool))
    assert torch.isfinite(tower(unseen)).all() and not torch.allclose(tower(unseen), out)


def test_history_encoder_padding_is_exactly_masked():
    torch.manual_seed(0)
    for rnn in ("gru", "lstm", "transformer"):
        encoder = HistoryEncoder(8, rnn=rnn, user_categorical_sizes=(3,), n_user_numeric=1, max_len=7).eval()
        items = torch.randn(1, 3, 8)
        profile = {"categorical": torch.tensor([[1]]), "numeric": torch.tensor([[0.5]])}
        hours = torch.tensor([5])
        short = encoder(items, torch.ones(1, 3, dtype=torch.bool), profile, hours)[:, -1]
        padded = torch.cat([torch.randn(1, 4, 8), items], dim=1)  # garbage in the padding slots
        mask = torch.tensor([[False] * 4 + [True] * 3])
        long = encoder(padded, mask, profile, hours)[:, -1]
        torch.testing.assert_close(long, short, atol=1e-6, rtol=1e-5)
        empty = encoder(torch.randn(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool),
                        {"categorical": torch.tensor([[1], [2]]), "numeric": torch.zeros(2, 1)}, torch.tensor([1, 1]))
        assert torch.isfinite(empty).all() and not torch.allclose(empty[0, -1], empty[1, -1])  # profile decides


def test_history_encoders_are_causal():
    """The query at position i reads items 0..i only: a change later in the history leaves it unchanged."""
    torch.manual_seed(0)
    for rnn in ("gru", "transformer"):
        encoder = HistoryEncoder(8, rnn=rnn, use_profile=False, max_len=6, num_layers=2).eval()
        items, mask, hours = torch.randn(2, 6, 8), torch.ones(2, 6, dtype=torch.bool), torch.zeros(2, 6).long()
        changed = items.clone()
        changed[:, 4:] = torch.randn(2, 2, 8)
        before, after = encoder(items, mask, None, hours), encoder(changed, mask, None, hours)
        torch.testing.assert_close(before[:, :4], after[:, :4])
        assert not torch.allclose(before[:, 4:], after[:, 4:])
    with pytest.raises(ValueError, match="longer than"):
        encoder(torch.randn(1, 7, 8), torch.ones(1, 7, dtype=torch.bool), None, torch.zeros(1, 7).long())


def test_history_item_dropout_removes_whole_items_in_training_only():
    torch.manual_seed(0)
    encoder = HistoryEncoder(8, use_profile=False, use_context=False, dropout=0.0, item_dropout=0.5)
    items, mask = torch.randn(64, 6, 8), torch.ones(64, 6, dtype=torch.bool)
    seen = []
    encoder.rnn.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    encoder.train()(items, mask)
    zeroed = (seen[-1] == 0).all(-1)  # (B, L) whole item vectors
    assert 0.35 < zeroed.float().mean() < 0.65 and ((seen[-1] == 0).any(-1) == zeroed).all()
    encoder.eval()(items, mask)
    torch.testing.assert_close(seen[-1], items)  # full rows, no padding to move
    with pytest.raises(ValueError, match="item_dropout"):
        HistoryEncoder(8, item_dropout=1.0)


def test_ranker_starts_as_retrieval_order():
    ranker = Ranker(8)
    retrieval = torch.randn(3, 5)
    scores = ranker(torch.randn(3, 8), torch.randn(3, 5, 8), retrieval)
    torch.testing.assert_close(scores, retrieval)  # zero-initialised head: no harm before training
    scores.sum().backward()
    assert ranker.mlp[-1].weight.grad is not None


def test_content_shrinkage_weighs_content_by_the_items_evidence():
    """Content weighs c / (c + n) for an item whose ID is used (n training interactions), fully otherwise."""
    torch.manual_seed(0)
    tower = ItemTower(8, n_items=10, image_dim=16, text_dim=12, categorical_sizes=(3, 3), n_multi=4, n_numeric=1,
                      fusion="residual", dropout=0.0, content_shrinkage=20.0).eval()
    captured = []
    tower.fusion.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    inputs = _tower_inputs(4, 10)  # items 0 and 2 known, 1 and 3 not
    tower(dict(inputs, popularity=torch.tensor([0.0, 0.0, 0.0, 0.0])))
    tower(dict(inputs, popularity=torch.tensor([60.0, 60.0, 20.0, 20.0])))
    unshrunk, shrunk = captured
    torch.testing.assert_close(shrunk[:, 0], unshrunk[:, 0])  # the ID part is never scaled
    torch.testing.assert_close(shrunk[0, 1:], unshrunk[0, 1:] * 0.25)  # 20 / (20 + 60)
    torch.testing.assert_close(shrunk[2, 1:], unshrunk[2, 1:] * 0.5)
    torch.testing.assert_close(shrunk[1], unshrunk[1])  # ID not used: content is all there is
    torch.testing.assert_close(shrunk[3], unshrunk[3])


def test_whitening_decorrelates_the_catalogues_features_and_is_rebuilt_with_the_tower():
    from multimodal_rec.models.components.whitening import FeatureWhitening
    from multimodal_rec.safe_modules import build_module, module_spec

    torch.manual_seed(0)
    features = torch.randn(500, 6) @ torch.diag(torch.tensor([10.0, 5.0, 1.0, 1.0, 0.5, 0.1])) + 3.0
    features = features @ torch.linalg.qr(torch.randn(6, 6))[0]  # anisotropic, rotated, off-centre
    whitening = FeatureWhitening(6, eps=1e-9)
    whitening.fit(features)
    white = whitening(features)
    torch.testing.assert_close(white.mean(0), torch.zeros(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cov(white.T), torch.eye(6), atol=1e-3, rtol=0)
    # eps shrinks the weak directions instead of blowing them up
    relaxed = FeatureWhitening(6, eps=0.1)
    relaxed.fit(features)
    assert torch.cov(relaxed(features).T).diagonal().max() < 1.0
    with pytest.raises(ValueError, match="whitening needs"):
        relaxed.fit(features[:1])

    tower = ItemTower(8, n_items=10, image_dim=16, text_dim=12, fusion="residual", whiten=True).eval()
    inputs = _tower_inputs(4, 10)
    table = type("Inputs", (), {"image": torch.randn(11, 16) * torch.arange(1, 17.0), "text": torch.randn(11, 12),
                                "has_image": torch.ones(11, dtype=torch.bool),
                                "has_text": torch.ones(11, dtype=torch.bool)})
    before = tower(inputs)
    tower.fit_whitening(table)
    assert not torch.allclose(tower(inputs), before)  # the fitted statistics are used
    rebuilt = build_module(module_spec(tower)).eval()
    rebuilt.load_state_dict(tower.state_dict())  # the statistics travel with the weights, as export saves them
    torch.testing.assert_close(rebuilt(inputs), tower(inputs))
