"""Web-style captions for the Fashion-MNIST demo corpus: honest attributes, many wordings, noise.

A clean caption names the true class and four attributes measured from the pixels,
so captions are learnable and specific enough for retrieval:

  tone     product darkness, absolute buckets          white ... black
  fit      bounding-box aspect ratio, class terciles   slim fit / wide leg / low-top ...
  texture  mean edge strength on the item, terciles    plain / textured / patterned
  size     item area in the frame, class terciles      small / medium / large

Fashion-MNIST stores negated intensities (ink is bright), so darkness is the stored
value; the demo encodes `255 - pixels`, a dark item on a white background as in the
original product photos. Noise captions read like scraped alt-text: the wrong item,
page boilerplate, or off-topic text. Every draw comes from the `random.Random` passed
in, so a caption is a pure function of (seed, example).
"""
import random
import string
from typing import Sequence

import numpy as np

__all__ = ["CLASSNAMES", "ZEROSHOT_TEMPLATES", "LEGACY_CLASSNAMES", "LEGACY_ZEROSHOT_TEMPLATES",
           "NOUNS", "NOISE_KINDS", "CAPTION_KINDS", "NOISE_SHARES",
           "ATTRIBUTES", "image_features", "attribute_thresholds", "image_attributes",
           "clean_caption", "wrong_item_caption", "boilerplate_caption", "off_topic_caption",
           "noise_counts", "pool_caption"]

# Zero-shot class names and prompts use only words the clean captions teach: each class
# name is one of its class's caption nouns (plural where the captions say "sandals"), and
# the prompts are shop wordings the caption templates use. open_clip's BPE has separate
# whole-word tokens for "sandal"/"sandals", so a prompt word the captions never use embeds
# an untrained token (tests/test_evaluate.py checks the vocabulary). Captions never say
# "photo"/"picture"/"image of", so CLIP's own templates would test untrained words.
CLASSNAMES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandals", "shirt",
              "sneakers", "bag", "ankle boots")
ZEROSHOT_TEMPLATES = ("{}", "{}.", "buy {} online", "new in: {}", "our {}", "everyday {}",
                      "{} - sale", "style: {}.")
# The prompts of the first committed studies (results/*), kept to say what they measured.
LEGACY_CLASSNAMES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt",
                     "sneaker", "bag", "ankle boot")
LEGACY_ZEROSHOT_TEMPLATES = (
    "a photo of a {}.", "a photo of the {}.", "a low resolution photo of a {}.",
    "a cropped photo of a {}.", "a close-up photo of a {}.", "a grayscale photo of a {}.",
    "a good photo of a {}.", "a bad photo of the {}.", "a picture of a {}.", "itap of a {}.")

NOUNS = (
    ("t-shirt", "tee", "crew neck tee", "tank top", "basic tee"),
    ("trousers", "pants", "jeans", "chinos", "slacks"),
    ("pullover", "sweater", "jumper", "knit sweater", "sweatshirt"),
    ("dress", "midi dress", "shift dress", "summer dress", "maxi dress"),
    ("coat", "jacket", "parka", "overcoat", "trench coat"),
    ("sandals", "strappy sandals", "slides", "heeled sandals", "flip-flops"),
    ("shirt", "button-down shirt", "blouse", "oxford shirt", "flannel shirt"),
    ("sneakers", "trainers", "running shoes", "canvas shoes", "kicks"),
    ("bag", "handbag", "tote bag", "shoulder bag", "purse"),
    ("ankle boots", "chelsea boots", "booties", "lace-up boots", "boots"),
)
NOISE_KINDS = ("clean", "wrong_item", "boilerplate", "off_topic", "exact_duplicate",
               "near_duplicate")
# What a caption is, whatever made its row: a duplicate's caption is its original's
# (exact) or a clean rewording (near), so duplicates are not caption noise by themselves.
CAPTION_KINDS = ("clean", "wrong_item", "boilerplate", "off_topic")
# Noisy pool rows by kind, as fractions of the noisy total.
NOISE_SHARES = {"wrong_item": 0.4, "boilerplate": 0.2, "off_topic": 0.2,
                "exact_duplicate": 0.1, "near_duplicate": 0.1}

# Bucket -> synonyms. Synonyms never repeat across buckets of one attribute, so a
# caption's attribute words identify its buckets.
_TONE = (("white", "off-white", "ivory"), ("light grey", "pale grey", "silver grey"),
         ("grey", "mid grey", "heather grey"), ("dark grey", "charcoal", "graphite"),
         ("black", "jet black", "all-black"))
_TONE_EDGES = (0.40, 0.55, 0.68, 0.78)  # Mean ink on the item; ~balanced over the dataset.
_TOP_FIT = (("slim fit", "fitted"), ("regular fit", "classic fit"), ("oversized", "relaxed fit"))
_SHOE_FIT = (("high-cut", "tall"), ("mid-height", "mid-cut"), ("low-profile", "low-cut"))
_FIT = (  # Per class, narrow -> wide bounding box.
    _TOP_FIT, (("skinny", "slim leg"), ("straight leg", "regular leg"), ("wide leg", "loose")),
    _TOP_FIT, (("bodycon", "slim"), ("straight-cut", "column"), ("flared", "a-line")), _TOP_FIT,
    _SHOE_FIT, _TOP_FIT, (("high-top", "hi-top"), ("mid-top", "mid-cut"), ("low-top", "low-cut")),
    (("tall", "upright"), ("square", "squared"), ("wide", "long")), _SHOE_FIT)
