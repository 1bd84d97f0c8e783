"""Evaluators: zero-shot classification and image<->text retrieval.

As in big_vision, an evaluator takes encode functions, never the trainer or a
model, and `run()` yields `(name, value)`:

    encode_image_fn(images: list of bytes | PIL) -> [n, d] float32, L2-normalised
    encode_text_fn(texts: list of str)           -> [n, d] float32, L2-normalised

`model_encoders` builds both from an open_clip model and its preprocessing
contract; `evaluate_dir` runs every evaluator on a demo-style eval directory.

Ties count against the model: the true item is ranked below every item scoring
at least as high. A collapsed model (all embeddings equal) therefore scores 0
at retrieval and 0 at zero-shot instead of a perfect or lucky-index result.
"""
import collections
import dataclasses
import functools
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import torch

from jest_curate import formats
from training import preprocess
from training import scoring

__all__ = ["ZeroShotEvaluator", "RetrievalEvaluator", "model_encoders", "EvalSplit",
           "EvalData", "load_eval_data", "evaluate_dir", "bpe_tokens", "untaught_tokens"]

EncodeFn = Callable[[Sequence], np.ndarray]


def _encode_all(fn: EncodeFn, items: Sequence, batch_size: int) -> np.ndarray:
    chunks = [np.asarray(fn(items[i:i + batch_size]), dtype=np.float32)
              for i in range(0, len(items), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _ranks_of_true(scores: np.ndarray, true: np.ndarray) -> np.ndarray:
    """[n] number of *other* columns scoring >= the true column of each row (0 = top)."""
    true_scores = scores[np.arange(len(true)), true][:, None]
    return (scores >= true_scores).sum(axis=1) - 1


def _paired_ranks(query: np.ndarray, keys: np.ndarray, block: int = 1024) -> np.ndarray:
    """Ranks of keys[i] for query[i], in row blocks so n x n scores never sit in memory."""
    return np.concatenate([
        _ranks_of_true(query[s:s + block] @ keys.T, np.arange(s, min(s + block, len(query))))
        for s in range(0, len(query), block)])


class ZeroShotEvaluator:
    """Accuracy of classifying images by their nearest class-prompt embedding.

    Each class embedding is the normalised mean of its prompts' normalised text
    embeddings (the prompt ensemble of Radford et al. 2021).
    """

    def __init__(self, encode_image_fn: EncodeFn, encode_text_fn: EncodeFn, *,
                 images: Sequence, labels: Sequence[int], classnames: Sequence[str],
                 templates: Sequence[str], ks: Sequence[int] = (1, 5),
                 batch_size: int = scoring.FORWARD_ROWS, prefix: str = "zeroshot_"):
        if len(images) != len(labels) or not len(images):
            raise ValueError(f"need as many labels as images (> 0), got {len(images)} images "
                             f"and {len(labels)} labels")
        if not classnames or not templates or not all("{}" in t for t in templates):
            raise ValueError("need class names and templates containing '{}'")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.min() < 0 or labels.max() >= len(classnames):
            raise ValueError(f"labels must be in [0, {len(classnames)}), found "
                             f"[{labels.min()}, {labels.max()}]")
        self.encode_image_fn, self.encode_text_fn = encode_image_fn, encode_text_fn
        self.images, self.labels = images, labels
        self.classnames, self.templates = list(classnames), list(templates)
        self.ks = [k for k in ks if k <= len(classnames)]
        self.batch_size, self.prefix = batch_size, prefix

    def class_embeddings(self) -> np.ndarray:
        prompts = [t.format(c) for c in self.classnames for t in self.templates]
        text = _normalize(_encode_all(self.encode_text_fn, prompts, self.batch_size))
        per_class = text.reshape(len(self.classnames), len(self.templates), -1).mean(axis=1)
        return _normalize(per_class)

    def run(self) -> Iterator[Tuple[str, float]]:
        """topk accuracies; top1 per class ({classname: accuracy or None if absent}) and
        their mean over the classes present (balanced accuracy); the number of images."""
        image = _normalize(_encode_all(self.encode_image_fn, self.images, self.batch_size))
        ranks = _ranks_of_true(image @ self.class_embeddings().T, self.labels)
        for k in self.ks:
            yield f"{self.prefix}top{k}", float(np.mean(ranks < k))
        per_class = {name: (float(np.mean(ranks[self.labels == c] < 1))
                            if (self.labels == c).any() else None)
                     for c, name in enumerate(self.classnames)}
        yield f"{self.prefix}top1_per_class", per_class
        yield f"{self.prefix}balanced_top1", float(np.mean(
            [v for v in per_class.values() if v is not None]))
        yield f"{self.prefix}num_examples", len(self.labels)


class RetrievalEvaluator:
    """Recall@k of finding an image's caption among all captions, and vice versa."""

    def __init__(self, encode_image_fn: EncodeFn, encode_text_fn: EncodeFn, *,
                 images: Sequence, captions: Sequence[str], ks: Sequence[int] = (1, 5),
                 batch_size: int = scoring.FORWARD_ROWS, prefix: str = "retrieval_"):
        if len(images) != len(captions) or not len(images):
            raise ValueError(f"need one caption per image (> 0), got {len(images)} images "
                             f"and {len(captions)} captions")
        duplicates = len(captions) - len(set(captions))
        if duplicates:
            raise ValueError(f"retrieval needs unique captions; {duplicates} are repeated, so "
                             "the correct match would be ambiguous")
        self.encode_image_fn, self.encode_text_fn = encode_image_fn, encode_text_fn
        self.images, self.captions = images, list(captions)
        self.ks, self.batch_size, self.prefix = list(ks), batch_size, prefix

    def run(self) -> Iterator[Tuple[str, float]]:
        image = _normalize(_encode_all(self.encode_image_fn, self.images, self.batch_size))
        text = _normalize(_encode_all(self.encode_text_fn, self.captions, self.batch_size))
        for direction, query, keys in (("image_to_text", image, text),
                                       ("text_to_image", text, image)):
            ranks = _paired_ranks(query, keys)
            for k in self.ks:
                yield f"{self.prefix}{direction}_r{k}", float(np.mean(ranks < k))
        yield f"{self.prefix}num_examples", len(self.captions)


@functools.lru_cache(maxsize=1)
def _bpe():
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer()


def bpe_tokens(text: str) -> List[str]:
    """open_clip's BPE tokens of `text` (lower-cased, as the preprocessing contract does)."""
    bpe = _bpe()
    return [bpe.decoder[i] for i in bpe.encode(text)]


def untaught_tokens(texts: Sequence[str], captions: Sequence[str]) -> Dict[str, List[str]]:
    """{text: its BPE tokens that occur in none of `captions`} for texts with any.

    A zero-shot prompt whose tokens the training captions never contain embeds
    untrained token embeddings, so its accuracy measures nothing the data taught.
    Templates are checked with their "{}" slot removed.
    """
    taught = {t for c in captions for t in bpe_tokens(c)}
    gaps = {}
    for text in texts:
        missing = sorted({t for t in bpe_tokens(text.replace("{}", " ")) if t not in taught})
        if missing:
            gaps[text] = missing
    return gaps


def model_encoders(model: torch.nn.Module, contract: formats.Preprocess, *,
                   device: str = "cpu", precision: str = "fp32"):
    """(encode_image_fn, encode_text_fn) for an open_clip model in eval mode."""
    model = model.to(device).eval()

    def autocast():
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                              enabled=precision == "bf16")

    def encode_image(images):
        with torch.inference_mode(), autocast():
            pixels = preprocess.preprocess_images(images, contract).to(device)
            return model.encode_image(pixels, normalize=True).float().cpu().numpy()

    def encode_text(texts):
        with torch.inference_mode(), autocast():
            tokens = preprocess.tokenize(texts, contract).to(device)
            return model.encode_text(tokens, normalize=True).float().cpu().numpy()

    return encode_image, encode_text


# --------------------------------------------------------------------------- #
# Eval directories (jest_curate.demo_data layout)
# --------------------------------------------------------------------------- #

@dataclasses.dataclass
class EvalSplit:
    images: List  # Decoded PIL images.
    captions: List[str]
    labels: np.ndarray  # [n] int64
    dropped: Dict[str, int]  # reason -> rows left out (undecodable images).


@dataclasses.dataclass
class EvalData:
    url: str  # The eval directory.
    classnames: List[str]
    templates: List[str]
    zeroshot: Optional[EvalSplit]
    retrieval: Optional[EvalSplit]


def _read_split(url: str) -> Optional[EvalSplit]:
    if not formats.exists(url):
        return None
    columns = ("uid", "image", "caption", "label")
    schema = pa.schema([formats.LABELED_CORPUS_SCHEMA.field(c) for c in columns])
    images, captions, labels = [], [], []
    dropped = collections.Counter()
    for shard in formats.list_shards(url):
        table = formats.read_shard(shard, schema=schema, columns=columns)
        for data, caption, label in zip(table.column("image").to_pylist(),
                                        table.column("caption").to_pylist(),
                                        table.column("label").to_pylist()):
            try:
                images.append(preprocess.decode_image(data))
            except preprocess.ImageDecodeError as e:
                dropped[e.reason] += 1
                continue
            captions.append(caption)
            labels.append(label)
    return EvalSplit(images=images, captions=captions, labels=np.asarray(labels, np.int64),
                     dropped=dict(dropped))


def load_eval_data(url: str) -> EvalData:
    """An eval directory (classes.json, zeroshot/, retrieval/) or a demo root holding eval/."""
    for root in (url, formats.join_url(url, "eval")):
        classes_url = formats.join_url(root, "classes.json")
        if formats.exists(classes_url):
            break
    else:
        raise FileNotFoundError(f"no classes.json in {url} or {url}/eval: not an eval "
                                "directory (`jest-curate demo-data` writes one in OUTPUT/eval)")
    classes = formats.read_json(classes_url)
    if not isinstance(classes, dict) or not classes.get("classnames") or not classes.get(
            "templates"):
        raise formats.FormatError(f"{classes_url}: expected {{\"classnames\": [...], "
                                  "\"templates\": [...]}")
    data = EvalData(url=root, classnames=list(classes["classnames"]),
                    templates=list(classes["templates"]),
                    zeroshot=_read_split(formats.join_url(root, "zeroshot")),
                    retrieval=_read_split(formats.join_url(root, "retrieval")))
    if data.zeroshot is None and data.retrieval is None:
        raise FileNotFoundError(f"{root}: has neither zeroshot/ nor retrieval/")
    return data


def evaluate_dir(encode_image_fn: EncodeFn, encode_text_fn: EncodeFn, data: EvalData, *,
                 batch_size: int = scoring.FORWARD_ROWS) -> dict:
    """Every evaluator the eval directory supports, as one flat dict of metrics."""
    results, evaluators = {}, []
    if data.zeroshot is not None:
        evaluators.append(ZeroShotEvaluator(
            encode_image_fn, encode_text_fn, images=data.zeroshot.images,
            labels=data.zeroshot.labels, classnames=data.classnames,
            templates=data.templates, batch_size=batch_size))
        results["zeroshot_dropped"] = data.zeroshot.dropped
    if data.retrieval is not None:
        evaluators.append(RetrievalEvaluator(
            encode_image_fn, encode_text_fn, images=data.retrieval.images,
            captions=data.retrieval.captions, batch_size=batch_size))
        results["retrieval_dropped"] = data.retrieval.dropped
    for evaluator in evaluators:
        results.update(evaluator.run())
    return results
