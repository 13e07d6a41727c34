"""Corpus sources, the token cache, the split and the step-indexed sampler.

Run: pytest tests/test_data.py
"""

import json
import string
from pathlib import Path

import numpy as np
import pytest

from pipeline import data as data_mod
from pipeline import store as store_mod
from pipeline.config import ConfigError, load_config
from pipeline.data import Sampler, prepare_dataset, read_documents, stdlib_files
from pipeline.store import split_documents
from pipeline.tokenizer import EOS

LETTERS = string.ascii_lowercase


def _config(tmp_path, source, *extra):
    return load_config(
        None,
        [
            f"data.source={source}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.seq_len=16",
            "model.max_seq_len=16",
            *extra,
        ],
    )


def _letter_docs(tmp_path, n=20, size=200):
    """n files, file i made only of letter i: every token says which document it came from."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(n):
        (folder / f"doc{i:02d}.txt").write_text(LETTERS[i] * size)
    return folder


def test_stdlib_default_corpus():
    files = stdlib_files()
    assert len(files) > 500
    assert all("site-packages" not in f.parts for f in files)
    assert any(f.name == "os.py" for f in files)


def test_sources_file_folder_glob_jsonl(tmp_path):
    folder = _letter_docs(tmp_path, n=3)
    (folder / ".hidden").write_text("skip me")
    assert len(read_documents(_config(tmp_path, folder).data)) == 3
    assert len(read_documents(_config(tmp_path, f"{folder}/*.txt").data)) == 3
    assert read_documents(_config(tmp_path, folder / "doc01.txt").data) == ["b" * 200]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert read_documents(_config(tmp_path, jsonl).data) == ["one", "two"]
    assert len(read_documents(_config(tmp_path, folder, "data.max_docs=2").data)) == 2


def test_source_errors(tmp_path):
    def error(source, *extra):
        with pytest.raises(ConfigError) as info:
            prepare_dataset(_config(tmp_path, source, *extra))
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "path not found" in error(tmp_path / "missing.txt")
    assert "no files match" in error(f"{tmp_path}/*.nothing")
    (tmp_path / "empty").mkdir()
    assert "empty" in error(tmp_path / "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text"}\n')
    assert error(bad).startswith(f"{bad}:2:") and "'text'" in error(bad)
    bad.write_text('{"text": "ok"}\nnot json\n')
    assert f"{bad}:2:" in error(bad)
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    assert "data.seq_len" in error(short)
    assert "model.vocab_size" in error(_letter_docs(tmp_path), "model.vocab_size=100")


def test_split_is_deterministic_and_disjoint():
    train, val = split_documents(100, 0.1, seed=3)
    train2, val2 = split_documents(100, 0.1, seed=3)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    assert len(val) == 10 and not set(train) & set(val) and len(train) + len(val) == 100
    assert len(split_documents(2, 0.01, 0)[1]) == 1  # at least one validation document


def test_token_cache_is_reused(tmp_path, monkeypatch):
    cfg = _config(tmp_path, _letter_docs(tmp_path))
    first = prepare_dataset(cfg)
    monkeypatch.setattr(store_mod, "write_shard", lambda *a: pytest.fail("cache not reused"))
    second = prepare_dataset(cfg)
    assert np.array_equal(first.train, second.train) and second.meta["cache"] == first.meta["cache"]
    summary = second.summary()
    assert summary["documents"] == 20 and summary["train_docs"] + summary["val_docs"] == 20
    assert summary["train_tokens"] == summary["train_docs"] * 201  # 200 bytes + EOS each


def test_no_window_crosses_the_split(tmp_path):
    cfg = _config(tmp_path, _letter_docs(tmp_path), "data.val_fraction=0.2")
    ds = prepare_dataset(cfg)
    eos = ds.tokenizer.eos_id
    train_letters = {int(t) for t in np.unique(ds.train)} - {eos}
    val_letters = {int(t) for t in np.unique(ds.val)} - {eos}
    assert len(val_letters) == 4 and not train_letters & val_letters
    for split, letters in ((ds.train, train_letters), (ds.val, val_letters)):
        sampler = Sampler(split, 16, global_batch=32, seed=1)
        for step in range(20):
            assert set(np.unique(sampler.batch(step))) - {eos} <= letters


def test_single_document_holds_out_its_tail(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("".join(LETTERS[i % 26] for i in range(1000)))
    ds = prepare_dataset(_config(tmp_path, path, "data.val_fraction=0.1"))
    assert ds.train.size == 900 and ds.val.size == 101


def test_sampler_is_a_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    a, b = Sampler(tokens, 16, 8, seed=0), Sampler(tokens, 16, 8, seed=0)
    assert np.array_equal(a.batch(5), b.batch(5))
    assert not np.array_equal(a.batch(5), a.batch(6))
    assert not np.array_equal(a.batch(5), Sampler(tokens, 16, 8, seed=1).batch(5))
    batch = a.batch(3)
    assert batch.shape == (1, 8, 17) and batch.dtype == np.int32
    # windows are contiguous: targets are the inputs shifted by one
    assert np.all(np.diff(batch, axis=-1) == 1)


def test_device_and_process_counts_cover_the_same_global_batch():
    tokens = np.random.default_rng(0).integers(0, 300, 50_000).astype(np.uint16)
    sampler = Sampler(tokens, 32, 8, seed=7)
    one = sampler.batch(11, num_devices=1)
    for devices in (2, 4):
        sharded = sampler.batch(11, num_devices=devices)
        assert sharded.shape == (devices, 8 // devices, 33)
        assert np.array_equal(sharded.reshape(8, 33), one.reshape(8, 33))
    shares = [sampler.batch(11, num_devices=4, process_index=p, process_count=2) for p in (0, 1)]
    assert shares[0].shape == (2, 2, 33)
    assert np.array_equal(np.concatenate(shares).reshape(8, 33), one.reshape(8, 33))
    with pytest.raises(ConfigError, match="train.batch_size"):
        sampler.batch(0, num_devices=3)


def test_eval_windows_are_sequential():
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = Sampler(tokens, 10, 4, seed=0, shuffle=False)
    assert list(sampler.starts(0)) == [0, 10, 20, 30] and list(sampler.starts(1)) == [
        40,
        50,
        60,
        70,
    ]


def test_jsonl_documents_keep_their_text(tmp_path):
    docs = [f"document {i}: " + "é" * i for i in range(10)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ds = prepare_dataset(_config(tmp_path, path, "data.seq_len=4"))
    stream = np.concatenate([ds.train, ds.val])
    text = ds.tokenizer.decode(stream, skip_special=False)
    assert sorted(text.split(EOS)[:-1]) == sorted(docs)


def test_bpe_is_trained_once_and_cached(tmp_path, monkeypatch):
    cfg = _config(tmp_path, _letter_docs(tmp_path), "tokenizer.kind=bpe", "model.vocab_size=300")
    first = prepare_dataset(cfg)
    assert not first.tokenizer.is_byte_level and first.tokenizer.vocab_size <= 300
    assert first.train.size < 16 * 201  # merges compress the runs of one letter
    monkeypatch.setattr(data_mod, "build_tokenizer", lambda *a: pytest.fail("retrained"))
    again = prepare_dataset(cfg)
    assert again.tokenizer.encode("aaaa") == first.tokenizer.encode("aaaa")


def test_document_segments_start_a_new_document_after_each_eos():
    from pipeline.data import document_segments

    eos = 9
    tokens = np.array([[1, 2, 9, 3, 9, 9, 4], [5, 6, 7, 8, 1, 2, 3]])
    assert document_segments(tokens, eos).tolist() == [
        [1, 1, 1, 2, 2, 3, 4],  # an EOS ends its document; the next token starts one
        [1, 1, 1, 1, 1, 1, 1],
    ]


def test_parquet_arrow_and_compressed_jsonl_sources_give_the_plain_files_documents(tmp_path):
    """The same documents from a plain .jsonl, .jsonl.gz, .jsonl.zst, a Parquet file, an Arrow
    file and a `datasets.save_to_disk` folder (read a record batch at a time)."""
    import gzip

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    zstd = pytest.importorskip("zstandard")
    from pipeline.config import DataConfig
    from pipeline.data import read_documents

    texts = [f"def f{i}():\n    return {i} * 'é'\n" for i in range(50)] + ["", "last"]
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
    (tmp_path / "c.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    (tmp_path / "c.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(lines.encode()))
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=7)
    with (
        pa.OSFile(str(tmp_path / "c.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as w,
    ):
        w.write_table(table, max_chunksize=9)
    saved = tmp_path / "saved"  # a `datasets.save_to_disk` folder: Arrow streams + json
    try:
        import datasets

        datasets.Dataset.from_dict({"id": list(range(len(texts))), "text": texts}).save_to_disk(
            str(saved)
        )
    except ImportError:  # its layout, written by hand
        saved.mkdir()
        stream = pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb")
        with stream as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table, max_chunksize=11)
        (saved / "dataset_info.json").write_text("{}")
        (saved / "state.json").write_text("{}")
    plain = read_documents(DataConfig(source=str(tmp_path / "c.jsonl")))
    assert plain == [t for t in texts if t]
    for name in ("c.jsonl.gz", "c.jsonl.zst", "c.parquet", "c.arrow", "saved"):
        assert read_documents(DataConfig(source=str(tmp_path / name))) == plain, name
    assert read_documents(DataConfig(source=str(tmp_path / "c.parquet"), max_docs=3)) == plain[:3]
    with pytest.raises(ConfigError, match="no column 'body'.*id, text"):
        read_documents(DataConfig(source=str(tmp_path / "c.parquet"), text_field="body"))


def _store_files(directory):
    return {
        name: (directory / name).read_bytes()
        for name in ("train.bin", "val.bin", "index.json", "tokenizer.json")
    }


def _varied_jsonl(tmp_path, n=300):
    rng = np.random.default_rng(0)
    path = tmp_path / "varied.jsonl"
    with path.open("w") as f:
        for i in range(n):
            words = rng.choice(
                ["def", "return", "self", "value", "import", "x"], rng.integers(5, 60)
            )
            f.write(json.dumps({"text": f"{i}: " + " ".join(words)}) + "\n")
    return path


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_a_store_built_by_two_workers_equals_one_built_by_one(tmp_path, tokenizer):
    source = _varied_jsonl(tmp_path)
    extra = [f"tokenizer.kind={tokenizer}", "model.vocab_size=400", "data.shard_mb=0.004"]
    one = prepare_dataset(_config(tmp_path / "a", source, *extra, "data.tokenize_workers=1"))
    two = prepare_dataset(_config(tmp_path / "b", source, *extra, "data.tokenize_workers=2"))
    assert one.meta["shards"] > 4 and two.meta["tokenize_workers"] == 2
    assert one.meta["tokenize_workers"] == 1
    assert _store_files(Path(one.meta["cache"])) == _store_files(Path(two.meta["cache"]))
    # every document once, in one split or the other, whole
    text = one.tokenizer.decode(np.concatenate([one.train, one.val]), skip_special=False)
    expected = [json.loads(line)["text"] for line in source.read_text().splitlines()]
    assert sorted(text.split(EOS)[:-1]) == sorted(expected)


def test_an_interrupted_store_build_resumes_to_the_same_store(tmp_path, monkeypatch):
    source = _varied_jsonl(tmp_path)
    extra = ["data.shard_mb=0.004", "data.tokenize_workers=1"]
    whole = prepare_dataset(_config(tmp_path / "whole", source, *extra))
    real, calls, cut = store_mod.write_shard, [], [True]

    def fails_on_the_fourth(*args):
        calls.append(args[2])
        if len(calls) == 4 and cut[0]:
            raise RuntimeError("interrupted")  # as a kill in the middle of the build
        real(*args)

    monkeypatch.setattr(store_mod, "write_shard", fails_on_the_fourth)
    cfg = _config(tmp_path / "cut", source, *extra)
    with pytest.raises(RuntimeError, match="interrupted"):
        prepare_dataset(cfg)
    cut[0] = False
    cache = tmp_path / "cut" / "cache"
    assert len(list((cache / "shards").glob("*.json"))) == 3 and not list(cache.glob("tokens-*"))
    calls.clear()
    resumed = prepare_dataset(cfg)
    assert len(calls) == whole.meta["shards"] - 3  # the finished shards are not redone
    assert _store_files(Path(resumed.meta["cache"])) == _store_files(Path(whole.meta["cache"]))
    assert Path(resumed.meta["cache"]).name == Path(whole.meta["cache"]).name


def test_pipeline_tokenize_reports_the_store_and_its_throughput(tmp_path):
    import subprocess
    import sys

    source = _varied_jsonl(tmp_path)
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "tokenize",
        f"data.source={source}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.shard_mb=0.004",
        "--json",
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    report = json.loads(out)
    assert report["documents"] == 300 and report["shards"] > 4
    assert report["mb_per_s_per_core"] > 0 and report["peak_rss_bytes"] > 0
    assert Path(report["cache"], "meta.json").is_file()


def test_a_two_source_mixture_keeps_its_weights_and_is_the_same_on_1_2_and_4_devices():
    from pipeline.data import MixtureSampler

    a = np.full(5_000, 1, np.uint16)  # every token names its source
    b = np.full(3_000, 2, np.uint16)
    samplers = [Sampler(a, 16, 8, seed=3), Sampler(b, 16, 8, seed=4)]
    mix = MixtureSampler(samplers, [0.7, 0.3], seed=1)
    rows = np.concatenate([mix.batch(step)[0][:, 0] for step in range(1_000)])
    assert abs(np.mean(rows == 1) - 0.7) < 0.02 and abs(np.mean(rows == 2) - 0.3) < 0.02
    for step in (0, 17, 999):
        whole = mix.batch(step).reshape(8, -1)
        for devices, processes in ((2, 1), (4, 1), (4, 2), (2, 2)):
            parts = [
                mix.batch(step, devices, p, processes).reshape(-1, 17) for p in range(processes)
            ]
            assert np.array_equal(np.concatenate(parts), whole)
    assert np.array_equal(mix.batch(5), MixtureSampler(samplers, [0.7, 0.3], seed=1).batch(5))
    assert not np.array_equal(mix.sources(5), MixtureSampler(samplers, [0.7, 0.3], 2).sources(5))


def test_a_mixture_prepares_a_store_and_a_validation_split_per_source(tmp_path):
    from pipeline.data import prepare_mixture

    folder = _letter_docs(tmp_path)
    jsonl = tmp_path / "z.jsonl"
    jsonl.write_text("".join(json.dumps({"body": "z" * 300}) + "\n" for _ in range(10)))
    mixture = (
        f"data.mixture=[{{source: {folder}, weight: 3}}, {{source: {jsonl}, text_field: body}}]"
    )
    parts = prepare_mixture(_config(tmp_path, "stdlib", mixture))
    assert [(p.name, p.weight) for p in parts] == [("corpus", 3.0), ("z", 1.0)]
    assert parts[0].dataset.tokenizer is parts[1].dataset.tokenizer
    z = parts[1].dataset
    assert set(np.unique(z.train)) == set(np.unique(z.val)) == {ord("z"), z.tokenizer.eos_id}
    assert parts[0].dataset.meta["cache"] != z.meta["cache"]
    assert z.meta["train_docs"] + z.meta["val_docs"] == 10 and z.meta["val_docs"] >= 1


def test_best_fit_packing_puts_whole_documents_in_rows(tmp_path):
    from pipeline.data import PackedSampler, best_fit, lm_batch

    rng = np.random.default_rng(0)
    eos, pad, width = 9, 0, 17
    docs = [rng.integers(10, 50, n) for n in rng.integers(1, 30, 200)]  # some longer than a row
    stream = np.concatenate([np.append(d, eos) for d in docs]).astype(np.uint16)
    sampler = PackedSampler(stream, eos, pad, width - 1, global_batch=len(docs), seed=0)
    pieces = []
    for row in sampler.table:
        assert sum(sampler.piece_len[p] for p in row) <= width
        pieces += row
    assert sorted(pieces) == list(range(len(sampler.piece_len)))  # every piece once
    assert sampler.fill() > 0.9
    whole = {tuple(np.append(d, eos)) for d in docs if len(d) + 1 <= width}
    batch = sampler.rows(3, np.arange(len(docs)))
    seen = set()
    for tokens, segments in zip(batch["tokens"], batch["segments"], strict=True):
        for s in range(1, segments.max() + 1):
            seen.add(tuple(tokens[segments == s]))
        assert (tokens[segments == 0] == pad).all()
    assert seen and seen <= whole | {tuple(p) for p in _pieces(docs, eos, width)}
    assert np.array_equal(sampler.rows(3, np.arange(4))["tokens"], batch["tokens"][:4])
    lm = lm_batch(sampler, 3)
    assert np.array_equal(lm["mask"], (lm["segments"][:, 1:] > 0).astype(np.float32))
    # best-fit decreasing needs no more rows than the optimum's 11/9 bound + 1 here
    lengths = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    assert len(best_fit(lengths, 11)) == 5


def _pieces(docs, eos, width):
    for d in docs:
        full = np.append(d, eos)
        for start in range(0, len(full), width):
            yield full[start : start + width]


def test_a_token_store_is_a_source_with_its_own_tokenizer(tmp_path):
    source = _varied_jsonl(tmp_path)
    extra = ["tokenizer.kind=bpe", "model.vocab_size=400"]
    built = prepare_dataset(_config(tmp_path, source, *extra))
    store = built.meta["cache"]
    again = prepare_dataset(_config(tmp_path / "elsewhere", store, "model.vocab_size=400"))
    assert np.array_equal(again.train, built.train) and np.array_equal(again.val, built.val)
    assert again.tokenizer.fingerprint() == built.tokenizer.fingerprint()  # the store's BPE
    assert not (tmp_path / "elsewhere" / "cache").exists()  # nothing tokenized again
    with pytest.raises(ConfigError, match="another tokenizer"):
        from pipeline.tokenizer import byte_tokenizer

        prepare_dataset(_config(tmp_path, store, "model.vocab_size=400"), byte_tokenizer())


def test_a_tokenize_killed_with_sigkill_resumes_to_the_same_store(tmp_path):
    """`pipeline tokenize` killed -9 in the middle: the same command finishes the store with
    the shards already written, and the store equals one built without the kill."""
    import signal
    import subprocess
    import sys
    import time

    source = _varied_jsonl(tmp_path, n=3000)

    def command(cache):
        return [
            sys.executable, "-m", "pipeline", "tokenize", f"data.source={source}",
            f"data.cache_dir={cache}", "data.shard_mb=0.001", "data.tokenize_workers=1",
        ]  # fmt: skip

    proc = subprocess.Popen(command(tmp_path / "cut"), stdout=subprocess.PIPE)
    shards = tmp_path / "cut" / "shards"
    deadline = time.time() + 60
    while len(list(shards.glob("*.json"))) < 20 and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done_before = len(list(shards.glob("*.json")))
    assert not list((tmp_path / "cut").glob("tokens-*")), "finished before the kill"
    subprocess.run(command(tmp_path / "cut"), check=True, capture_output=True)
    subprocess.run(command(tmp_path / "whole"), check=True, capture_output=True)
    cut, whole = (next((tmp_path / d).glob("tokens-*")) for d in ("cut", "whole"))
    assert cut.name == whole.name and _store_files(cut) == _store_files(whole)
    assert 20 <= done_before < json.loads((whole / "meta.json").read_text())["shards"]
