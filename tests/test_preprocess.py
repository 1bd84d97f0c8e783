"""The preprocessing contract's tokenizer: cached per caption, equal to open_clip's."""
import open_clip
import torch

from jest_curate import formats
from training import preprocess


def _contract(context_length: int) -> formats.Preprocess:
    return formats.Preprocess(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                              context_length=context_length)


CAPTIONS = ["a photo of a sneaker", "", "ÜNÏCÖDÉ &amp; html  spaces", "word " * 200,
            "a photo of a sneaker", "trousers, folded"]


def test_cached_tokens_equal_open_clips_for_repeats_truncation_and_lengths(monkeypatch):
    monkeypatch.setattr(preprocess, "_token_cache", type(preprocess._token_cache)())
    for context_length in (24, 77, 24):  # The same caption at two lengths: two rows.
        for _ in range(2):  # Cold, then every row from the cache.
            got = preprocess.tokenize(CAPTIONS, _contract(context_length))
            want = open_clip.tokenize(CAPTIONS, context_length=context_length)
            assert got.dtype == want.dtype and torch.equal(got, want)
    assert len(preprocess._token_cache) == 2 * len(set(CAPTIONS))
    assert preprocess.tokenize([], _contract(24)).shape == (0, 24)


def test_the_token_cache_is_bounded_and_its_rows_are_not_aliased(monkeypatch):
    monkeypatch.setattr(preprocess, "_token_cache", type(preprocess._token_cache)())
    monkeypatch.setattr(preprocess, "_TOKEN_CACHE_SIZE", 3)
    first = preprocess.tokenize(["a", "b", "c", "d", "e"], _contract(24))
    assert list(k for k, _ in preprocess._token_cache) == ["c", "d", "e"]  # Oldest out.
    first.zero_()  # A caller writing into its batch leaves the cache alone.
    again = preprocess.tokenize(["e", "a"], _contract(24))
    assert torch.equal(again, open_clip.tokenize(["e", "a"], context_length=24))


def test_threads_sharing_a_small_cache_get_open_clips_tokens(monkeypatch):
    import concurrent.futures
    monkeypatch.setattr(preprocess, "_token_cache", type(preprocess._token_cache)())
    monkeypatch.setattr(preprocess, "_TOKEN_CACHE_SIZE", 5)  # Constant eviction.
    batches = [[f"caption {(t * 7 + i) % 13}" for i in range(20)] for t in range(16)]

    def check(batch):
        return torch.equal(preprocess.tokenize(batch, _contract(24)),
                           open_clip.tokenize(batch, context_length=24))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(pool.map(check, batches * 4))
