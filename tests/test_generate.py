"""`python -m lstm_dist.generate` and the sampling it runs: the right distribution, the carried state,
seeds, streaming, UTF-8, and one-line errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from conftest import child_env
from lstm_dist.common.errors import run_cli
from lstm_dist.generate import DEFAULT_PROMPT, main
from lstm_dist.inference.load import load_model
from lstm_dist.inference.sampling import Sampler, TextDecoder, filter_logits, generate, sample_text
from test_evaluate import one_thread, trained_run  # noqa: F401 (one_thread: an autouse fixture)


@pytest.fixture(scope="session")
def bytes_run(tmp_path_factory):
    return trained_run(tmp_path_factory, "bytes")


@pytest.fixture(scope="session")
def chars_run(tmp_path_factory):
    return trained_run(tmp_path_factory, "chars")


def generate_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def ids_of(model, prompt_ids, length, seed, **kw) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.cat(list(generate(model, prompt_ids, length, generator=gen, **kw)))


# ------------------------------------------------------------------------------------ the draws


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.3, 0, 0.7),
                                                     (0.8, 4, 0.8)])
def test_sampler_draws_from_the_filtered_softmax(temperature, top_k, top_p):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    want = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)[0]
    batch, calls = 5000, 8  # every row of the batch is an independent draw
    sampler = Sampler(batch, logits.shape[1], "cpu", temperature=temperature, top_k=top_k, top_p=top_p,
                      generator=torch.Generator().manual_seed(0))
    drawn = torch.cat([sampler(logits.expand(batch, -1)) for _ in range(calls)])
    freq = torch.bincount(drawn, minlength=logits.shape[1]).double() / drawn.numel()
    assert torch.all(freq[want == 0] == 0), (freq, want)  # filtered out: never drawn
    torch.testing.assert_close(freq, want.double(), atol=0.01, rtol=0)


def test_greedy_and_bad_settings():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 4.9]])
    assert Sampler(2, 3, "cpu", temperature=0.0)(logits).tolist() == [1, 0]
    for kw in ({"temperature": 0.0}, {}, {"top_k": 2, "top_p": 0.9}, {"top_p": 0.5}):  # every path writes into `out`
        buf = torch.full((3, 2), -1, dtype=torch.long)
        got = Sampler(2, 3, "cpu", generator=torch.Generator().manual_seed(0), **kw)(logits, out=buf[1])
        assert got.data_ptr() == buf[1].data_ptr() and buf[1].tolist() == got.tolist() and buf[0].tolist() == [-1, -1]
    for bad in ({"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            Sampler(1, 3, "cpu", **bad)


# --------------------------------------------------------------- the model: state, seeds, chunks


def test_prompt_goes_through_once_then_one_step_per_character(bytes_run):
    model = load_model(bytes_run).model
    shapes = []
    hook = model.embed.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    try:
        ids_of(model, [1, 2, 3, 4, 5], 40, seed=0, num_samples=3)
    finally:
        hook.remove()
    # forward sees the prompt once (time-major [T, 1]); then each character is a [samples] step:
    # nothing re-reads the text, so the cost per character stays constant
    assert shapes == [(5, 1)] + [(3,)] * 39


def test_greedy_generation_equals_argmax_of_forward_over_the_whole_text(bytes_run):
    model = load_model(bytes_run).model
    prompt = list(DEFAULT_PROMPT.encode())
    out = ids_of(model, prompt, 60, seed=0, temperature=0.0)[:, 0].tolist()
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt + out]))
    # the carried state of step() gives what forward gives from the start (up to float rounding)
    pred = logits[0, len(prompt) - 1:-1]
    chosen = pred.gather(1, torch.tensor(out).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(chosen, pred.max(dim=1).values, atol=1e-5, rtol=0)


def test_same_seed_same_text_and_a_longer_run_extends_it(bytes_run):
    model = load_model(bytes_run).model
    a = ids_of(model, [65, 66], 300, seed=5, num_samples=2)
    assert torch.equal(a, ids_of(model, [65, 66], 300, seed=5, num_samples=2))
    assert not torch.equal(a, ids_of(model, [65, 66], 300, seed=6, num_samples=2))
    assert not torch.equal(a[:, 0], a[:, 1])  # the samples of a batch are different draws
    assert torch.equal(a[:100], ids_of(model, [65, 66], 100, seed=5, num_samples=2))
    assert torch.equal(ids_of(model, [65, 66], 300, seed=5, emit_every_s=0.0, num_samples=2), a)
    assert list(generate(model, [65], 0)) == []


def test_ids_come_out_in_chunks_as_they_are_made(bytes_run):
    model = load_model(bytes_run).model
    chunks = list(generate(model, [65], 30, emit_every_s=0.0))
    assert [tuple(c.shape) for c in chunks] == [(1, 1)] * 30
    # past the 1,024-row buffer: it is emitted when full and filled again from its start
    chunks = list(generate(model, [65], 1100, emit_every_s=60.0))
    assert [c.shape[0] for c in chunks] == [1024, 76]


def test_sample_text_for_the_training_log_leaves_the_model_mode_and_the_global_rng_alone(chars_run):
    model, vocab = load_model(chars_run)[:2]
    text = sample_text(model, vocab, "The ", 50, seed=3)
    assert len(text) == 50 and text == sample_text(model, vocab, "The ", 50, seed=3)
    assert model.training is False
    model.train()  # as during training: sampling switches to eval for the draw, then back
    torch.manual_seed(11)
    rng = torch.get_rng_state()
    sample_text(model, vocab, "The ", 50, seed=4)
    assert model.training is True
    assert torch.equal(torch.get_rng_state(), rng)  # the training run's generator (dropout) did not move


# ------------------------------------------------------------------------------------- decoding


def test_bytes_are_decoded_incrementally():
    text = "naïve café ☃ 𝄞 done"
    dec = TextDecoder(type("V", (), {"kind": "bytes"})())
    pieces = [dec.decode([b]) for b in text.encode()]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert pieces[text.encode().index("☃".encode()) + 1] == ""  # held back until the character is whole
    dec = TextDecoder(type("V", (), {"kind": "bytes"})())
    assert dec.decode([0xFF, 0x41]) + dec.decode([0xE2, 0x98], final=True) == "\ufffdA\ufffd"


# ------------------------------------------------------------------------------ the command line


class Recorder(io.StringIO):
    """stdout that remembers what had been written at each flush."""

    def __init__(self):
        super().__init__()
        self.flushed: list[str] = []

    def flush(self):
        self.flushed.append(self.getvalue())


def test_text_streams_and_matches_the_whole_decoding(bytes_run, monkeypatch, capsys):
    prompt = "naïve café ☃ the"
    rec = Recorder()
    monkeypatch.setattr(sys, "stdout", rec)
    assert main(["--checkpoint", str(bytes_run), "--prompt", prompt, "--max-new-tokens", "1100", "--seed", "4"]) == 0
    monkeypatch.undo()
    assert rec.flushed[0] == prompt  # the prompt shows before any character is drawn
    assert len(rec.flushed) >= 3  # then the text arrives in pieces (at most 1024 characters each)
    model = load_model(bytes_run).model
    ids = ids_of(model, list(prompt.encode()), 1100, seed=4, temperature=0.8)[:, 0].tolist()  # the CLI default
    assert rec.getvalue() == prompt + bytes(ids).decode("utf-8", errors="replace") + "\n"
    assert "[1,100 bytes in " in capsys.readouterr().err  # the speed line goes to stderr, in the vocabulary's tokens


def test_json_and_several_samples(bytes_run, chars_run, capsys, tmp_path):
    r = generate_json(capsys, "--checkpoint", str(chars_run), "--max-new-tokens", "40", "--num-samples", "3", "--seed", "2",
                      "--top-k", "5", "--top-p", "0.9", "--temperature", "1.2")
    assert r["prompt"] == DEFAULT_PROMPT and r["step"] == 2 and r["checkpoint"].endswith("step_00000002.pt")
    assert len(r["samples"]) == 3 and all(len(s) == 40 for s in r["samples"]) and len(set(r["samples"])) == 3
    assert r["settings"]["top_k"] == 5 and r["chars_per_s"] > 0
    again = generate_json(capsys, "--checkpoint", str(chars_run), "--max-new-tokens", "40", "--num-samples", "3", "--seed", "2",
                          "--top-k", "5", "--top-p", "0.9", "--temperature", "1.2")
    assert again["samples"] == r["samples"]
    assert main(["--checkpoint", str(chars_run), "--max-new-tokens", "40", "--num-samples", "3", "--seed", "2",
                 "--top-k", "5", "--top-p", "0.9", "--temperature", "1.2"]) == 0
    out = capsys.readouterr().out
    assert out == "".join(f"--- sample {i + 1}/3 ---\n{DEFAULT_PROMPT}{s}\n" for i, s in enumerate(r["samples"]))
    pf = tmp_path / "prompt.txt"
    pf.write_text("The city\n", encoding="utf-8")
    assert generate_json(capsys, "--checkpoint", str(bytes_run), "--prompt-file", str(pf), "--max-new-tokens", "3")["prompt"] == "The city\n"


def test_outside_text_is_read_as_the_corpus_reads_its_split_for_the_prompt(bytes_run, chars_run, capsys, tmp_path):
    """Issue 16 §3 for `generate`: a CRLF+BOM `--prompt-file` is used verbatim, i.e. its ids are the ids
    the same file has as a prepared split, and the model continues from exactly those; with a chars
    vocabulary that lacks the CR, the refusal names the CR and the option it came from."""
    from lstm_dist.data.corpus import Corpus
    from lstm_dist.data.prepare import prepare

    pf = tmp_path / "prompt.txt"
    pf.write_bytes("\ufeffThe city\r\nof the river\r\n".encode("utf-8"))
    corpus = Corpus(prepare("files", tmp_path / "corpus", quiet=True, train=pf, valid=pf, test=pf))
    split = [int(i) for i in corpus.split("valid")]
    r = generate_json(capsys, "--checkpoint", str(bytes_run), "--prompt-file", str(pf), "--max-new-tokens", "30",
                      "--temperature", "0")
    model, vocab = load_model(bytes_run)[:2]
    assert r["prompt"] == "\ufeffThe city\r\nof the river\r\n" and vocab.encode(r["prompt"]).tolist() == split
    greedy = ids_of(model, split, 30, seed=0, temperature=0.0)[:, 0].tolist()
    assert r["samples"][0] == TextDecoder(vocab).decode(greedy, final=True)  # continued from the CRs and the BOM
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"the city\r\nthe river")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(main, ["--checkpoint", str(chars_run), "--prompt-file", str(crlf), "--max-new-tokens", "5"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: the prompt has 1 character(s) the checkpoint's chars vocabulary lacks: '\\r'; "
                          f"remove or replace them in --prompt-file {crlf} ("), err


def test_training_sample_prompt_names_the_characters_its_vocabulary_lacks():
    """The trainer's sample prompt is outside text too: one line names it and what the vocabulary lacks."""
    from lstm_dist.data.corpus import Vocab
    from lstm_dist.inference.sampling import sample_prompt_note

    line = sample_prompt_note(Vocab("chars", "abcdefghijklmnopqrstuvwxyz \n"), "The ")
    assert line == ("the training sample prompt 'The ' has 1 character(s) the corpus's chars vocabulary lacks: 'T'; "
                    "the samples logged during training read them as its unknown id")
    assert sample_prompt_note(Vocab("chars", "The"), "The ") is not None  # the space is missing
    assert sample_prompt_note(Vocab("chars", "The "), "The ") is None and sample_prompt_note(Vocab("bytes"), "The ") is None


