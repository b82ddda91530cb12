"""Corpus preparation, its cache, the batch sampler and every bad input."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import GPT2_TIKTOKEN, in_process

from minigpt2 import MiniGPT2Error
from minigpt2.data.batches import Batches, load_prepared, open_corpus
from minigpt2.data.corpus import prepare
from minigpt2.data.tokenizer import get_tokenizer

BYTE = get_tokenizer("byte")


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_prepare_file_counts_and_split(tmp_path):
    src = write(tmp_path / "a.txt", "hello world\n" * 100)  # 1200 bytes, one document
    out = prepare(str(src), BYTE, cache_dir=tmp_path / "cache", progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["total_tokens"] == 1201 and meta["documents"] == 1
    assert meta["val_tokens"] == 120 and meta["train_tokens"] == 1081
    data = load_prepared(out, BYTE)
    assert bytes(data.train.window(0, 12).tolist()) == b"hello world\n"
    assert data.val.window(len(data.val) - 1, 1).tolist() == [256]  # ends with end-of-text
    assert data.train.window(0, 1).dtype == np.uint16


def test_directory_documents_are_separated_by_eot(tmp_path):
    write(tmp_path / "docs" / "b.txt", "beta")
    write(tmp_path / "docs" / "a.txt", "alpha")
    write(tmp_path / "docs" / ".hidden", "never")
    out = prepare(
        str(tmp_path / "docs"), BYTE, cache_dir=tmp_path / "c", val_fraction=0.2, progress=False
    )
    data = load_prepared(out)
    tokens = np.concatenate(
        [data.train.window(0, len(data.train)), data.val.window(0, len(data.val))]
    )
    assert tokens.tolist() == list(b"alpha") + [256] + list(b"beta") + [256]


@pytest.mark.skipif(not GPT2_TIKTOKEN.is_file(), reason=f"no GPT-2 BPE at {GPT2_TIKTOKEN}")
def test_gpt2_preparation_equals_plain_encoding_across_chunks(tmp_path, monkeypatch):
    import minigpt2.data.sources as data_mod

    monkeypatch.setattr(data_mod, "CHUNK_CHARS", 100)  # force many chunk boundaries
    text = "".join(
        f"Line {i}: the  quick brown fox\n\n  indented {i}\n    'continued {i}  '\n  ()"
        for i in range(200)
    )
    src = write(tmp_path / "t.txt", text)
    tok = get_tokenizer(str(GPT2_TIKTOKEN))
    data = load_prepared(prepare(str(src), tok, cache_dir=tmp_path / "c", progress=False), tok)
    got = np.concatenate([data.train.window(0, len(data.train)), data.val.window(0, len(data.val))])
    assert got.tolist() == tok.encode(text) + [50256]


def test_shards_and_window_across_boundary(tmp_path):
    src = write(tmp_path / "a.txt", "".join(chr(97 + i % 26) for i in range(1000)))
    out = prepare(str(src), BYTE, cache_dir=tmp_path / "c", shard_tokens=64, progress=False)
    data = load_prepared(out)
    assert len(data.train.shards) == 16
    assert bytes(data.train.window(60, 8).tolist()) == src.read_bytes()[60:68]


def test_cache_reused_and_invalidated(tmp_path):
    src = write(tmp_path / "a.txt", "first version " * 50)
    cache = tmp_path / "c"
    a = prepare(str(src), BYTE, cache_dir=cache, progress=False)
    mtime = (a / "meta.json").stat().st_mtime_ns
    assert prepare(str(src), BYTE, cache_dir=cache, progress=False) == a
    assert (a / "meta.json").stat().st_mtime_ns == mtime  # not rewritten
    write(src, "second version " * 50)
    b = prepare(str(src), BYTE, cache_dir=cache, progress=False)
    assert b != a and not a.exists()  # the superseded preparation is removed
    c = prepare(str(src), BYTE, cache_dir=cache, val_fraction=0.2, progress=False)
    assert c == b  # one preparation serves every val_fraction: the split is made on reading
    assert len(open_corpus(str(src), BYTE, cache_dir=cache, val_fraction=0.2).val) == 150
    assert len(open_corpus(str(src), BYTE, cache_dir=cache, val_fraction=0.1).val) == 75
    if GPT2_TIKTOKEN.is_file():
        tok = get_tokenizer(str(GPT2_TIKTOKEN))
        assert prepare(str(src), tok, cache_dir=cache, progress=False) not in (a, b, c)


def test_same_size_edit_with_the_mtime_kept_is_prepared_again(tmp_path):
    src = write(tmp_path / "a.txt", "abcdefgh " * 100)
    cache = tmp_path / "c"
    a = prepare(str(src), BYTE, cache_dir=cache, progress=False)
    stat = src.stat()
    write(src, "abcdefgX " * 100)  # same size
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime
    b = prepare(str(src), BYTE, cache_dir=cache, progress=False)
    assert b != a and bytes(load_prepared(b, BYTE).train.window(0, 9).tolist()) == b"abcdefgX "


def test_damaged_cache_is_prepared_again(tmp_path):
    src = write(tmp_path / "a.txt", "some text " * 1000)
    cache = tmp_path / "c"
    out = prepare(str(src), BYTE, cache_dir=cache, progress=False)
    shard = out / "shard-00000.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:100])  # truncated on disk
    assert prepare(str(src), BYTE, cache_dir=cache, progress=False) == out
    assert shard.read_bytes() == good
    (out / "meta.json").unlink()  # meta.json lost
    assert prepare(str(src), BYTE, cache_dir=cache, progress=False) == out
    assert load_prepared(out, BYTE).meta["total_tokens"] == 10001


def test_two_writers_sharing_a_cache_both_finish(tmp_path):
    """Two preparations of one corpus at once in one process (the same PID, as in two
    containers): each writes its own partial folder; one finished cache results."""
    from concurrent.futures import ThreadPoolExecutor

    src = write(tmp_path / "a.txt", "shared text " * 20000)
    cache = tmp_path / "c"
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(prepare, str(src), BYTE, cache_dir=cache, progress=False)]
        runs.append(pool.submit(prepare, str(src), BYTE, cache_dir=cache, progress=False))
        outs = [r.result() for r in runs]
    assert outs[0] == outs[1] and load_prepared(outs[0], BYTE).meta["total_tokens"] == 240001
    assert [p.name for p in cache.iterdir()] == [outs[0].name]


def test_unwritable_cache_is_one_line_and_leaves_nothing(tmp_path):
    src = write(tmp_path / "a.txt", "text " * 100)
    blocker = write(tmp_path / "file", "not a directory")
    with pytest.raises(MiniGPT2Error, match=r"cannot write the data cache at .*file/cache"):
        prepare(str(src), BYTE, cache_dir=blocker / "cache", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "file"]


def test_killed_preparation_is_never_taken_as_finished(tmp_path):
    src = write(tmp_path / "a.txt", "some text " * 1000)
    cache = tmp_path / "c"
    out = prepare(str(src), BYTE, cache_dir=cache, progress=False)
    # simulate a writer killed midway: the partial directory exists, meta.json does not, and
    # nobody has touched it for longer than STALE_SECONDS
    partial = out.with_name(out.name + ".partial-otherhost-0a1b2c")
    os.rename(out, partial)
    os.utime(partial, (1, 1))
    again = prepare(str(src), BYTE, cache_dir=cache, progress=False)
    assert again == out and (out / "meta.json").is_file()
    assert not list(cache.glob("*.partial-*"))  # the dead writer's leftovers are cleaned up


def test_failed_preparation_leaves_nothing(tmp_path):
    write(tmp_path / "d" / "a.txt", "good text")
    (tmp_path / "d" / "b.bin").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(MiniGPT2Error, match=r"b.bin: not valid UTF-8 \(byte 0\).*replace"):
        prepare(str(tmp_path / "d"), BYTE, cache_dir=tmp_path / "c", progress=False)
    assert not list((tmp_path / "c").iterdir())
    out = prepare(
        str(tmp_path / "d"), BYTE, cache_dir=tmp_path / "c", decode_errors="replace", progress=False
    )
    assert load_prepared(out).meta["documents"] == 2


def test_sampler_is_deterministic_and_rank_slices_form_the_global_batch(tmp_path):
    src = write(tmp_path / "a.txt", "".join(chr(32 + i % 90) for i in range(5000)))
    data = load_prepared(prepare(str(src), BYTE, cache_dir=tmp_path / "c", progress=False))
    a, b = Batches(data.train, 16, seed=7), Batches(data.train, 16, seed=7)
    first, second = a.get(step=3, global_count=8), b.get(step=3, global_count=8)
    (x1, y1), (x2, y2) = (first.x, first.y), (second.x, second.y)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1]) and x1.shape == (8, 16)
    assert not torch.equal(x1, a.get(step=4, global_count=8).x)
    assert not torch.equal(x1, Batches(data.train, 16, seed=8).get(3, 8).x)
    halves = [a.get(3, 8, start=s, count=4).x for s in (0, 4)]  # two ranks
    assert torch.equal(torch.cat(halves), x1)


def test_open_corpus_accepts_a_prepared_directory(tmp_path):
    src = write(tmp_path / "a.txt", "x" * 500)
    out = prepare(str(src), BYTE, cache_dir=tmp_path / "c", progress=False)
    assert open_corpus(str(out), BYTE).directory == out


@pytest.mark.parametrize(
    "spec, message",
    [
        ("missing.txt", "data source 'missing.txt' not found"),
        ("nomatch/*.txt", "no files match"),
        ("hf:", "needs a dataset name"),
    ],
)
def test_bad_sources(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)  # and back: later tests start processes from the cwd
    with pytest.raises(MiniGPT2Error, match=message):
        prepare(spec, BYTE, cache_dir=tmp_path / "c", progress=False)


def test_empty_corpus_and_too_short_corpus(tmp_path):
    write(tmp_path / "empty.txt", "")
    with pytest.raises(MiniGPT2Error, match="is empty"):
        prepare(str(tmp_path / "empty.txt"), BYTE, cache_dir=tmp_path / "c", progress=False)
    assert not list((tmp_path / "c").iterdir())
    write(tmp_path / "short.txt", "tiny corpus" * 3)
    data = load_prepared(
        prepare(str(tmp_path / "short.txt"), BYTE, cache_dir=tmp_path / "c", progress=False)
    )
    with pytest.raises(MiniGPT2Error, match="validation split holds 3 tokens, fewer than"):
        Batches(data.val, 64, seed=0, name="validation")


@pytest.mark.skipif(not GPT2_TIKTOKEN.is_file(), reason=f"no GPT-2 BPE at {GPT2_TIKTOKEN}")
def test_shards_of_another_tokenizer_are_refused(tmp_path):
    out = prepare(
        str(write(tmp_path / "a.txt", "text " * 100)),
        BYTE,
        cache_dir=tmp_path / "c",
        progress=False,
    )
    with pytest.raises(MiniGPT2Error, match="tokenised with 'byte' but the run asks for 'gpt2'"):
        load_prepared(out, get_tokenizer(str(GPT2_TIKTOKEN)))


def test_truncated_shard_is_refused(tmp_path):
    out = prepare(
        str(write(tmp_path / "a.txt", "text " * 100)),
        BYTE,
        cache_dir=tmp_path / "c",
        progress=False,
    )
    shard = out / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(MiniGPT2Error, match="missing or truncated"):
        load_prepared(out)


def test_bad_val_fraction(tmp_path):
    with pytest.raises(MiniGPT2Error, match="val_fraction=1.5"):
        prepare(str(write(tmp_path / "a.txt", "x")), BYTE, val_fraction=1.5, progress=False)


def test_hf_dataset_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(MiniGPT2Error, match="cannot read dataset 'hf:no-such/dataset'"):
        prepare("hf:no-such/dataset", BYTE, cache_dir=tmp_path / "c", progress=False)
    assert not list((tmp_path / "c").iterdir())


def test_hf_dataset_without_the_hub_fails_at_once(tmp_path, monkeypatch):
    """No offline variables and a Hub that cannot be reached (a closed local port): one line
    within seconds, for a corpus and for records, not datasets' half minute of retries."""
    import socket
    import time

    from minigpt2.data.records import read_hf_records

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the socket is: connections are refused
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(MiniGPT2Error, match=r"cannot reach the Hugging Face Hub \(127.0.0.1:"):
        prepare("hf:no-such/dataset", BYTE, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(MiniGPT2Error, match="offline, pass a local .json or .jsonl record file"):
        read_hf_records("hf:no-such/dataset", "train")
    assert time.perf_counter() - start < 5
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


def run_data_cli(*args, cwd):
    return in_process(
        ["-m", "minigpt2", *args], cwd, env={"MINIGPT2_DATA_CACHE": str(cwd / "cache")}
    )


def test_cli_prepare_and_errors(tmp_path):
    write(tmp_path / "a.txt", "hello " * 200)
    ok = run_data_cli("prepare", "a.txt", "--tokenizer", "byte", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "1,081 train and 120 validation tokens" in ok.stdout
    bad = run_data_cli("prepare", "nope.txt", "--tokenizer", "byte", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: data source 'nope.txt' not found; pass a "
        "text file, a directory, a glob, stdlib or "
        "hf:NAME[:CONFIG]"
    ]
    bad = run_data_cli("prepare", "a.txt", "--tokenizer", "wordpiece", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown tokenizer 'wordpiece'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_stdlib_source_resolves():
    from minigpt2.data.sources import resolve_source

    src = resolve_source("stdlib")
    assert len(src.files) > 300 and all(f.suffix == ".py" for f in src.files)
    assert not [f for f in src.files if "site-packages" in f.parts]


def test_hf_dataset_source_streams_a_local_dataset(tmp_path, hf_folder):
    folder = hf_folder
    rows = [{"content": f"document {i}", "id": i} for i in range(5)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = f"hf:{folder}"
    with pytest.raises(MiniGPT2Error, match="no text column 'text'; pass --text-column"):
        prepare(spec, BYTE, cache_dir=tmp_path / "c", progress=False)
    out = prepare(spec, BYTE, cache_dir=tmp_path / "c", text_column="content", progress=False)
    data = load_prepared(out, BYTE)
    tokens = np.concatenate(
        [data.train.window(0, len(data.train)), data.val.window(0, len(data.val))]
    )
    expected = []
    for r in rows:
        expected += list(r["content"].encode()) + [256]
    assert tokens.tolist() == expected and data.meta["documents"] == 5


@pytest.mark.skipif(not GPT2_TIKTOKEN.is_file(), reason=f"no GPT-2 BPE file at {GPT2_TIKTOKEN}")
def test_long_texts_are_cut_where_tokens_do_not_change(tmp_path, hf_folder):
    """A 600k-character hf: row and 1M characters without whitespace are cut into pieces, and
    their tokens equal the whole text's."""
    tok = get_tokenizer(str(GPT2_TIKTOKEN))
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ'0123456789"))
    words = ["".join(rng.choice(letters, rng.integers(1, 12))) for _ in range(20000)]
    spaces = rng.choice([" ", " ", " ", "  ", "\n", "\n\n", " \n"], len(words))
    row = "".join(w + s for w, s in zip(words, spaces, strict=True))
    row = (row * (600_000 // len(row) + 1))[:600_000]
    folder = hf_folder
    (folder / "train.jsonl").write_text(json.dumps({"text": row}) + "\n")
    glued = "".join(rng.choice(list("abcXYZ.,;:!?-'0123"), 1_000_000))  # no whitespace at all
    for spec, text in ((f"hf:{folder}", row), (str(write(tmp_path / "g.txt", glued)), glued)):
        data = load_prepared(prepare(spec, tok, cache_dir=tmp_path / "c", progress=False), tok)
        tokens = np.concatenate([r.window(0, len(r)) for r in (data.train, data.val)])
        assert tokens.tolist() == tok.encode(text) + [tok.eot_id], spec
