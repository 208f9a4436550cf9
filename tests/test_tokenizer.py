import pytest

from gradient_bottleneck.corpus import corpus_hash, load_documents
from gradient_bottleneck.tokenizer import END_OF_TEXT, encode_split, load_tokenizer


def test_tokenizer_has_requested_size_and_round_trips(small_corpus, tmp_path):
    tokenizer = load_tokenizer(400, small_corpus, tmp_path)
    assert tokenizer.get_vocab_size() == 400
    assert tokenizer.token_to_id(END_OF_TEXT) is not None
    text = "To be, or not to be: that is the question.\n"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_tokenizer_cache_is_reused(small_corpus, tmp_path):
    load_tokenizer(300, small_corpus, tmp_path)
    [cached] = (tmp_path / "tokenizers").glob("*.json")
    stamp = cached.stat().st_mtime_ns
    load_tokenizer(300, small_corpus, tmp_path)
    assert cached.stat().st_mtime_ns == stamp
    assert corpus_hash(small_corpus)[:16] in cached.name
    assert cached.name.endswith("-V300.json")


def test_unreadable_tokenizer_cache_raises(small_corpus, tmp_path):
    load_tokenizer(300, small_corpus, tmp_path)
    [cached] = (tmp_path / "tokenizers").glob("*.json")
    cached.write_text("{ truncated")
    with pytest.raises(RuntimeError, match="unreadable.*delete that file"):
        load_tokenizer(300, small_corpus, tmp_path)


def test_encoded_split_marks_documents(small_corpus, tmp_path):
    stream = encode_split("train", 300, small_corpus, tmp_path)
    assert len(stream.doc_names) == 3
    assert stream.doc_starts[0] == 0
    assert int(stream.tokens.max()) < 300
    assert stream.document_of(stream.doc_starts).tolist() == [0, 1, 2]
    again = encode_split("train", 300, small_corpus, tmp_path)  # from the .npy cache
    assert again.tokens.equal(stream.tokens)


@pytest.mark.parametrize("size", [1, 256, 3.5, True])
def test_bad_vocab_size_raises(small_corpus, tmp_path, size):
    with pytest.raises(ValueError, match="V="):
        load_tokenizer(size, small_corpus, tmp_path)


def test_vocab_larger_than_corpus_supports_raises(tmp_path):
    (tmp_path / "corpus" / "train").mkdir(parents=True)
    (tmp_path / "corpus" / "heldout").mkdir()
    (tmp_path / "corpus" / "train" / "a.txt").write_text("to be or not to be\n")
    (tmp_path / "corpus" / "heldout" / "b.txt").write_text("that is the question\n")
    with pytest.raises(ValueError, match="supports only"):
        load_tokenizer(5000, tmp_path / "corpus", tmp_path / "cache")


def test_missing_or_empty_corpus_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_documents("train", tmp_path / "nowhere")
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_documents("train", tmp_path)
    (tmp_path / "train" / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="blank.txt is empty"):
        load_documents("train", tmp_path)
    with pytest.raises(ValueError, match="unknown corpus split 'test'"):
        load_documents("test", tmp_path)
