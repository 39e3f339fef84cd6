"""Text: tokenisers, text sources, length buckets, the categorical likelihood, the sentence VAE, free bits
and KL warm-up, and end to end on a synthetic grammar: the defaults learn to use z, and without
annealing, free bits and word dropout the posterior collapses."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import turbovae
from turbovae.cli import main
from turbovae.data.text import (
    BOS,
    EOS,
    PAD,
    UNK,
    WORDS_FILES,
    Tokenizer,
    bucketed,
    lengths_of,
    load_text,
    synthetic_grammar,
    trim,
)
from turbovae.engine.step import kl_weight
from turbovae.errors import ConfigError, DataError
from turbovae.kinds import KINDS, kind_of
from turbovae.likelihoods import build_likelihood
from turbovae.models import SentenceConfig, build_network
from turbovae.objectives import elbo, iwae
from turbovae.vae import VAE

# A small network and a short schedule; the anti-collapse settings (KL warm-up, free bits, word
# dropout) are the `text` preset's, with the warm-up shortened to a third of the 680 steps
SMALL = ["model.hidden=[64]", "model.embedding=32", "train.batch_size=32", "train.lr=3e-3", "train.epochs=8",
         "train.threads=1", "train.precision=fp32", "eval.iwae_k=10", "eval.every_epoch=false"]  # fmt: skip
WARMUP = ["train.kl_warmup_steps=200"]
NO_ANNEALING = ["train.kl_warmup_steps=0", "train.free_bits=0", "model.word_dropout=0"]


@pytest.fixture(scope="module")
def grammar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "grammar.txt"
    path.write_text("\n".join(synthetic_grammar(3000, seed=0)) + "\n")
    return path


def _fit(grammar: Path, out: Path, extra: list[str]) -> dict:
    cfg = turbovae.resolve("text", overrides=[f"data.name=text:{grammar}", *SMALL, *extra])
    return turbovae.fit(cfg, out, progress=False)


@pytest.fixture(scope="module")
def run(grammar: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "default"
    return out, _fit(grammar, out, WARMUP)


# ---- tokenisers and sources ----------------------------------------------------------------------------


def test_tokenizers_round_trip_and_map_unknown_tokens():
    lines = ["the cat sat", "the  dog\tsat ", "a cat"]
    word = Tokenizer.fit(lines, "word", max_length=10)
    assert word.vocab[:4] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert word.vocab[4:6] == ["cat", "sat"] or word.vocab[4] == "the"  # most frequent first
    for line in lines:
        assert word.decode(word.encode(line)) == " ".join(line.split())
    ids = word.encode("the bird sat")
    assert ids[1] == UNK and word.decode(ids) == "the <unk> sat"
    char = Tokenizer.fit(lines, "char", max_length=20)
    for line in lines:
        assert char.decode(char.encode(line)) == line.strip()
    assert char.decode(char.encode("cz")) == "c\N{REPLACEMENT CHARACTER}"
    # ids stop at the end marker and skip the start marker; the meta round-trips through JSON
    assert word.decode([BOS, *word.encode("a cat"), EOS, 5, 6]) == "a cat"
    again = Tokenizer.from_meta({"text": json.loads(json.dumps(word.to_meta()))})
    assert again.vocab == word.vocab and again.encode("the cat") == word.encode("the cat")
    rare = Tokenizer.fit(lines, "word", max_length=10, min_freq=2)
    assert set(rare.vocab[4:]) == {"the", "cat", "sat"}


def test_encode_lines_pads_ends_and_cuts():
    tok = Tokenizer.fit(["a b c d e"], "word", max_length=3)
    ids, cut = tok.encode_lines(["a b", "a b c d e", "c"])
    assert cut == 1 and ids.dtype == np.int64 and ids.shape == (3, 3)
    assert ids[0].tolist() == [*tok.encode("a b"), EOS]
    assert ids[1].tolist() == tok.encode("a b c")  # cut: no end marker, the line did not end there
    assert ids[2].tolist() == [*tok.encode("c"), EOS, PAD]


def test_text_file_split_vocabulary_counts_and_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    lines = [f"w{i % 7} w{i % 5} " + "long " * (30 if i % 50 == 0 else 1) for i in range(200)]
    lines[3] = lines[9] = "   "
    (tmp_path / "c.txt").write_text("\n".join(lines[:100]) + "\n\n" + "\n".join(lines[100:]) + "\n")
    ds = turbovae.load_dataset(f"text:{tmp_path / 'c.txt'}", max_length=10, test_fraction=0.2)
    err = capsys.readouterr().err
    assert "skipped 3 empty line(s)" in err and "were cut to 10" in err and err.count("\n") == 2
    meta = ds.meta["text"]
    assert meta["empty_lines"] == 3 and sum(meta["truncated"].values()) == 4
    assert meta["lines"] == {"train": 158, "test": 40} and ds.meta["kind"] == "text"
    assert kind_of(ds) is KINDS["text"]
    assert ds.x_train.dtype == torch.int64 and ds.event_shape == (10,) and ds.x_test.shape[1] == 10
    assert meta["tokenizer"] == "word" and meta["vocab"][:4] == ["<pad>", "<unk>", "<s>", "</s>"]
    again = turbovae.load_dataset(f"text:{tmp_path / 'c.txt'}", max_length=10, test_fraction=0.2)
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.x_test, ds.x_test)  # deterministic
    chars = load_text(str(tmp_path / "c.txt"), tokenizer="char", max_length=200)  # a .txt path works too
    assert chars.meta["text"]["tokenizer"] == "char" and "w" in chars.meta["text"]["vocab"]


def test_given_test_files_and_folders(tmp_path: Path):
    (tmp_path / "train.txt").write_text("a b\nb c\nc a\n")
    (tmp_path / "test.txt").write_text("a b\nd e\n")
    pair = load_text(f"text:{tmp_path / 'train.txt'},{tmp_path / 'test.txt'}")
    folder = load_text(f"text:{tmp_path}")
    for ds in (pair, folder):
        assert len(ds.x_train) == 3 and len(ds.x_test) == 2
        assert ds.meta["text"]["vocab"][4:] == ["a", "b", "c"]  # from the training split only
        assert ds.meta["text"]["unknown_test_tokens"] == 2  # "d e"
    (tmp_path / "more").mkdir()
    for i in range(3):
        (tmp_path / "more" / f"{i}.txt").write_text("".join(f"line {i} {j}\n" for j in range(10)))
    many = load_text(f"text:{tmp_path / 'more'}", test_fraction=0.1)
    assert len(many.x_train) + len(many.x_test) == 30


@pytest.mark.parametrize(
    "content, message",
    [(None, "no such file"), (b"caf\xe9\n", "not UTF-8"), (b"", "no text"), (b"\n  \n", "no text")],
)
def test_bad_text_input_is_one_line_with_exit_code_2(tmp_path: Path, capsys, content, message):
    path = tmp_path / "bad.txt"
    if content is not None:
        path.write_bytes(content)
    code = main(["train", "--data", f"text:{path}", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("turbovae: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_text_options_are_checked(tmp_path: Path):
    (tmp_path / "t.txt").write_text("a b\nb c\nc a\n")
    with pytest.raises(ConfigError, match="categorical"):
        turbovae.resolve("text", overrides=["model.likelihood=bernoulli"])
    with pytest.raises(ConfigError, match=r"data\.tokenizer"):
        turbovae.resolve("text", overrides=["data.tokenizer=bytes"])
    with pytest.raises(ConfigError, match=r"train\.objective=elbo"):
        turbovae.resolve("text", overrides=["train.objective=iwae"])
    with pytest.raises(ConfigError, match="text"):  # an image model on text
        turbovae.fit(turbovae.resolve(None, overrides=[f"data.name=text:{tmp_path / 't.txt'}",
                                                       "train.batch_size=2"]), tmp_path / "r")  # fmt: skip
    with pytest.raises(ConfigError, match="is for text"):  # a text model on images
        turbovae.fit(turbovae.resolve("text", overrides=["data.name=digits"]), tmp_path / "r")


@pytest.mark.skipif(not any(p.is_file() for p in WORDS_FILES), reason="wamerican not installed")
def test_builtin_words_corpus():
    ds = turbovae.load_dataset("words", test_fraction=0.05)
    meta = ds.meta["text"]
    assert meta["tokenizer"] == "char" and len(ds.x_train) + len(ds.x_test) > 50_000
    tok = Tokenizer.from_meta(ds.meta)
    assert all("'" not in tok.decode(row)[-2:] for row in ds.x_test[:500])  # possessives left out


# ---- batches -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, batch", [(1000, 32), (999, 32), (64, 64), (70, 8), (5, 2)])
def test_bucketing_covers_every_example_exactly_once(n, batch):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (n,), generator=g)
    perm = torch.randperm(n, generator=g)
    order = bucketed(perm, lengths, batch, torch.Generator().manual_seed(1), chunk_batches=4)
    assert sorted(order.tolist()) == list(range(n))  # every example, once
    again = bucketed(perm, lengths, batch, torch.Generator().manual_seed(1), chunk_batches=4)
    assert torch.equal(order, again)  # deterministic from the generator
    steps = -(-n // batch)  # what the loop runs for text: the last batch may be smaller
    seen = torch.cat([order[b * batch : (b + 1) * batch] for b in range(steps)])
    assert torch.equal(seen, order)
    if n >= 999:  # little padding: batches hold lines of nearly one length
        padded = sum(
            int(lengths[order[b * batch : (b + 1) * batch]].max()) * batch for b in range(n // batch)
        )
        random = sum(int(lengths[perm[b * batch : (b + 1) * batch]].max()) * batch for b in range(n // batch))
        assert padded < 0.7 * random


def test_trim_cuts_to_the_longest_line():
    x = torch.tensor([[5, 6, EOS, 0, 0, 0], [5, EOS, 0, 0, 0, 0]])
    assert trim(x).tolist() == [[5, 6, EOS], [5, EOS, 0]]
    assert lengths_of(x).tolist() == [3, 2]


# ---- likelihood and model ------------------------------------------------------------------------------

META = {"text": {"tokenizer": "word", "vocab": ["<pad>", "<unk>", "<s>", "</s>", "a", "b", "c"],
                 "max_length": 8, "min_freq": 1}}  # fmt: skip


def test_categorical_scores_non_padding_tokens_and_broadcasts():
    lik = build_likelihood("categorical", (5,), data_meta=META)
    assert lik.params_per_dim == 7
    logits = torch.randn(2, 5, 7)  # (B, T, V) as the decoder computes it
    params = logits.transpose(-1, -2)  # (B, V, T)
    x = torch.tensor([[4, 5, EOS, 0, 0], [6, EOS, 0, 0, 0]])
    logp = torch.log_softmax(logits, -1).gather(-1, x.unsqueeze(-1)).squeeze(-1) * (x != 0)
    torch.testing.assert_close(lik.log_prob(x, params), logp.sum(-1))
    k = torch.randn(3, 2, 7, 5)
    assert lik.log_prob(x, k).shape == (3, 2)
    torch.testing.assert_close(lik.log_prob(x, k)[1], lik.log_prob(x, k[1]))
    assert lik.mean(params).shape == (2, 5) and lik.sample(params).shape == (2, 5)
    with pytest.raises(ConfigError, match="for text"):
        build_likelihood("categorical", (5,))
    with pytest.raises(DataError, match="token ids"):
        lik.check_data(0, 7, False, "x")


def _vae(word_dropout: float = 0.0, cell: str = "gru") -> VAE:
    cfg = SentenceConfig(likelihood="categorical", hidden=[16, 16], embedding=8, latent=4,
                         word_dropout=word_dropout, cell=cell)  # fmt: skip
    lik = build_likelihood("categorical", (6,), data_meta=META)
    net = build_network("sentence", (6,), 4, lik.params_per_dim, cfg)
    vae = VAE(net, lik, 4)
    vae.data_meta = META
    return vae


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_sentence_vae_shapes_gradients_and_padding(cell):
    vae = _vae(cell=cell).eval()
    x = torch.tensor([[4, 5, 6, EOS], [5, EOS, 0, 0], [6, 6, EOS, 0]])
    q = vae.encode(x)
    assert q.mean.shape == (3, 4)
    longer = torch.cat([x, torch.zeros(3, 3, dtype=torch.long)], 1)  # more padding changes nothing
    torch.testing.assert_close(vae.encode(longer).mean, q.mean)
    params = vae.decode_params(q.mean, x)
    assert params.shape == (3, 7, 4)
    torch.testing.assert_close(vae.decode_params(q.mean, longer)[..., :4], params)
    assert vae.decode_params(torch.randn(5, 3, 4), x).shape == (5, 3, 7, 4)  # IWAE samples share x
    with pytest.raises(ValueError, match="autoregressive"):
        vae.decode_params(q.mean)
    vae.train()
    terms = elbo(vae, x)
    terms["loss"].backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert torch.isfinite(iwae(vae, x, k=3)["loss"])
    g = torch.Generator().manual_seed(0)
    ids = vae.sample(5, generator=g, mean=False)
    assert ids.shape == (5, 6) and ids.dtype == torch.long
    assert not ((ids == BOS) | (ids < 0) | (ids >= 7)).any()
    assert torch.equal(ids, vae.sample(5, generator=torch.Generator().manual_seed(0), mean=False))
    assert vae.decode(q.mean).shape == (3, 6) and vae.reconstruct(x).shape == (3, 6)


def test_word_dropout_replaces_decoder_inputs_only_while_training():
    vae = _vae(word_dropout=0.5)
    x = torch.randint(4, 7, (64, 6))
    net = vae.net
    dropped = net.decoder_inputs(x)  # type: ignore[operator]
    assert (dropped[:, 0] == BOS).all() and ((dropped[:, 1:] == UNK) | (dropped[:, 1:] == x[:, :-1])).all()
    assert 0.3 < (dropped[:, 1:] == UNK).float().mean() < 0.7
    vae.eval()
    assert not (net.decoder_inputs(x) == UNK).any()  # type: ignore[operator]


def test_free_bits_and_warmup_change_the_loss_not_the_reported_nelbo():
    vae = _vae()
    x = torch.tensor([[4, 5, 6, EOS], [5, EOS, 0, 0]])
    eps = torch.randn(2, 4)
    plain = elbo(vae, x, eps=eps)
    free = elbo(vae, x, eps=eps, free_bits=5.0)  # every dimension below 5 nats: charged 5 each
    assert torch.equal(plain["nelbo"], free["nelbo"]) and torch.equal(plain["kl"], free["kl"])
    torch.testing.assert_close(free["loss"], plain["rec"] + 4 * 5.0)
    free["loss"].backward()
    assert vae.net.posterior.weight.grad is not None  # type: ignore[union-attr]
    half = elbo(vae, x, eps=eps, beta=torch.tensor(0.5))
    torch.testing.assert_close(half["loss"], plain["rec"] + 0.5 * plain["kl"])
    cfg = turbovae.resolve("text", overrides=["train.kl_warmup_steps=100", "train.beta=2"])
    assert [kl_weight(cfg, s).item() for s in (0, 50, 100, 500)] == [0.0, 1.0, 2.0, 2.0]


# ---- end to end ----------------------------------------------------------------------------------------


def test_defaults_learn_to_reconstruct_and_keep_latents_active(run):
    out, summary = run
    assert summary["model"] == "sentence" and summary["tokenizer"] == "word"
    # four slots of 8 phrases each: only z can say which; a decoder that ignores z gets about 0.1-0.2
    assert summary["test_reconstruction_accuracy"] > 0.4
    assert summary["test_active_units"] >= 8 and summary["test_kl"] > 3.0
    assert summary["test_nelbo"] == pytest.approx(summary["test_rec"] + summary["test_kl"])
    assert summary["test_perplexity"] == pytest.approx(math.exp(summary["test_nll_iwae_per_token"]))
    assert summary["tokens_per_second"] > 0 and summary["test_bpd"] is None
    for name in ("samples.txt", "reconstructions.txt", "interpolations.txt"):
        assert (out / name).read_text().count("\n") > 10
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    assert train[0]["kl_weight"] < 0.5 and train[-1]["kl_weight"] == 1.0 and "tokens_per_second" in train[-1]


@pytest.mark.slow  # a second text run of the full length
def test_without_annealing_free_bits_and_word_dropout_the_posterior_collapses(grammar, run, tmp_path):
    summary = _fit(grammar, tmp_path / "collapsed", NO_ANNEALING)
    assert summary["test_kl"] < 0.1  # z carries (almost) nothing: a plain language model
    assert summary["test_active_units"] <= 1
    assert summary["test_reconstruction_accuracy"] < 0.3 < run[1]["test_reconstruction_accuracy"] - 0.15


def test_load_sample_encode_and_eval_a_text_run(run, grammar, tmp_path, capsys):
    out, _ = run
    vae = turbovae.load(out)
    tok = Tokenizer.from_meta(vae.data_meta)
    lines = [tok.decode(row) for row in vae.sample(8, generator=torch.Generator().manual_seed(0))]
    assert all(lines) and all(set(line.split()) <= set(tok.vocab) for line in lines)
    assert main(["sample", str(out), "--n", "5", "--seed", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 5 and all(printed)
    assert main(["sample", str(out), "--n", "3", "--draw", "--out", str(tmp_path / "s.txt")]) == 0
    assert (tmp_path / "s.txt").read_text().count("\n") == 3
    inputs = tmp_path / "in.txt"
    inputs.write_text("the cat sees the ball today\n\na zebra sees the moon at night\n")
    assert main(["encode", str(out), "--input", str(inputs), "--out", str(tmp_path / "z.npz")]) == 0
    z = np.load(tmp_path / "z.npz")
    assert z["mean"].shape == (3, vae.latent) and (z["stddev"] > 0).all()
    ids = torch.tensor(tok.encode_lines(["the cat sees the ball today"])[0])
    torch.testing.assert_close(torch.from_numpy(z["mean"][:1]), vae.encode(ids).mean)
    capsys.readouterr()
    assert main(["eval", str(out), "--iwae-k", "5", "--json", "--out", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] == pytest.approx(math.exp(result["nll_iwae_per_token"]))
    assert result["nelbo_per_token"] < result["nelbo"] and result["active_units"] >= 1


def test_resume_of_a_text_run_mid_epoch_is_exact(grammar, tmp_path):
    # 76 steps per epoch (the validation split held out): the checkpoint of step 100 is inside the
    # second epoch's bucketed order and inside the KL warm-up

    extra = ["train.epochs=2", "train.checkpoint_every=20", "train.keep_checkpoints=20", "eval.iwae_k=0",
             *WARMUP]  # fmt: skip
    cfg = turbovae.resolve("text", overrides=[f"data.name=text:{grammar}", *SMALL, *extra])
    whole = turbovae.fit(cfg, tmp_path / "whole", progress=False)
    shutil.copytree(tmp_path / "whole", tmp_path / "part")
    for path in (tmp_path / "part" / "checkpoints").iterdir():
        if not path.name.startswith("step-") or int(path.name.split("-")[1].split(".")[0]) > 100:
            path.unlink()
    resumed = turbovae.fit(cfg, tmp_path / "part", resume=True, progress=False)
    assert resumed["steps"] == whole["steps"] == 152
    a, b = turbovae.load(tmp_path / "whole").state_dict(), turbovae.load(tmp_path / "part").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_encode_images(tmp_path: Path):
    cfg = turbovae.resolve(
        "digits-mlp", overrides=["train.epochs=1", "eval.iwae_k=0", "eval.every_epoch=false"]
    )
    turbovae.fit(cfg, tmp_path / "digits", progress=False)
    x = turbovae.load_dataset("digits").x_test[:10].numpy()  # uint8 0..16, as stored
    np.save(tmp_path / "x.npy", x)
    assert main(["encode", str(tmp_path / "digits"), "--input", str(tmp_path / "x.npy")]) == 0
    z = np.load(tmp_path / "digits" / "encoded-x.npy")
    vae = turbovae.load(tmp_path / "digits")
    torch.testing.assert_close(torch.from_numpy(z), vae.encode(torch.from_numpy(x).float() / 16).mean)
    np.save(tmp_path / "bad.npy", np.zeros((3, 5, 5), dtype=np.uint8))
    assert main(["encode", str(tmp_path / "digits"), "--input", str(tmp_path / "bad.npy")]) == 2