_TEXTURE = (("plain", "solid"), ("textured", "detailed"), ("patterned", "printed"))
_SIZE = (("small", "compact"), ("medium", "mid-size"), ("large", "big"))
ATTRIBUTES = ("tone", "fit", "texture", "size")

# {a} audience, {t} tone, {f} fit, {x} texture, {s} size, {n} noun. Complete templates
# carry all four attributes (retrieval captions use only those).
_COMPLETE = (
    "{a}{t} {f} {n}, {x}, {s}", "{s} {t} {x} {n} ({f})", "{N} in {t} - {f}, {x}, {s}",
    "{a}{x} {n} | {t} | {f} | {s}", "Buy {s} {t} {f} {n} online, {x}",
    "New in: {t} {x} {f} {n}, {s}", "{S} {f} {n} with {x} finish in {t}",
    "{a}{n} - {t}, {x}, {f}, {s}", "Colour: {t}. Style: {f} {n}. Pattern: {x}. Size: {s}",
    "{t} {s} {f} {x} {n}", "Our {s} {f} {n} in {t} ({x})", "{X} {t} {n}, {f}, {s} #ootd")
_PARTIAL = ("{a}{t} {n}", "{f} {n} in {t}", "{T} {x} {n} - sale", "{n}, {t}, {s}",
            "Everyday {f} {n} ({t})", "{a}{s} {x} {n}")
_AUDIENCE = ("women's ", "men's ", "", "", "unisex ")
_SHOP_SUFFIX = (" - free shipping", " | SALE", " - new season", " (2 colours)",
                " - limited stock", " | free returns", " - 30% off")

_BOILERPLATE = ("click to enlarge", "product image", "thumbnail", "view larger", "zoom",
                "no description available", "untitled", "placeholder", "main", "front view",
                "alt", "image not found", "loading...", "default")
_BOILERPLATE_PATTERNS = ("IMG_{d4}.jpg", "DSC_{d4}.JPG", "product_{d5}.png", "{hex}.jpg",
                         "image {i} of {k}", "Photo {i}/{k}", "file-{d5}", "pic{i}.jpeg",
                         "upload_{d4}_{d4}.jpg", "{hex}")
_OFF_TOPIC = (
    "Free delivery on orders over ${p}", "Sign up for our newsletter and save {q}%",
    "Customer reviews ({p})", "Store hours: Mon-Sat 9am-{h}pm",
    "Homemade banana bread with walnuts",
    "Sunset over the harbour", "{q} travel destinations for this year",
    "How to repot a fiddle leaf fig", "Live football scores and results",
    "Quarterly earnings report Q{h}", "Golden retriever puppy playing in the snow",
    "Mountain bike trail near the lake", "Download our app", "Terms and conditions apply",
    "Follow us on social media", "Contact our support team", "Vintage typewriter on a wooden desk",
    "Fresh vegetables at the farmers market", "Cup of coffee and a croissant",
    "City skyline at night", "Recipe: spicy lentil soup", "Weather forecast: rain expected",
    "Electric guitar lessons for beginners", "Our team at the annual conference",
    "Kitchen renovation before and after", "Hotel room with a sea view", "Page {h} of {p}",
    "Copyright {y} all rights reserved", "Cookie settings", "Breaking news: local elections",
    "Red sports car parked on the street", "Chocolate cake with raspberries")


# --------------------------------------------------------------------------- #
# Attributes from pixels
# --------------------------------------------------------------------------- #

def image_features(images: np.ndarray, *, chunk: int = 2048) -> np.ndarray:
    """[n, 4] float32 (darkness, aspect, edge strength, area) of raw [n, 28, 28] uint8 images."""
    return np.concatenate([_features(images[i:i + chunk]) for i in range(0, len(images), chunk)]
                          or [np.zeros((0, 4), np.float32)])


def _features(images: np.ndarray) -> np.ndarray:
    v = images.astype(np.float32) / 255.0
    mask = images > 30  # Ink; the background is 0 with faint fringes around the item.
    area = mask.sum((1, 2)).astype(np.float32)
    darkness = (v * mask).sum((1, 2)) / np.maximum(area, 1)
    height = np.maximum(mask.any(2).sum(1), 1)
    width = np.maximum(mask.any(1).sum(1), 1)
    both_x = mask[:, :, 1:] & mask[:, :, :-1]
    both_y = mask[:, 1:, :] & mask[:, :-1, :]
    edges = ((np.abs(np.diff(v, axis=2)) * both_x).sum((1, 2))
             + (np.abs(np.diff(v, axis=1)) * both_y).sum((1, 2)))
    edges /= np.maximum(both_x.sum((1, 2)) + both_y.sum((1, 2)), 1)
    return np.stack([darkness, width / height, edges, area], axis=1).astype(np.float32)


