"""tools/preprocess_data.py: tokens equal the tokenizer's own, order kept with workers, errors
naming file and line, and no valid-looking output from a failed or interrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.tokenizer import build_tokenizer
from tests.helpers import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



preprocess = load_tool("preprocess_data")

TEXTS = [
    "import os\n\n\ndef main():\n    print(os.getcwd())\n",
    "",
    "x = {'a': [1, 2, 3]}  # a dict\n",
    "\tTabs\tand  double  spaces,  Ünïcödé  and 🙂\n",
] + [f"value_{i} = {i} * {i + 1}\n" for i in range(300)]


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl(directory / "c.jsonl", [{"text": t} for t in TEXTS])
    return load_tool("train_tokenizer").train(corpus, str(directory / "tok"), vocab_size=320)


def run(*argv: str) -> int:
    return preprocess.main(list(argv))


@pytest.mark.parametrize("kind", ["GPTSentencePieceTokenizer", "Llama2Tokenizer", "SentencePieceTokenizer"])
def test_tokens_equal_the_tokenizers_own(tmp_path, sp_model, kind):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    assert run("--input", corpus, "--output-prefix", str(tmp_path / "out"), "--tokenizer-type", kind,
               "--tokenizer-model", sp_model, "--append-eod") == 0
    tok = build_tokenizer(kind, sp_model)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert ds.num_documents == len(TEXTS) and ds.dtype == np.uint16
    for i, text in enumerate(TEXTS):
        assert ds.document(i).tolist() == tok.tokenize(text) + [tok.eod]
    assert tok.detokenize(ds.document(0)[:-1].tolist()) == TEXTS[0]


def test_null_tokenizer_and_several_json_keys(tmp_path):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": "1 2 3", "title": "7"}, {"text": "4", "title": "8 9"}])
    assert run("--input", corpus, "--output-prefix", str(tmp_path / "o"), "--json-keys", "text", "title",
               "--tokenizer-type", "NullTokenizer", "--vocab-size", "70000") == 0
    text = IndexedDataset(str(tmp_path / "o_text_document"))
    title = IndexedDataset(str(tmp_path / "o_title_document"))
    assert text.dtype == np.int32  # vocabulary over 65500
    assert [text.document(i).tolist() for i in range(2)] == [[1, 2, 3], [4]]
    assert [title.document(i).tolist() for i in range(2)] == [[7], [8, 9]]


def test_empty_document_without_eod_is_an_empty_sequence(tmp_path):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": "5"}, {"text": ""}, {"text": "6 7"}])
    assert run("--input", corpus, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "NullTokenizer",
               "--vocab-size", "10") == 0
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert ds.document_lengths.tolist() == [1, 0, 2]


def test_two_workers_write_the_same_bytes_as_one(tmp_path, sp_model):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS * 3])
    outputs = []
    for workers in ("1", "2"):
        prefix = str(tmp_path / f"w{workers}")
        assert run("--input", corpus, "--output-prefix", prefix, "--tokenizer-type", "GPTSentencePieceTokenizer",
                   "--tokenizer-model", sp_model, "--append-eod", "--workers", workers) == 0
        outputs.append([open(f"{prefix}_text_document{s}", "rb").read() for s in (".bin", ".idx")])
    assert outputs[0] == outputs[1]
    assert IndexedDataset(str(tmp_path / "w2_text_document")).num_documents == 3 * len(TEXTS)


def leftovers(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if "_document" in n)


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("bad_line, message", [
    ('{"text": "1 2"', "not valid JSON"),
    ('{"body": "1 2"}', "no key 'text'"),
    ('[1, 2]', "expected a JSON object"),
    ('{"text": 12}', "not a string"),
    ('{"text": "1 two"}', "cannot tokenize"),
])
def test_bad_line_is_an_error_naming_file_and_line(tmp_path, capsys, workers, bad_line, message):
    lines = [json.dumps({"text": f"{i}"}) for i in range(100)]
    lines[57] = bad_line
    lines.insert(10, "")  # a blank line is skipped but still counted: the bad line is line 59
    corpus = write_jsonl(tmp_path / "in.jsonl", lines)
    assert run("--input", corpus, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "NullTokenizer",
               "--vocab-size", "100", "--workers", workers) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("preprocess_data.py: error: ") and f"{corpus}:59:" in err and message in err
    assert leftovers(tmp_path) == []


def test_failed_run_keeps_the_previous_dataset(tmp_path):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": "1 2"}, {"text": "3"}])
    assert run("--input", corpus, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "NullTokenizer",
               "--vocab-size", "10") == 0
    before = {n: (tmp_path / n).read_bytes() for n in leftovers(tmp_path)}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "4 5"}, "oops"])
    assert run("--input", bad, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "NullTokenizer",
               "--vocab-size", "10") == 2
    assert {n: (tmp_path / n).read_bytes() for n in leftovers(tmp_path)} == before


def test_interrupted_run_leaves_no_dataset(tmp_path, monkeypatch, capsys):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": f"{i % 10}"} for i in range(50)])
    calls = []

    def interrupt(self, tokens, sequence_lengths=None):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt

    monkeypatch.setattr(preprocess.IndexedDatasetWriter, "add_document", interrupt)
    assert run("--input", corpus, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "NullTokenizer",
               "--vocab-size", "10") == 130
    assert capsys.readouterr().err == "preprocess_data.py: interrupted; nothing written\n"
    assert leftovers(tmp_path) == []


def test_ctrl_c_with_workers_is_one_line_and_leaves_nothing(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while two workers
    tokenize: exit 130, one line, no worker tracebacks."""
    import signal

    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": "1 2 3 4 5 6 7 8"}] * 400_000)
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", corpus,
                             "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "NullTokenizer",
                             "--vocab-size", "10", "--workers", "2", "--log-interval", "2000"],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    first = proc.stderr.readline()
    assert first.startswith("processed 2000 documents"), first
    os.killpg(proc.pid, signal.SIGINT)
    rest = proc.communicate(timeout=60)[1]
    lines = [line for line in rest.splitlines() if not line.startswith("processed ")]
    assert proc.returncode == 130 and lines == ["preprocess_data.py: interrupted; nothing written"], rest
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("lines", [[], ["", "   "]])
def test_input_without_documents_is_refused(tmp_path, capsys, lines):
    corpus = write_jsonl(tmp_path / "in.jsonl", lines)
    assert run("--input", corpus, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "NullTokenizer",
               "--vocab-size", "10") == 2
    err = capsys.readouterr().err
    assert err == f"preprocess_data.py: error: {corpus}: no documents (the file is empty or holds only blank lines); " \
                  f"nothing written\n"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("text, bad", [("3 11", 11), ("-1 2", -1)])