def test_hugging_face_names_and_the_old_length(bytes_run, chars_run, capsys):
    """Issue 21: `--max-new-tokens` (Hugging Face's and nanoGPT's name); `--length`, its old name, draws the
    same text and is left out of --help; the summary counts tokens in the vocabulary's unit."""
    new = generate_json(capsys, "--checkpoint", str(bytes_run), "--max-new-tokens", "12", "--seed", "5", "--top-k", "9")
    old = generate_json(capsys, "--checkpoint", str(bytes_run), "--length", "12", "--seed", "5", "--top-k", "9")
    assert new["samples"] == old["samples"] and new["settings"]["max_new_tokens"] == 12
    assert len(new["samples"][0].encode()) <= 12  # bytes drawn (an incomplete character decodes to U+FFFD)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--max-new-tokens N" in out and "--length" not in out
    for flag in ("--temperature", "--top-k", "--top-p", "--seed", "--num-samples"):
        assert flag in out
    assert main(["--checkpoint", str(chars_run), "--max-new-tokens", "7"]) == 0
    err = capsys.readouterr().err
    assert "[7 characters in " in err and " characters/s; checkpoint " in err, err


@pytest.mark.parametrize("argv,needle", [
    (["--checkpoint", "{missing}"], "does not exist"),
    (["--checkpoint", "{chars}", "--prompt", "héllo €"], "'é', '€'; remove or replace them in --prompt"),
    (["--checkpoint", "{bytes}", "--prompt", "ab\udcff"], "--prompt is not valid UTF-8 text: character 2 is the byte 0xff"),
    (["--checkpoint", "{bytes}", "--prompt-file", "{latin1}"], "latin1.txt is not valid UTF-8 near byte 3"),
    (["--checkpoint", "{bytes}", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1"),
    (["--checkpoint", "{bytes}", "--length", "-1"], "--max-new-tokens must be >= 0, got -1"),  # the old name
    (["--checkpoint", "{bytes}", "--temperature", "-0.5"], "--temperature"),
    (["--checkpoint", "{bytes}", "--top-p", "0"], "--top-p"),
    (["--checkpoint", "{bytes}", "--top-p", "1.5"], "--top-p"),
    (["--checkpoint", "{bytes}", "--top-k", "-1"], "--top-k"),
    (["--checkpoint", "{bytes}", "--num-samples", "0"], "--num-samples"),
    (["--checkpoint", "{bytes}", "--prompt", ""], "empty"),
    (["--checkpoint", "{bytes}", "--prompt-file", "{missing}"], "--prompt-file"),
    (["--checkpoint", "{bytes}", "--prompt", "a", "--prompt-file", "{missing}"], "not allowed with"),
    (["--checkpoint", "{bytes}", "--length", "many"], "argument --length: invalid int value"),
])
def test_bad_input_ends_in_one_line(argv, needle, bytes_run, chars_run, tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    argv = [a.format(missing=tmp_path / "missing", bytes=bytes_run, chars=chars_run, latin1=tmp_path / "latin1.txt")
            for a in argv]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and needle in err, err


@pytest.mark.slow
def test_the_real_command_line(bytes_run, tmp_path, capsys):
    cmd = [sys.executable, "-m", "lstm_dist.generate", "--checkpoint", str(bytes_run), "--max-new-tokens", "80", "--seed", "9"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = generate_json(capsys, "--checkpoint", str(bytes_run), "--max-new-tokens", "80", "--seed", "9")
    assert proc.stdout == DEFAULT_PROMPT + r["samples"][0] + "\n"
    assert "[80 bytes in " in proc.stderr and " bytes/s; checkpoint " in proc.stderr, proc.stderr
