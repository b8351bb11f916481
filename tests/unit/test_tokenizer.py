"""Tokenizers: Megatron-LM's semantics for each `--tokenizer-type`, and errors naming the flag."""

from __future__ import annotations

import json

import pytest

from megatron.core.tokenizer import build_tokenizer
from tests.helpers import load_tool




CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)  # squares\n",
    "Überraschung: naïve café, 東京 and emoji 🙂 survive byte fallback.",
] * 20


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A SentencePiece BPE model trained by tools/train_tokenizer.py on a tiny corpus."""
    directory = tmp_path_factory.mktemp("tok")
    corpus = directory / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    return load_tool("train_tokenizer").train(str(corpus), str(directory / "tok"), vocab_size=320, model_type="bpe")


def test_null_tokenizer_has_megatron_semantics():
    tok = build_tokenizer("NullTokenizer", None, vocab_size=100)
    assert tok.vocab_size == 101 and tok.eod == 100 and tok.pad is None
    assert tok.tokenize("3 1  4\n1") == [3, 1, 4, 1]
    assert tok.detokenize([3, 1, 4]) == "3 1 4"
    with pytest.raises(ValueError):
        tok.tokenize("3 x")


def test_gpt_sentencepiece_round_trips_text_exactly(sp_model):
    import sentencepiece

    tok = build_tokenizer("GPTSentencePieceTokenizer", sp_model)
    processor = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    assert tok.vocab_size == 320 == processor.get_piece_size()
    assert tok.eod == processor.eos_id() == 2
    assert tok.pad is None and tok.eos == 2  # the model has no pad piece
    for text in set(CORPUS):
        assert tok.tokenize(text) == processor.encode(text)
        assert tok.detokenize(tok.tokenize(text)) == text  # indentation, newlines, any Unicode


def test_llama2_tokenizer_prepends_bos(sp_model):
    gpt = build_tokenizer("GPTSentencePieceTokenizer", sp_model)
    llama = build_tokenizer("Llama2Tokenizer", sp_model)
    assert llama.tokenize("x = 1") == [1] + gpt.tokenize("x = 1")
    assert llama.vocab_size == gpt.vocab_size and llama.eod == gpt.eod


def test_sentencepiece_tokenizer_appends_megatron_special_tokens(sp_model):
    gpt = build_tokenizer("GPTSentencePieceTokenizer", sp_model)
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    # <CLS> <SEP> <EOD> <MASK> and <PAD> (the model has no pad piece) follow the 320 pieces.
    assert tok.vocab_size == 325
    assert [tok.special_tokens[t] for t in ("<CLS>", "<SEP>", "<EOD>", "<MASK>", "<PAD>")] == [320, 321, 322, 323, 324]
    assert tok.eod == 322
    assert tok.pad == 324 and tok.eos == 2  # Megatron-LM's: <PAD>, and the model's eos piece
    assert tok.special_tokens["<s>"] == 1 and tok.special_tokens["</s>"] == 2
    ids = tok.tokenize("a = 1<EOD>b = 2")
    assert ids == gpt.tokenize("a = 1") + [322] + gpt.tokenize("b = 2")
    assert tok.detokenize(ids) == "a = 1<EOD>b = 2"


@pytest.mark.parametrize("backend", ["transformers if installed", "tokenizers"])
def test_huggingface_tokenizer_from_local_files(tmp_path, monkeypatch, backend):
    tokenizers = pytest.importorskip("tokenizers")
    if backend == "tokenizers":
        from megatron.core.tokenizer import huggingface_tokenizer

        monkeypatch.setattr(huggingface_tokenizer, "_auto_tokenizer", lambda directory: None)
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"]))
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<unk>"}))
    tok = build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    assert tok.vocab_size == hf.get_vocab_size(with_added_tokens=True)
    assert tok.eod == tok.eos == hf.token_to_id("<|endoftext|>") == 1
    assert tok.pad == hf.token_to_id("<unk>") == 0
    assert tok.tokenize(CORPUS[0]) == hf.encode(CORPUS[0]).ids
    assert tok.detokenize(tok.tokenize(CORPUS[0])) == CORPUS[0]
    # the tokenizer.json file itself also works
    assert build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "tokenizer.json")).tokenize("x") == hf.encode("x").ids


@pytest.mark.parametrize("kind, model, vocab, flag", [
    ("GPTSentencePieceTokenizer", None, None, "--tokenizer-model"),
    ("GPTSentencePieceTokenizer", "/no/such/tok.model", None, "--tokenizer-model"),
    ("BertWordPieceLowerCase", "x", None, "--tokenizer-type"),
    ("NullTokenizer", None, None, "--vocab-size"),
])
def test_bad_tokenizer_flags_name_the_flag(kind, model, vocab, flag):
    with pytest.raises(ValueError, match=flag):
        build_tokenizer(kind, model, vocab)


def test_not_a_sentencepiece_file_is_a_clear_error(tmp_path):
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="--tokenizer-model.*not a SentencePiece model"):
        build_tokenizer("GPTSentencePieceTokenizer", str(tmp_path / "junk.model"))


def test_train_tokenizer_cli_trains_unigram(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"body": t}) + "\n" for t in CORPUS))
    tool = load_tool("train_tokenizer")
    assert tool.main(["--input", str(corpus), "--json-key", "body", "--model-prefix", str(tmp_path / "u"),
                      "--vocab-size", "310", "--model-type", "unigram"]) == 0
    tok = build_tokenizer("GPTSentencePieceTokenizer", str(tmp_path / "u.model"))
    assert tok.vocab_size == 310
    assert tok.detokenize(tok.tokenize(CORPUS[1])) == CORPUS[1]


def test_train_tokenizer_reports_bad_line(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "ok"}) + "\n" + "{broken\n")
    tool = load_tool("train_tokenizer")
    assert tool.main(["--input", str(corpus), "--model-prefix", str(tmp_path / "u"), "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_tokenizer.py: error:") and f"{corpus}:2" in err and "\n" not in err