def test_token_id_beyond_the_vocabulary_is_refused(tmp_path, capsys, workers, text, bad):
    lines = [json.dumps({"text": "1 2 10"})] * 5 + [json.dumps({"text": text})]  # 10 is the end of document
    corpus = write_jsonl(tmp_path / "in.jsonl", lines)
    assert run("--input", corpus, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "NullTokenizer",
               "--vocab-size", "10", "--workers", workers) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"preprocess_data.py: error: {corpus}:6: token id {bad} in 'text' is outside the tokenizer's "
                   f"vocabulary of 11 ids (0..10); fix the line or the tokenizer flags; nothing written"]
    assert leftovers(tmp_path) == []


def test_output_prefix_under_a_regular_file_is_one_line(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": "1 2"}])
    (tmp_path / "notadir").write_text("x")
    assert run("--input", corpus, "--output-prefix", str(tmp_path / "notadir" / "o"), "--tokenizer-type",
               "NullTokenizer", "--vocab-size", "10") == 2
    err = capsys.readouterr().err
    assert err == (f"preprocess_data.py: error: --output-prefix {tmp_path / 'notadir' / 'o'}: {tmp_path / 'notadir'} "
                   f"is a file, not a directory; give a prefix in a writable directory\n")
    assert leftovers(tmp_path) == []


def test_progress_reports_documents_and_megabytes_per_second(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": "1 2 3"}] * 10)
    assert run("--input", corpus, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "NullTokenizer",
               "--vocab-size", "10", "--log-interval", "4") == 0
    err = capsys.readouterr().err
    assert "processed 4 documents" in err and "processed 8 documents" in err
    assert "done: 10 documents" in err and "docs/s" in err and "MB/s" in err


def test_cli_bad_flags_exit_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"),
                             "--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "o"),
                             "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", "/no/tok.model"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"preprocess_data.py: error: --input: {tmp_path / 'missing.jsonl'} does not exist"
