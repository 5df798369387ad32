"""examples/numpy_decode.py: a NumPy forward pass over kmv attention
streams generates, token for token, what `kmv decode --exact` does."""
import importlib.util
import os

import pytest

from conftest import ROOT

MODEL = os.path.join(ROOT, "data/stories260K/stories260K.bin")
TOKENIZER = os.path.join(ROOT, "data/stories260K/tok512.bin")
KMV = os.path.join(ROOT, "kmv")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location(
        "numpy_decode", os.path.join(ROOT, "examples/numpy_decode.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_from_bos_matches_kmv_decode(example):
    model = example.Model(MODEL)
    tok = example.Tokenizer(TOKENIZER, model.vocab_size)
    # The whole context, as kmv decode's default: the story ends at BOS,
    # well before it (a few seconds under AddressSanitizer).
    tokens, pieces, seconds, modes = example.generate(model, tok, model.seq_len)
    assert len(tokens) >= 100
    assert dict(modes) == {"exact": len(seconds) * model.n_layers * model.n_heads}
    theirs, ran, _ = example.kmv_decode(KMV, MODEL, TOKENIZER, "", model.seq_len)
    assert ran == len(seconds)  # the same positions, ended by the same BOS or the context
    assert example.agreeing(pieces, theirs) == len(pieces)
    assert b"".join(pieces) == theirs


def test_cli_with_prompt(example, capsys):
    argv = ["--model", MODEL, "--tokenizer", TOKENIZER, "--steps", "48",
            "--prompt", "The dragon", "--compare", KMV]
    assert example.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("The dragon") and "AGREE: all 48 tokens" in out


def test_cli_mismatch_fails(example, tmp_path, capsys):
    fake = tmp_path / "fake_kmv"
    fake.write_text("#!/bin/sh\necho 'Once upon a dragon.'\necho 'kmv decode: 5 positions' >&2\n")
    fake.chmod(0o755)
    argv = ["--model", MODEL, "--tokenizer", TOKENIZER, "--steps", "8", "--compare", str(fake)]
    assert example.main(argv) == 1
    assert "DISAGREE: the first 3 of 8 tokens" in capsys.readouterr().out
    assert example.main(argv + ["--approx"]) == 0  # reported, not a failure
