"""A generated e-commerce shop, deterministic by seed, in which every modality carries signal.

Items have a category (visible shape in the image, category words in the text and title), a brand
(title and text), a price, a Zipf-like `sales` count, and two LATENT attributes that are not
columns of the items table: a COLOUR, seen only in the image (the shape's fill), and a MATERIAL,
seen only in the text ("made of leather"). Users have an age, a gender and a region.

How purchases are drawn (the signal a model can learn):
- sequence: interactions come in sessions. Within a session the next item's category follows a fixed
  category transition matrix (`transition_matrix`: category 2k -> 2k+1 with 0.7, e.g. phone ->
  phone case, laptop -> laptop bag; 0.15 the same category; 0.15 uniform) with probability
  `p_transition` (0.6), otherwise the user's taste below.
- profile: a user's category taste is softmax(category popularity + age-group effect + gender effect
  + region effect + personal noise); the effects are fixed by `seed`.
- context: the hour of day of the session adds `hour_strength * cos(2*pi*(hour - peak_c)/24)` to
  category c's logit, the peaks spread over the day, so some categories sell in the morning, others
  in the evening.
- image: with probability `taste_strength` (0.8) the user picks inside the category a colour from
  their colour taste (Dirichlet(0.3)), so colour preference is visible only through images;
- text: ...and a material from their material taste (Dirichlet(0.3)), visible only through text.
- popularity: inside the matching bucket (category, colour, material), falling back to
  (category, colour), then category, then the whole shop when empty, items are drawn in
  proportion to `sales`.

Item colour and material depend mildly on the category (Dirichlet(2) per category), so they are not
just the category in disguise. A missing text is "", a missing image None (`images=False`: all None).
`generate_synthetic` also returns the hidden truth (`SyntheticLatents`) for tests and probes.

Everything is vectorised with numpy over users / sessions / interactions (the one Python loop is
over the position within a session): 1M items / 10M interactions take ~30 s and ~3 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from multimodal_rec.data.schema import DataIssues, RawDataset
from multimodal_rec.data.synthetic_images import N_LAYOUTS, N_PATTERNS, N_SHAPES, PREFIX, VERSION

CATEGORIES = (  # pairs (2k, 2k+1) are complements: the transition matrix links them
    ("phone", "smartphone"), ("phone case", "cover"), ("laptop", "notebook"), ("laptop bag", "sleeve"),
    ("sneakers", "running shoes"), ("socks", "ankle socks"), ("coffee maker", "espresso machine"),
    ("coffee beans", "roast"), ("camera", "digital camera"), ("memory card", "storage card"),
    ("tent", "shelter"), ("sleeping bag", "sleeping pad"), ("guitar", "acoustic guitar"),
    ("guitar strings", "string set"), ("dress", "gown"), ("handbag", "purse"),
)  # fmt: skip
COLORS = (
    ("red", 0xD62728), ("blue", 0x1F77B4), ("green", 0x2CA02C), ("yellow", 0xF2D21B), ("purple", 0x8E44AD),
    ("orange", 0xFF7F0E), ("black", 0x1A1A1A), ("white", 0xFAFAFA), ("pink", 0xF06EAA), ("teal", 0x17BECF),
    ("brown", 0x8C564B), ("olive", 0x808000),
)  # fmt: skip
MATERIALS = ("leather", "cotton", "wool", "steel", "wood", "plastic", "glass", "ceramic",
             "silk", "bamboo", "rubber", "titanium")  # fmt: skip
BRAND_SYLLABLES = ("ac", "no", "vel", "ta", "zen", "or", "lu", "mi", "kor", "sa", "ri", "do", "ex", "qua")
ADJECTIVES = np.array(
    ["durable", "elegant", "lightweight", "compact", "classic", "modern", "premium", "sturdy"], dtype=object
)
BENEFITS = np.array([
    "Built to last for years.", "A great gift idea.", "Easy to clean and care for.",
    "Ships in recyclable packaging.", "Loved by thousands of customers.", "Backed by a two-year warranty.",
], dtype=object)  # fmt: skip
GENDERS = ("female", "male", "other")
REGIONS = ("north", "south", "east", "west", "central")
AGE_EDGES = (30, 45, 60)  # age groups: <30, 30-44, 45-59, 60+
HOUR_WEIGHTS = np.array([1, .5, .3, .3, .3, .5, 1, 2, 3, 3, 3, 3, 4, 4, 3, 3, 3, 4, 5, 6, 7, 7, 5, 3], float)
START = 1672531200  # 2023-01-01T00:00:00Z


@dataclass
class SyntheticLatents:
    """The hidden truth behind a generated shop (for tests and probes; never a model input)."""

    category_names: list
    color_names: list
    material_names: list
    item_category: np.ndarray  # (n_items,) int, index into category_names
    item_color: np.ndarray
    item_material: np.ndarray
    transition: np.ndarray  # (K, K) next-category probabilities inside a session
    hour_effect: np.ndarray  # (24, K) logit shift by hour of day
    user_category_logits: np.ndarray  # (n_users, K) before the hour effect
    user_color_taste: np.ndarray  # (n_users, n_colors)
    user_material_taste: np.ndarray


def category_names(n: int) -> list:
    return [CATEGORIES[c][0] if c < len(CATEGORIES) else f"category {c}" for c in range(n)]


def transition_matrix(n_categories: int) -> np.ndarray:
    """Fixed complementary transitions: 2k <-> 2k+1 with 0.7, 0.15 the same category, 0.15 uniform."""
    k = n_categories
    t = np.full((k, k), 0.15 / k)
    idx = np.arange(k)
    partner = np.where(idx % 2 == 0, idx + 1, idx - 1)
    partner[partner >= k] = idx[partner >= k]
    t[idx, idx] += 0.15
    t[idx, partner] += 0.7
    return t / t.sum(1, keepdims=True)


def _brand_names(n: int, rng: np.random.Generator) -> list:
    names, seen = [], set()
    while len(names) < n:
        parts = rng.choice(len(BRAND_SYLLABLES), size=rng.integers(2, 4))
        name = "".join(BRAND_SYLLABLES[p] for p in parts).capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _sample_rows(cum: np.ndarray, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index drawn from row `rows[i]` of the row-wise cumulative distributions `cum` (rows end at 1)."""
    flat = (cum + np.arange(len(cum))[:, None]).ravel()
    pos = np.searchsorted(flat, rows + u, side="right") - rows * cum.shape[1]
    return np.minimum(pos, cum.shape[1] - 1)


