"""The multimodal recommender: item tower + query tower (retrieval) and a ranking network on top.

Retrieval is trained with a softmax over items at every position of the training windows: over the whole
catalogue (`loss=full`, the default up to `full_softmax_max_items` with frozen encoders: the item tower runs over
every item each step, so a fine-tuned CNN or transformer would encode every image and text per step) or over
in-batch targets plus uniform random negatives with a log-Q correction (`loss=sampled`, for
large catalogues). Items never seen in training (held-out cold items) are never candidates in training, or
the model would learn to push exactly them down. The score is a dot product of the query and item vectors
(`score=dot`, the default: a vector's norm can say how popular or how certain it is) or their cosine divided
by a fixed temperature (`score=cosine`). With `rerank_top` > 0 the ranker re-orders that many retrieved
candidates with a listwise softmax (0, the default: retrieval's order is the answer). Evaluation is full
ranking over all items (docs/evaluation.md), seen items excluded.

With `item_bias`, the retrieval score adds a per-item bias read off the item tower's vector (temperature x
bias for cosine), as matrix factorisation has item biases. With `cold_offset` every item never trained on (held-out
cold items, items added while serving) has that constant added to its score: a new-arrivals boost, which trades
warm hits for cold ones (docs/experiments/cold-start.md); training never sees it (those items are out of the softmax).
Retrieval vectors are then [v, bias] for items and [q, 1] for queries, so inner-product search stays exact.
Reference: Klenitskiy & Vasilev, "Turning Dross Into Gold Loss: is BERT4Rec really better than SASRec?",
RecSys 2023 (full cross-entropy); Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
Recommendations", RecSys 2019 (log-Q correction); Covington et al., RecSys 2016 (retrieval + ranking).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from multimodal_rec.data.schema import item_keys
from multimodal_rec.data.sequences import IGNORE_TARGET
from multimodal_rec.distributed import broadcast_running_stats
from multimodal_rec.evaluation.metrics import RankingEvaluator, all_reduce_evaluators
from multimodal_rec.evaluation.protocol import logged_metrics
from multimodal_rec.models.components.item_bias import ItemBias
from multimodal_rec.models.components.scoring import SCORES, item_scores, retrieval_vectors
from multimodal_rec.models.softmax_terms import future_loss, log_inclusion, mask_seen, smoothed_cross_entropy

if TYPE_CHECKING:
    from multimodal_rec.models.encoders_setup import EncoderBundle

log = logging.getLogger(__name__)
RERANK_OFFSET = 1e4  # puts re-ranked candidates above every retrieval-only score
# loss=auto: full softmax up to this many items (the item tower runs over the whole catalogue every step),
# sampled softmax beyond
FULL_SOFTMAX_MAX_ITEMS = 50_000


class MultimodalRecommender(pl.LightningModule):
    def __init__(self, bundle: EncoderBundle, item_tower: Callable, history_encoder: Callable,
                 ranker: Callable | None, optimizer: Callable, scheduler: Callable | None = None,
                 dim: int = 64, num_negatives: int = 256, temperature: float = 0.07, logq: bool = True,
                 rerank_top: int = 50, ranker_weight: float = 1.0, ranker_positions: int = 512,
                 encoder_lr_scale: float = 0.1, item_bias: bool = False, loss: str = "auto",
                 full_softmax_max_items: int = FULL_SOFTMAX_MAX_ITEMS, score: str = "cosine",
                 ks: tuple = (10, 20), privacy: dict | None = None, mask_seen: bool = False,
                 content_loss_weight: float = 0.0, cold_offset: float = 0.0, future_steps: int = 0,
                 future_weight: float = 0.5, label_smoothing: float = 0.0):
        # score defaults to cosine here (conf/model says dot): checkpoints saved before the choice rebuild as they
        # were trained
        super().__init__()
        self.save_hyperparameters(ignore=["bundle", "item_tower", "history_encoder", "ranker", "optimizer",
                                          "scheduler", "privacy"])
        if loss not in ("auto", "full", "sampled"):
            raise ValueError(f"loss must be auto, full or sampled, got {loss!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.n_items, self.pad = bundle.n_items, bundle.n_items
        fine_tuned = bundle.image_encoder is not None or bundle.text_encoder is not None
        self.full_softmax = loss == "full" or (loss == "auto" and bundle.n_items <= full_softmax_max_items
                                               and not fine_tuned)
        if content_loss_weight > 0 and not self.full_softmax:
            raise ValueError("content_loss_weight needs the full softmax (loss=full): it scores every item's content")
        if future_steps > 0 and not self.full_softmax:
            raise ValueError("future_steps needs the full softmax (loss=full): it reuses each position's scores")
        # cosine: logits = cos / temperature; dot: logits = q . v, the vectors' norms carry the scale
        self.logit_scale = 1.0 / temperature if score == "cosine" else 1.0
        self.items, self.users = bundle.item_inputs, bundle.user_inputs
        self.item_tower = item_tower(dim=dim, n_items=bundle.n_items, image_encoder=bundle.image_encoder,
                                     text_encoder=bundle.text_encoder, **bundle.tower_sizes)
        self.history_encoder = history_encoder(dim=dim, **bundle.user_sizes)
        self.ranker = ranker(dim=dim) if ranker is not None and rerank_top > 0 else None  # 0: retrieval order
        self.bias_head = ItemBias(dim, 1.0 / self.logit_scale) if item_bias else None
        self.register_buffer("log_popularity", torch.log(bundle.popularity.float().clamp_min(1.0)), persistent=False)
        # negatives come only from items seen in training: held-out (cold) items must not be in training at
        # all, or the model learns to push exactly them down
        self.register_buffer("negative_pool", torch.nonzero(bundle.popularity > 0).squeeze(1), persistent=False)
        self.register_buffer("untrained_items", bundle.popularity == 0, persistent=False)  # (N,) out of the softmax
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.ks = tuple(ks)
        self.data_fingerprint = bundle.data_fingerprint
        self.run_config: dict = {}  # set by the training entry point; saved into checkpoints
        self.test_stages = ["test"]  # the DataModule's test dataloaders, in order (+ "test_cold")
        self.evaluators: dict[str, RankingEvaluator] = {}
        self._all_items: torch.Tensor | None = None
        self._all_biases: torch.Tensor | None = None
        self._negative_generator: torch.Generator | None = None  # set per rank in on_fit_start
        self.privacy = None  # privacy=dp: DP-SGD (models/privacy.py), planned in configure_optimizers
        if privacy and privacy.get("enabled"):
            if not self.full_softmax:
                raise ValueError("privacy=dp needs the full softmax (model.recommender.loss=full): the sampled loss "
                                 "uses other users' items as negatives, so a user's gradient would depend on others'")
            if future_steps > 0 or label_smoothing > 0:
                raise ValueError("privacy=dp trains on each position's next item alone, unsmoothed: set "
                                 "future_steps=0 and label_smoothing=0")
            if self.ranker is not None or self.bias_head is not None:
                raise ValueError("privacy=dp trains the retrieval model only: set model.recommender.rerank_top=0 "
                                 "and item_bias=false")
            from multimodal_rec.models.privacy import UserLevelPrivacy

            self.privacy = UserLevelPrivacy(**{k: v for k, v in privacy.items() if k != "enabled"})
            self.automatic_optimization = False

    # ---- towers ---------------------------------------------------------------------------------------
    def item_embeddings(self, index: torch.Tensor, content_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """index (B,) -> (item vectors (B, d): unit for cosine, raw for dot; retrieval biases (B,), added to
        the similarity before the logit scale; zeros without item_bias, + cold_offset for items never trained
        on). `content_only`: every ID taken as unknown, as a cold item's is."""
        inputs = self.items(index)
        if content_only:
            inputs = {**inputs, "known": torch.zeros_like(inputs["known"])}
        raw = self.item_tower(inputs)
        vectors = retrieval_vectors(raw, self.hparams.score)
        biases = raw.new_zeros(len(raw)) if self.bias_head is None else self.bias_head(raw)
        if self.hparams.cold_offset:
            biases = biases + self.hparams.cold_offset * (~inputs["known"]).to(biases.dtype)
        return vectors, biases

    def item_vectors(self, index: torch.Tensor) -> torch.Tensor:
        """index (B,) -> item vectors (B, d), as retrieval scores them."""
        return self.item_embeddings(index)[0]

    def all_item_embeddings(self, chunk: int = 4096, content_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, d) vectors and (N,) biases of the whole catalogue (cold items from content)."""
        index = torch.arange(self.n_items, device=self.device)
        parts = [self.item_embeddings(index[i:i + chunk], content_only) for i in range(0, self.n_items, chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @property
    def has_bias_column(self) -> bool:
        """Whether retrieval adds a per-item term to q . v (item_bias, cold_offset)."""
        return self.bias_head is not None or bool(self.hparams.cold_offset)

    @property
    def retrieval_dim(self) -> int:
        """Width of the exported (searched) vectors: d, plus the bias column with item_bias or cold_offset."""
        return self.hparams.dim + self.has_bias_column

    def retrieval_items(self, vectors: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
        """(B, d), (B,) from `item_embeddings` -> (B, retrieval_dim): what an inner-product index holds."""
        if not self.has_bias_column:
            return vectors
        return torch.cat([vectors, biases.unsqueeze(-1)], dim=-1)

    def retrieval_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """(B, d) queries -> (B, retrieval_dim): q . item = similarity + bias."""
        if not self.has_bias_column:
            return queries
        return torch.cat([queries, queries.new_ones(len(queries), 1)], dim=-1)

    def queries(self, history: torch.Tensor, user: torch.Tensor | None, context_hour: torch.Tensor,
                profile: dict | None = None, item_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """history (B, L) -> queries at every position (B, L, d) (unit vectors for cosine)."""
        if item_vectors is None:
            vectors = self.item_vectors(history.flatten()).view(*history.shape, -1)
        else:
            padded = torch.cat([item_vectors, item_vectors.new_zeros(1, item_vectors.shape[1])])
            vectors = padded[history]
        profile = profile if profile is not None else self.users(user)
        return self.encode_history(history, vectors, profile, context_hour)

    def encode_history(self, history: torch.Tensor, vectors: torch.Tensor, profile: dict,
                        context_hour: torch.Tensor) -> torch.Tensor:
        raw = self.history_encoder(vectors, history != self.pad, profile, context_hour)  # (B, L, d)
        return retrieval_vectors(raw, self.hparams.score)

    # ---- training -------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # Lightning seeds every DDP rank alike; a generator per rank keeps their negatives different
        self._negative_generator = torch.Generator(device=self.device)
        self._negative_generator.manual_seed(torch.initial_seed() + self.global_rank)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if self.privacy is not None:
            from multimodal_rec.models.privacy import private_step

            return private_step(self, batch, IGNORE_TARGET)
        targets = batch["targets"]  # (B, L)
        valid = targets != IGNORE_TARGET
        positives = targets[valid]  # (P,)
        if self.full_softmax:
            queries, cand_vectors, similarity, labels, correction, future = self._full_scores(batch, valid, positives)
        else:
            queries, cand_vectors, similarity, labels, correction = self._sampled_scores(batch, valid, positives)
            future = None
        logits = similarity * self.logit_scale
        retrieval_loss = smoothed_cross_entropy(logits if correction is None else logits - correction, labels,
                                                self.hparams.label_smoothing)
        loss = retrieval_loss
        self.log("train/retrieval_loss", retrieval_loss, prog_bar=True, batch_size=len(positives))
        if future is not None:
            loss = loss + self.hparams.future_weight * future
            self.log("train/future_loss", future, batch_size=len(positives))
        if self.hparams.content_loss_weight > 0:
            content_loss = self._content_only_loss(queries, positives)
            loss = loss + self.hparams.content_loss_weight * content_loss
            self.log("train/content_loss", content_loss, batch_size=len(positives))
        if self.ranker is not None:
            ranker_loss = self._ranker_loss(queries.detach(), cand_vectors.detach(), similarity.detach(), labels,
                                            correction)
            loss = loss + self.hparams.ranker_weight * ranker_loss
            self.log("train/ranker_loss", ranker_loss, batch_size=len(positives))
        self.log("train/loss", loss, batch_size=len(positives))
        return loss

    def _full_scores(self, batch: dict, valid: torch.Tensor, positives: torch.Tensor) -> tuple:
        """Every item is a candidate: (P, N) scores, items never trained on (cold) masked out of the softmax;
        with `future_steps`, the mean loss of the same scores on the items 2..1+future_steps steps ahead."""
        all_vectors, all_biases = self.all_item_embeddings()  # (N, d), (N,)
        queries = self.queries(batch["history"], batch["user"], batch["context_hour"],
                               item_vectors=all_vectors)[valid]  # (P, d)
        similarity = self._trained_similarity(queries, all_vectors, all_biases)
        # before mask_seen: an item further ahead may repeat one of the user's earlier items
        future = (future_loss(similarity * self.logit_scale, batch["targets"], valid, self.hparams.future_steps,
                              IGNORE_TARGET) if self.hparams.future_steps > 0 else None)
        if self.hparams.mask_seen:
            similarity = mask_seen(similarity, batch, valid, positives, self.pad)
        return queries, all_vectors, similarity, positives, None, future

    def _trained_similarity(self, queries: torch.Tensor, vectors: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
        """(P, N) retrieval scores over the whole catalogue, items never trained on (cold) out (-inf)."""
        return (item_scores(queries, vectors) + biases).masked_fill(self.untrained_items, float("-inf"))

    def _content_only_loss(self, queries: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """Full softmax over every trained item's content-only vector (its ID unknown, as a cold item's is): the
        content learns to rank on its own, among items that all lack IDs, which is how cold items meet."""
        similarity = self._trained_similarity(queries, *self.all_item_embeddings(content_only=True))
        return F.cross_entropy(similarity * self.logit_scale, positives)

    def _sampled_scores(self, batch: dict, valid: torch.Tensor, positives: torch.Tensor) -> tuple:
        """In-batch targets + `num_negatives` uniform draws from the trained items, with log-Q correction."""
        history = batch["history"]
        draws = torch.randint(0, len(self.negative_pool), (self.hparams.num_negatives,), device=self.device,
                              generator=self._negative_generator)
        negatives = self.negative_pool[draws]
        pool, inverse = torch.unique(torch.cat([history.flatten(), positives, negatives]), return_inverse=True)
        pool_vectors, pool_biases = self.item_embeddings(pool)  # (U, d), (U,)
        vectors = pool_vectors[inverse[:history.numel()]].view(*history.shape, -1)
        queries = self.encode_history(history, vectors, self.users(batch["user"]), batch["context_hour"])[valid]
        candidates, labels = torch.unique(torch.cat([positives, negatives]), return_inverse=True)
        labels = labels[: len(positives)]
        in_pool = torch.searchsorted(pool, candidates)
        cand_vectors = pool_vectors[in_pool]  # (C, d)
        similarity = item_scores(queries, cand_vectors) + pool_biases[in_pool]  # (P, C), as evaluation scores
        correction = (log_inclusion(candidates, len(positives), self.log_popularity, self.hparams.num_negatives,
                                    len(self.negative_pool)) if self.hparams.logq else None)
        return queries, cand_vectors, similarity, labels, correction

    def _ranker_loss(self, queries, cand_vectors, similarity, labels, correction=None) -> torch.Tensor:
        """Listwise softmax over the top-M retrieved candidates of the pool, on the positions whose positive
        retrieval did find: the ranker sees what it sees when serving (forcing a missed positive into the
        list would teach it that a low retrieval score means relevant)."""
        top = min(self.hparams.rerank_top, similarity.shape[1])
        chosen = similarity.topk(top, dim=1).indices  # (P, M)
        hit = chosen == labels[:, None]  # (P, M)
        found = hit.any(1)
        if not found.any():
            return similarity.sum() * 0.0
        keep = torch.nonzero(found).squeeze(1)
        if len(keep) > self.hparams.ranker_positions:  # a sample of positions keeps the step cheap
            keep = keep[torch.randperm(len(keep), device=keep.device)[: self.hparams.ranker_positions]]
        chosen, target = chosen[keep], hit[keep].float().argmax(1)
        scores = self.ranker(queries[keep], cand_vectors[chosen], similarity[keep].gather(1, chosen))
        scores = scores * self.logit_scale
        if correction is not None:
            scores = scores - correction[chosen]
        return F.cross_entropy(scores, target)

    # ---- evaluation -----------------------------------------------------------------------------------
    def score_batch(self, batch: dict, item_vectors: torch.Tensor,
                    item_biases: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Full-catalogue scores (B, N): "retrieval" alone and "ranked" (top candidates re-ranked).
        item_vectors (N, d) and item_biases (N,) from `all_item_embeddings` (required with item_bias or
        cold_offset)."""
        if self.has_bias_column and item_biases is None:
            raise ValueError("this model scores with item biases: pass all_item_embeddings()'s biases")
        query = self.queries(batch["history"], batch["user"], batch["context_hour"], batch.get("profile"),
                             item_vectors)[:, -1]  # (B, d)
        retrieval = item_scores(query, item_vectors)  # (B, N) cosine or dot product
        if item_biases is not None:
            retrieval = retrieval + item_biases
        out = {"retrieval": retrieval}
        if self.ranker is not None:
            masked = retrieval.clone()
            if "exclude_rows" in batch:
                masked[batch["exclude_rows"], batch["exclude_cols"]] = float("-inf")
            top = masked.topk(min(self.hparams.rerank_top, self.n_items), dim=1).indices  # (B, M)
            reranked = self.ranker(query, item_vectors[top], retrieval.gather(1, top))
            out["ranked"] = retrieval.scatter(1, top, reranked + RERANK_OFFSET)
        return out

    def _start_eval(self, stages: list[str]) -> None:
        """Under DDP each rank evaluates its own slice of the users (the DataModule's eval shards), with rank
        0's normalisation statistics (the model rank 0 checkpoints); `_end_eval` sums the states."""
        broadcast_running_stats(self)
        self._all_items, self._all_biases = self.all_item_embeddings()
        self.evaluators = {f"{stage}{suffix}": RankingEvaluator(self.n_items, self.ks)
                           for stage in stages for suffix in ("", "/retrieval")}

    def _eval_step(self, batch: dict, stage: str) -> None:
        scores = self.score_batch(batch, self._all_items, self._all_biases)
        final = scores.get("ranked", scores["retrieval"])
        args = (batch["target"], batch["exclude_rows"], batch["exclude_cols"])
        self.evaluators[stage].update(final, *args)
        self.evaluators[f"{stage}/retrieval"].update(scores["retrieval"], *args)

    def _end_eval(self) -> dict[str, float]:
        # every rank saw a disjoint slice of the users: after the sum, every rank computes the same global
        # metrics over all users, each counted once (so ModelCheckpoint/EarlyStopping agree on all ranks)
        all_reduce_evaluators(list(self.evaluators.values()), device=self.device)
        logged = logged_metrics(self.evaluators)
        headline = {k: v for k, v in logged.items() if k.endswith("/ndcg@10")}
        # the values are already global and equal on all ranks; "max" of equal values leaves them exact and
        # keeps Lightning from warning that epoch-level values are not synced
        self.log_dict(headline, prog_bar=True, sync_dist=True, reduce_fx="max")
        self.log_dict({k: v for k, v in logged.items() if k not in headline}, sync_dist=True, reduce_fx="max")
        self._all_items = self._all_biases = None
        return logged

    def on_validation_epoch_start(self) -> None:
        self._start_eval(["val"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._end_eval()

    def on_train_epoch_end(self) -> None:
        if self.privacy is not None:  # the (epsilon, delta) spent so far, by Opacus's accountant
            spent = self.privacy.spent()
            self.log("privacy/epsilon", spent, prog_bar=True)
            log.info("epoch %d: epsilon spent %.3f of %.2f (delta %.2g, %d steps)", self.current_epoch, spent,
                     self.privacy.epsilon, self.privacy.delta, self.privacy.steps)

    def on_test_epoch_start(self) -> None:
        self._start_eval(self.test_stages)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.test_stages[dataloader_idx])

    def on_test_epoch_end(self) -> None:
        self.test_metrics = self._end_eval()

    # ---- self-describing checkpoints -----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["multimodal_rec"] = {
            "config": self.run_config, "data_fingerprint": self.data_fingerprint, "n_items": self.n_items,
            "dim": self.hparams.dim,
            "metric": self.hparams.score + ("+item_bias" if self.has_bias_column else ""),
            "normalised": self.hparams.score == "cosine",
            "world_size": self._trainer.world_size if self._trainer is not None else 1,
        }
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and getattr(datamodule, "dataset", None) is not None:  # for init_from (warm_start)
            checkpoint["multimodal_rec"]["item_keys"] = item_keys(datamodule.dataset.items)
        if self.privacy is not None and self.privacy.noise_multiplier is not None:
            checkpoint["multimodal_rec"]["privacy"] = self.privacy.report()
            checkpoint["privacy_accountant"] = [list(entry) for entry in self.privacy.accountant.history]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("multimodal_rec", {}).get("data_fingerprint")
        if saved is not None and saved != self.data_fingerprint:
            raise ValueError(f"checkpoint was trained on data {saved}, but the data now is {self.data_fingerprint}; "
                             "use the same data and split settings (cold_item_fraction, seed) to resume")
        if self.privacy is not None and "privacy_accountant" in checkpoint:  # a resumed DP run keeps counting
            self.privacy.restore(checkpoint["multimodal_rec"]["privacy"], checkpoint["privacy_accountant"])

    # ---- optimisation ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        encoders = [p for n, p in self.named_parameters() if p.requires_grad and "_encoder.net." in n]
        encoder_ids = {id(p) for p in encoders}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in encoder_ids]
        groups = [{"params": rest}]
        if encoders:
            base_lr = self.optimizer_factory.keywords.get("lr", 1e-3)
            groups.append({"params": encoders, "lr": base_lr * self.hparams.encoder_lr_scale})
        optimizer = self.optimizer_factory(params=groups)
        if self.privacy is not None:
            datamodule = self.trainer.datamodule
            self.privacy.plan(len(datamodule.train_set.user_items), datamodule.batch_size, self.trainer.max_epochs)
            return self.privacy.wrap(optimizer)  # per-user clipping and noise; no scheduler under DP
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer)}}