def attribute_thresholds(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[10, 3, 2] per-class tercile edges of (fit, texture, size) from reference features."""
    edges = np.zeros((10, 3, 2), np.float32)
    for c in range(10):
        of_class = features[labels == c]
        if not len(of_class):
            raise ValueError(f"reference set has no images of class {c}")
        edges[c] = np.quantile(of_class[:, 1:], [1 / 3, 2 / 3], axis=0).T
    return edges


def image_attributes(features: np.ndarray, labels: np.ndarray,
                     thresholds: np.ndarray) -> np.ndarray:
    """[n, 4] int8 buckets (tone 0-4, fit 0-2, texture 0-2, size 0-2) per image."""
    out = np.zeros((len(features), 4), np.int8)
    out[:, 0] = np.searchsorted(_TONE_EDGES, features[:, 0])
    for c in range(10):
        rows = labels == c
        for j in range(3):
            out[rows, j + 1] = np.searchsorted(thresholds[c, j], features[rows, j + 1])
    return out


# --------------------------------------------------------------------------- #
# Caption rendering
# --------------------------------------------------------------------------- #

def _words(rng: random.Random, label: int, attrs: Sequence[int]) -> dict:
    tone, fit, texture, size = (int(a) for a in attrs)
    w = {"a": rng.choice(_AUDIENCE) if label != 3 else rng.choice(("women's ", "")),
         "t": rng.choice(_TONE[tone]), "f": rng.choice(_FIT[label][fit]),
         "x": rng.choice(_TEXTURE[texture]), "s": rng.choice(_SIZE[size]),
         "n": rng.choice(NOUNS[label])}
    w.update({k.upper(): v[:1].upper() + v[1:] for k, v in w.items()})
    return w


def _render(template: str, words: dict) -> str:
    text = template.format(**words)
    return text[:1].upper() + text[1:] if text[:1].islower() and template[:1] == "{" else text


def clean_caption(rng: random.Random, label: int, attrs: Sequence[int], *,
                  complete: bool = False, shop_suffix_prob: float = 0.0,
                  case_variation: bool = False) -> str:
    """True class and true attributes in one of many web wordings.

    `complete` uses only templates naming all four attributes (retrieval captions);
    the pool adds shop suffixes and casing the way scraped alt-text does.
    """
    templates = _COMPLETE if complete else _COMPLETE + _PARTIAL
    text = _render(rng.choice(templates), _words(rng, label, attrs))
    if shop_suffix_prob and rng.random() < shop_suffix_prob:
        text += rng.choice(_SHOP_SUFFIX)
    if case_variation:
        style = rng.random()
        text = text.lower() if style < 0.15 else string.capwords(text) if style < 0.25 else text
    return text


def wrong_item_caption(rng: random.Random, label: int, attrs: Sequence[int]) -> str:
    """A fluent caption for a different item, with this image's attribute buckets."""
    other = rng.choice([c for c in range(10) if c != label])
    return clean_caption(rng, other, attrs, shop_suffix_prob=0.25, case_variation=True)


def boilerplate_caption(rng: random.Random) -> str:
    if rng.random() < 0.4:
        return rng.choice(_BOILERPLATE)
    k = rng.randint(2, 9)
    return rng.choice(_BOILERPLATE_PATTERNS).format(
        d4=f"{rng.randrange(10_000):04d}", d5=f"{rng.randrange(100_000):05d}",
        hex=f"{rng.getrandbits(40):010x}", i=rng.randint(1, k), k=k)


def off_topic_caption(rng: random.Random) -> str:
    return rng.choice(_OFF_TOPIC).format(p=rng.randint(20, 500), q=rng.randint(5, 50),
                                         h=rng.randint(1, 9), y=rng.randint(2005, 2024))


# --------------------------------------------------------------------------- #
# The pool's noise
# --------------------------------------------------------------------------- #

def noise_counts(n: int, noise: float) -> dict:
    """Noisy rows per kind in a pool of `n`: largest remainder, summing to round(n * noise)."""
    total = round(n * noise)
    raw = {k: total * share for k, share in NOISE_SHARES.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (counts[k] - raw[k], k))[:total - sum(counts.values())]:
        counts[k] += 1
    return counts


def pool_caption(rng: random.Random, kind: str, label: int, attrs: Sequence[int]) -> str:
    """The caption of a pool row whose noise kind is clean / wrong_item / boilerplate / off_topic
    (duplicates take their original's caption, or a clean rewording for near duplicates)."""
    if kind in ("clean", "near_duplicate"):
        return clean_caption(rng, label, attrs, shop_suffix_prob=0.25, case_variation=True)
    if kind == "wrong_item":
        return wrong_item_caption(rng, label, attrs)
    if kind == "boilerplate":
        return boilerplate_caption(rng)
    if kind == "off_topic":
        return off_topic_caption(rng)
    raise ValueError(f"no caption generator for noise kind {kind!r}")