def _pick_by_sales(keys: np.ndarray, sales: np.ndarray, wanted: np.ndarray, u: np.ndarray):
    """For each wanted key, an item with that key drawn in proportion to sales (-1 where none)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    cum = np.cumsum(sales[order].astype(np.float64))
    start = np.searchsorted(sorted_keys, wanted, side="left")
    end = np.searchsorted(sorted_keys, wanted, side="right")
    found = end > start
    lo = np.where(start > 0, cum[np.maximum(start - 1, 0)], 0.0)
    hi = cum[np.maximum(end - 1, 0)]
    pos = np.searchsorted(cum, lo + u * (hi - lo), side="right")
    pos = np.clip(pos, start, np.maximum(end - 1, start))
    return np.where(found, order[np.minimum(pos, len(order) - 1)], -1)


def _items(rng, n_items, n_categories, n_brands, n_colors, n_materials, missing_image_fraction,
           missing_text_fraction, images):
    k = n_categories
    cat_weights = rng.dirichlet(np.full(k, 5.0))
    cat = rng.choice(k, size=n_items, p=cat_weights)
    cat[: min(k, n_items)] = rng.permutation(k)[: min(k, n_items)]  # every category has an item
    # colour and material depend a little on the category (Dirichlet(2) per category)
    color_cum = np.cumsum(rng.dirichlet(np.full(n_colors, 2.0), size=k), 1)
    color = _sample_rows(color_cum, cat, rng.random(n_items))
    material_cum = np.cumsum(rng.dirichlet(np.full(n_materials, 2.0), size=k), 1)
    material = _sample_rows(material_cum, cat, rng.random(n_items))
    brand_w = 1.0 / np.arange(1, n_brands + 1) ** 0.7
    brand = rng.choice(n_brands, size=n_items, p=brand_w / brand_w.sum())
    brands = np.array(_brand_names(n_brands, rng), dtype=object)
    base_price = np.exp(rng.uniform(np.log(5), np.log(1500), size=k))
    premium = np.exp(rng.normal(0, 0.3, size=n_brands))
    price = np.round(base_price[cat] * premium[brand] * np.exp(rng.normal(0, 0.25, n_items)), 2)
    sales = 1 + np.floor(100000 * (rng.permutation(n_items) + 1.0) ** -0.9).astype(np.int64)
    item_seed = rng.integers(0, 2**31 - 1, size=n_items)

    names = category_names(k)
    cat_name = np.array(names, dtype=object)[cat]
    synonyms = np.array([CATEGORIES[c][1] if c < len(CATEGORIES) else n for c, n in enumerate(names)], object)
    catword = np.where(rng.random(n_items) < 0.5, cat_name, synonyms[cat])
    mat = np.array(MATERIALS, dtype=object)[material]
    brand_s = brands[brand]
    adj = ADJECTIVES[rng.integers(0, len(ADJECTIVES), n_items)]
    benefit = BENEFITS[rng.integers(0, len(BENEFITS), n_items)]
    letters = np.array(list("ABCDEFGHKLMNPRSTXZ"), dtype=object)
    model = letters[item_seed % 18] + (item_seed % 900 + 100).astype(str).astype(object)
    title = brand_s + " " + cat_name + " " + model
    templates = (
        lambda m: brand_s[m] + " " + adj[m] + " " + catword[m] + ", made of " + mat[m],
        lambda m: "From " + brand_s[m] + ": " + adj[m] + " " + catword[m] + " made of " + mat[m],
        lambda m: brand_s[m] + " " + catword[m] + " in " + adj[m] + " " + mat[m],
    )
    which = rng.integers(0, len(templates), n_items)
    text = np.empty(n_items, dtype=object)
    for t, make in enumerate(templates):
        mask = which == t
        text[mask] = make(mask) + ". " + benefit[mask]
    text[rng.random(n_items) < missing_text_fraction] = ""

    image = np.full(n_items, None, dtype=object)
    if images:
        rgb = np.array([c[1] for c in COLORS[:n_colors]])[color]
        channels = [(rgb >> s) & 255 for s in (16, 8, 0)]
        jitter = rng.integers(-12, 13, size=(3, n_items))
        r, g, b = (np.clip(ch + j, 0, 255) for ch, j in zip(channels, jitter))
        seeds = item_seed.tolist()
        hexes = [f"{v:06x}" for v in ((r << 16) | (g << 8) | b).tolist()]
        shape, layout = cat % N_SHAPES, (cat // N_SHAPES) % N_LAYOUTS
        pattern = rng.integers(0, N_PATTERNS, n_items)
        image = np.array([
            f"{PREFIX}{VERSION};shape={s};layout={la};color={h};pattern={p};seed={sd}"
            for s, la, h, p, sd in zip(shape.tolist(), layout.tolist(), hexes, pattern.tolist(), seeds)
        ], dtype=object)  # fmt: skip
        image[rng.random(n_items) < missing_image_fraction] = None

    items = pd.DataFrame({
        "item_id": np.arange(1, n_items + 1, dtype=np.int64), "title": title, "text": text, "image": image,
        "category": cat_name, "brand": brand_s, "price": price.astype(np.float64), "sales": sales,
    })  # fmt: skip
    return items, cat, color, material


def _users(rng, n_users, n_categories, n_colors, n_materials):
    k = n_categories
    age = np.clip(np.round(rng.normal(40, 13, n_users)), 18, 85).astype(np.int64)
    gender = rng.choice(len(GENDERS), size=n_users, p=[0.49, 0.48, 0.03])
    region = rng.choice(len(REGIONS), size=n_users, p=[0.25, 0.2, 0.2, 0.2, 0.15])
    group = np.searchsorted(np.array(AGE_EDGES), age, side="right")
    logits = (np.log(rng.dirichlet(np.full(k, 5.0)))[None, :]
              + rng.normal(0, 0.9, (len(AGE_EDGES) + 1, k))[group]
              + rng.normal(0, 0.9, (len(GENDERS), k))[gender]
              + rng.normal(0, 0.3, (len(REGIONS), k))[region]
              + rng.normal(0, 0.6, (n_users, k)))  # fmt: skip
    color_taste = rng.dirichlet(np.full(n_colors, 0.3), size=n_users)
    material_taste = rng.dirichlet(np.full(n_materials, 0.3), size=n_users)
    users = pd.DataFrame({
        "user_id": np.arange(1, n_users + 1, dtype=np.int64), "age": age,
        "gender": np.array(GENDERS, dtype=object)[gender], "region": np.array(REGIONS, dtype=object)[region],
    })  # fmt: skip
    return users, logits, color_taste, material_taste


def generate_synthetic(
    n_items: int = 2000, n_users: int = 1000, sessions_per_user: float = 4.0, session_length: float = 5.0,
    n_categories: int = 8, n_brands: int = 20, missing_image_fraction: float = 0.05,
    missing_text_fraction: float = 0.05, seed: int = 0, images: bool = True, n_colors: int = 8,
    n_materials: int = 8, p_transition: float = 0.6, taste_strength: float = 0.8, hour_strength: float = 1.0,
) -> tuple[RawDataset, SyntheticLatents]:
    """The shop and its hidden truth; see the module docstring for what the parameters drive."""
    params = dict(locals())
    if not (1 <= n_colors <= len(COLORS) and 1 <= n_materials <= len(MATERIALS)):
        raise ValueError(f"n_colors must be in 1..{len(COLORS)} and n_materials in 1..{len(MATERIALS)}")
    if n_items < 1 or n_users < 1 or n_categories < 1 or n_brands < 1:
        raise ValueError("n_items, n_users, n_categories and n_brands must be positive")
    if sessions_per_user < 1 or session_length < 1:
        raise ValueError("sessions_per_user and session_length must be at least 1")
    rng = np.random.default_rng(seed)
    k = n_categories
    items, item_cat, item_color, item_mat = _items(rng, n_items, k, n_brands, n_colors, n_materials,
                                                   missing_image_fraction, missing_text_fraction, images)
    users, user_logits, color_taste, material_taste = _users(rng, n_users, k, n_colors, n_materials)

    # sessions: count per user, length, day (distinct, >= 2 days apart) and starting hour
    n_sess = np.minimum(1 + rng.poisson(sessions_per_user - 1, n_users), 100)
    sess_user = np.repeat(np.arange(n_users), n_sess)
    length = np.minimum(1 + rng.poisson(session_length - 1, len(sess_user)), 50)
    first = np.cumsum(n_sess) - n_sess
    per_user = np.bincount(sess_user, weights=length, minlength=n_users).astype(np.int64)
    length[first] += np.maximum(0, 3 - per_user)  # every user gets at least 3 interactions
    span = max(365, 2 * int(n_sess.max()) + 30)
    raw_day = rng.integers(0, span - 2 * n_sess[sess_user] + 1)
    order = np.lexsort((raw_day, sess_user))
    rank = np.arange(len(sess_user)) - first[sess_user]
    day = raw_day[order] + 2 * rank
    hour = rng.choice(24, size=len(sess_user), p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
    sess_start = START + day * 86400 + hour * 3600 + rng.integers(0, 3600, len(sess_user))

    transition = transition_matrix(k)
    trans_cum = np.cumsum(transition, 1)
    peak = np.arange(k) * 24.0 / k
    hour_effect = hour_strength * np.cos(2 * np.pi * (np.arange(24)[:, None] - peak[None, :]) / 24)

    # categories position by position, vectorised over all sessions
    offset = np.cumsum(length) - length
    n_inter = int(length.sum())
    inter_cat = np.empty(n_inter, dtype=np.int64)
    prev = np.zeros(len(length), dtype=np.int64)
    for j in range(int(length.max())):
        active = np.flatnonzero(length > j)
        logit = user_logits[sess_user[active]] + hour_effect[hour[active]]
        prob = np.exp(logit - logit.max(1, keepdims=True))
        cum = np.cumsum(prob, 1)
        cum /= cum[:, -1:]
        chosen = _sample_rows(cum, np.arange(len(active)), rng.random(len(active)))
        if j > 0:
            follow = rng.random(len(active)) < p_transition
            nxt = _sample_rows(trans_cum / trans_cum[:, -1:], prev[active], rng.random(len(active)))
            chosen = np.where(follow, nxt, chosen)
        prev[active] = chosen
        inter_cat[offset[active] + j] = chosen

    # items: colour and material from the user's taste, then the sales-weighted bucket cascade
    inter_sess = np.repeat(np.arange(len(length)), length)
    inter_user = sess_user[inter_sess]
    want_color = _sample_rows(np.cumsum(color_taste, 1), inter_user, rng.random(n_inter))
    want_mat = _sample_rows(np.cumsum(material_taste, 1), inter_user, rng.random(n_inter))
    taste = rng.random(n_inter) < taste_strength
    item = np.full(n_inter, -1, dtype=np.int64)
    item_cc, inter_cc = item_cat * n_colors + item_color, inter_cat * n_colors + want_color
    levels = (
        (item_cc * n_materials + item_mat, inter_cc * n_materials + want_mat),
        (item_cc, inter_cc),
        (item_cat, inter_cat),
        (np.zeros(n_items, dtype=np.int64), np.zeros(n_inter, dtype=np.int64)),
    )  # fmt: skip
    u = rng.random(n_inter)
    for level, (keys, wanted) in enumerate(levels):
        todo = np.flatnonzero((item < 0) & (taste if level < 2 else True))
        item[todo] = _pick_by_sales(keys, items["sales"].to_numpy(), wanted[todo], u[todo])

    gaps = rng.integers(30, 600, n_inter)
    gaps[offset] = 0
    csum = np.cumsum(gaps)
    timestamp = sess_start[inter_sess] + csum - csum[offset][inter_sess]
    interactions = pd.DataFrame({
        "user_id": users["user_id"].to_numpy()[inter_user], "item_id": item + 1,
        "timestamp": timestamp.astype(np.int64), "value": np.ones(n_inter, dtype=np.float32),
        "event": pd.Categorical.from_codes(np.zeros(n_inter, dtype=np.int8), ["purchase"]).astype(str),
    })  # fmt: skip
    raw = RawDataset(
        source="synthetic", items=items, users=users, interactions=interactions,
        attributes={
            "item_categorical": ["category", "brand"], "item_multi": [], "item_numeric": ["price", "sales"],
            "user_categorical": ["gender", "region"], "user_numeric": ["age"],
        },
        inputs={}, issues=DataIssues(), extra={"generator": {"name": "synthetic", "version": 1, **params}},
    )  # fmt: skip
    latents = SyntheticLatents(
        category_names=category_names(k), color_names=[c[0] for c in COLORS[:n_colors]],
        material_names=list(MATERIALS[:n_materials]), item_category=item_cat, item_color=item_color,
        item_material=item_mat, transition=transition, hour_effect=hour_effect,
        user_category_logits=user_logits, user_color_taste=color_taste, user_material_taste=material_taste,
    )  # fmt: skip
    return raw, latents


def read_synthetic(
    n_items: int = 2000, n_users: int = 1000, sessions_per_user: float = 4.0, session_length: float = 5.0,
    n_categories: int = 8, n_brands: int = 20, missing_image_fraction: float = 0.05,
    missing_text_fraction: float = 0.05, seed: int = 0, images: bool = True, **knobs,
) -> RawDataset:
    """The generated shop as a `RawDataset` (source "synthetic"); `knobs` go to `generate_synthetic`."""
    return generate_synthetic(
        n_items=n_items, n_users=n_users, sessions_per_user=sessions_per_user, session_length=session_length,
        n_categories=n_categories, n_brands=n_brands, missing_image_fraction=missing_image_fraction,
        missing_text_fraction=missing_text_fraction, seed=seed, images=images, **knobs,
    )[0]
