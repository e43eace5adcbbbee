"""Shard tool, production grade: workers + time budget, accounting, dedup, normalisation options,
shuffle, verify/inspect, --part + merge, the k8s Indexed Job, the CLI. Real images, real processes."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

from deadlock import descendants
from helpers import REPO, shards_cli as cli
from mocostream.shards import REASONS, ShardError, create_shards, inspect, merge, verify
from mocostream.shards.verify import tar_samples


def make(sources, out, **kw):
    kw.setdefault("progress", False)
    return create_shards([str(s) for s in sources], str(out), **kw)


def manifest(out) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())


def samples(out) -> list[tuple[str, dict]]:
    """(key, {ext: bytes, "meta": dict}) of every sample of a tar set, in order."""
    res = []
    for e in manifest(out)["shards"]:
        for key, parts in tar_samples((Path(out) / e["name"]).read_bytes()):
            parts["meta"] = json.loads(parts.pop("json"))
            res.append((key, parts))
    return res


def image_of(parts) -> Image.Image:
    ext = parts["meta"]["format"]
    return Image.open(io.BytesIO(parts[ext]))


@pytest.fixture(scope="module")
def small(imagenette_small, tmp_path_factory) -> Path:
    """30 imagenette photos, 3 per class (a fast input for option tests)."""
    root = tmp_path_factory.mktemp("small")
    for cls in sorted(os.listdir(imagenette_small)):
        for name in sorted(os.listdir(imagenette_small / cls))[:3]:
            (root / cls).mkdir(exist_ok=True)
            shutil.copy(imagenette_small / cls / name, root / cls / name)
    return root


# ---------------------------------------------------------------- 1. workers, time budget

@pytest.fixture(scope="module")
def slow_png(tmp_path_factory) -> Path:
    """A real, valid PNG that takes about a second to decode (81 Mpx: under the pixel budget)."""
    d = tmp_path_factory.mktemp("slow")
    Image.new("RGB", (9000, 9000)).save(d / "huge.png", compress_level=1)
    return d


@pytest.fixture
def hanging_input(tmp_path) -> Path:
    """A URL list whose one input is a FIFO nobody writes to: a worker reading it blocks until it is killed,
    however fast or loaded the machine is (a slow decode would race the time budget)."""
    fifo = tmp_path / "hang.fifo"
    os.mkfifo(fifo)
    table = tmp_path / "hang.txt"
    table.write_text(f"{fifo}\n")
    return table


@pytest.mark.slow
def test_timeout_kills_and_replaces_the_worker(small, hanging_input, tmp_path):
    # The hanging input first: the inputs queued behind it on its worker must be decoded elsewhere, in order.
    # 5 s is only the budget the hung input must exceed; every real input here decodes in milliseconds.
    r = make([hanging_input, small], tmp_path / "out", workers=2, timeout=5, samples_per_shard=10)
    assert r.inputs == 31 and r.written == 30
    assert [(os.path.basename(s), why) for s, why, _ in r.rejected] == [("hang.fifo", "timeout")]
    assert r.report["replaced_workers"] == 1
    make([small], tmp_path / "ref", workers=0, samples_per_shard=10)
    got = [(k, s["jpg"]) for k, s in samples(tmp_path / "out")]
    assert got == [(k, s["jpg"]) for k, s in samples(tmp_path / "ref")]


def _holders(path: Path, pids) -> list[int]:
    """The processes among `pids` with `path` open."""
    out = []
    for pid in pids:
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd")):
                out.append(pid)
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_worker_killed_mid_decode_costs_one_input(small, hanging_input, tmp_path):
    import errno
    import signal
    import threading
    fifo = hanging_input.parent / "hang.fifo"
    box = {}
    t = threading.Thread(target=lambda: box.setdefault(
        "r", make([hanging_input, small], tmp_path / "o", workers=1, timeout=600)))
    t.start()
    writer = None
    try:
        # Events, not clocks: our end of the FIFO opens once a worker opens it to read; that worker then holds it.
        while writer is None:
            assert t.is_alive(), f"the run ended before its worker read the FIFO: {box}"
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
                t.join(0.02)
        victim = []
        while not victim:
            assert t.is_alive(), f"the run ended while its worker held the FIFO: {box}"
            victim = _holders(fifo, descendants(os.getpid()))
            t.join(0.02)
        assert len(victim) == 1, victim
        os.kill(victim[0], signal.SIGKILL)
        while _alive(victim[0]) and t.is_alive():  # dead before our end closes (an EOF: an empty input)
            t.join(0.02)
    finally:
        if writer is not None:
            os.close(writer)
    t.join(300)
    assert not t.is_alive(), "the run did not finish after its worker was killed"
    r = box["r"]
    assert [(os.path.basename(s), why) for s, why, _ in r.rejected] == [("hang.fifo", "crashed")]
    assert "signal 9" in r.rejected[0][2] and r.written == 30 and r.report["replaced_workers"] == 1


def test_pixel_budget_rejects_before_decoding(slow_png, tmp_path):
    r = make([slow_png], tmp_path / "o", max_pixels=10_000_000, workers=1)
    assert r.rejected[0][1] == "decompression_bomb" and "exceeds 10000000 pixels" in r.rejected[0][2]


def test_memory_cap_rejects_instead_of_exhausting_memory(slow_png, small, tmp_path):
    # 81 Mpx needs ~250 MB to decode: with 100 MB allowed the worker gets a MemoryError, not the OOM killer
    r = make([slow_png, small], tmp_path / "o", memory_limit=100 << 20, workers=1)
    assert r.rejected[0][1] == "decompression_bomb" and r.written == 30
    assert r.report["replaced_workers"] == 0


def test_worker_count_does_not_change_the_bytes(small, tmp_path):
    a = make([small], tmp_path / "a", workers=0, samples_per_shard=8)
    b = make([small], tmp_path / "b", workers=2, samples_per_shard=8)
    assert [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]


# ---------------------------------------------------------------- 2. accounting

@pytest.mark.slow
def test_messy_accounting_stats_report_rejects(messy_images, tmp_path):
    out = tmp_path / "o"
    p = cli("create", messy_images, "--out", out, "--workers", "2", "--samples-per-shard", "100", "--json")
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and p.stderr == ""  # --json: one line, no progress bar
    report = json.loads(lines[0])
    n_inputs = sum(len(fs) for _, _, fs in os.walk(messy_images))
    m = manifest(out)
    assert report["inputs"] == m["inputs"] == n_inputs
    assert report["written"] + report["rejected"] == n_inputs
    assert report == json.loads((out / "report.json").read_text())
    assert report["bytes_in"] > report["bytes_out"] > 0 and report["images_per_second"] > 0
    assert set(report["rejected_by_reason"]) <= set(REASONS)
    assert {"duplicate", "truncated", "decompression_bomb", "not_an_image", "too_small"} <= set(report["rejected_by_reason"])
    # per-shard stats: contiguous input ranges that account for every input exactly once
    pos, written, rejects = 0, [], []
    for e in m["shards"]:
        st = json.loads((out / e["stats"]).read_text())
        assert st["inputs"][0] == pos and st["shard"] == e
        assert len(st["written"]) == e["samples"] == st["inputs"][1] - pos - len(st["rejects"])
        pos = st["inputs"][1]
        written += [w[0] for w in st["written"]]
        rejects += st["rejects"]
    rj = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r[:3] for r in rejects] == [[r["source"], r["reason"], r["detail"]] for r in rj][:len(rejects)]
    assert len(rj) == m["rejected"] and Counter(r["reason"] for r in rj) == m["rejected_by_reason"]
    assert written == [k for k, _ in samples(out)]
    sources = sorted([s["meta"]["source"] for _, s in samples(out)] + [r["source"] for r in rj])
    assert sources == sorted(os.path.join(d, f) for d, _, fs in os.walk(messy_images) for f in fs)
    dup = next(r for r in rj if r["reason"] == "duplicate")
    assert dup["detail"].startswith("duplicate of ") and dup["detail"].split()[-1] in written


@pytest.mark.slow
def test_messy_cmyk_16bit_exif_become_upright_rgb(messy_images, tmp_path):
    out = tmp_path / "o"
    make([messy_images / "pillow", messy_images / "exif-orientation"], out, workers=2, dedup="none")
    by_src = {os.path.relpath(s["meta"]["source"], messy_images): s for _, s in samples(out)}
    cmyk = [k for k in by_src if "cmyk" in k.lower()]
    sixteen = [k for k in by_src if "16bit" in k.lower() or "16_bit" in k.lower()]
    assert len(cmyk) >= 3 and len(sixteen) >= 3
    for k in cmyk + sixteen:
        im = image_of(by_src[k])
        assert im.mode == "RGB" and by_src[k]["meta"]["format"] == "jpg", k
    # 16-bit greyscale is scaled to 8 bits (value >> 8), not clipped to white
    import numpy as np
    src = np.asarray(Image.open(messy_images / "pillow/16bit.cropped.tif"), dtype=np.float32)
    got = np.asarray(image_of(by_src["pillow/16bit.cropped.tif"]).convert("L"), dtype=np.float32)
    assert src.max() > 255 and abs(got.mean() - (src / 256).mean()) < 2
    for o in range(1, 9):  # all orientations end upright: same size as orientation 1
        assert image_of(by_src[f"exif-orientation/Landscape_{o}.jpg"]).size == (1800, 1200)


# ---------------------------------------------------------------- 4. dedup

@pytest.fixture(scope="module")
def planted(small, tmp_path_factory) -> tuple[Path, dict]:
    """small + planted copies: byte copies, a lossless PNG copy, and resized re-encoded copies."""
    root = tmp_path_factory.mktemp("planted")
    shutil.copytree(small, root / "orig")
    files = sorted((root / "orig").rglob("*.JPEG"))
    (root / "zcopies").mkdir()
    expect = {}
    for i, f in enumerate(files[:3]):
        shutil.copy(f, root / "zcopies" / f"byte{i}.jpg")
        expect[f"zcopies_byte{i}"] = ("exact", f)
    Image.open(files[3]).save(root / "zcopies" / "lossless.png")
    expect["zcopies_lossless"] = ("exact", files[3])
    for i, f in enumerate(files[4:7]):
        im = Image.open(f)
        im.resize((im.width * 2 // 3, im.height * 2 // 3), Image.Resampling.BICUBIC).save(
            root / "zcopies" / f"resized{i}.jpg", quality=80)
        expect[f"zcopies_resized{i}"] = ("perceptual", f)
    return root, expect


@pytest.mark.parametrize("mode", ["exact", "perceptual", "none"])
def test_dedup_catches_planted_duplicates(planted, tmp_path, mode):
    root, expect = planted
    r = make([root], tmp_path / "o", dedup=mode, workers=2)
    dups = {os.path.relpath(s, root): d for s, why, d in r.rejected if why == "duplicate"}
    wanted = {k: f for k, (kind, f) in expect.items() if mode == "perceptual" or (mode == "exact" and kind == "exact")}
    assert len(dups) == len(wanted) and r.inputs == 30 + len(expect)
    for key, f in wanted.items():
        rel = next(p for p in dups if p.startswith("zcopies/" + key.split("_", 1)[1]))
        kept_key = "orig_" + f.parent.name + "_" + f.stem
        assert dups[rel] == f"duplicate of {kept_key}"
    assert r.written == r.inputs - len(wanted)


def test_perceptual_dedup_no_false_positives_on_distinct_photos(imagenette_small, tmp_path):
    r = make([imagenette_small], tmp_path / "o", dedup="perceptual", workers=2, samples_per_shard=200)
    assert r.written == 120, r.rejected


# ---------------------------------------------------------------- 5. options

@pytest.mark.slow
def test_max_size_min_size_quality_reencode(small, messy_images, tmp_path):
    r = make([small], tmp_path / "a", max_size=128, quality=80, workers=2)
    assert r.written == 30
    for _, s in samples(tmp_path / "a"):
        im = image_of(s)
        assert im.format == "JPEG" and max(im.size) == 128 and im.size == (s["meta"]["width"], s["meta"]["height"])
    r = make([small], tmp_path / "b", min_size=1000, workers=0)
    assert r.written == 0 and {why for _, why, _ in r.rejected} == {"too_small"}
    hi = make([small], tmp_path / "c", reencode="always", quality=95, workers=2)
    lo = make([small], tmp_path / "d", reencode="always", quality=50, workers=2)
    assert lo.report["bytes_out"] < 0.7 * hi.report["bytes_out"]
    originals = {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(small) for f in fs}
    for _, s in samples(tmp_path / "c"):
        assert s["jpg"] != originals[s["meta"]["source"]]
    # never: original bytes or a reject, never a re-encoded image
    r = make([messy_images / "pillow"], tmp_path / "e", reencode="never", dedup="none", workers=2)
    assert "needs_reencode" in r.rejected_by_reason()
    for _, s in samples(tmp_path / "e"):
        assert s[s["meta"]["format"]] == open(s["meta"]["source"], "rb").read()
    with pytest.raises(ShardError, match="--max-size needs re-encoding"):
        make([small], tmp_path / "f", reencode="never", max_size=100)


def test_max_shard_bytes(small, tmp_path):
    r = make([small], tmp_path / "o", max_shard_bytes=100_000, workers=0)
    assert len(r.shards) > 2 and sum(s["samples"] for s in r.shards) == 30
    assert all(s["bytes"] <= 100_000 for s in r.shards)


@pytest.mark.slow
def test_shuffle_mixes_sources_deterministically(imagenette_small, tmp_path):
    a = make([imagenette_small], tmp_path / "a", shuffle=True, seed=1, samples_per_shard=20, workers=2)
    b = make([imagenette_small], tmp_path / "b", shuffle=True, seed=1, samples_per_shard=20, workers=0)
    c = make([imagenette_small], tmp_path / "c", shuffle=True, seed=2, samples_per_shard=20, workers=2)
    assert [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]
    assert [s["sha256"] for s in a.shards] != [s["sha256"] for s in c.shards]
    labels = Counter(s["meta"]["label"] for _, s in samples(tmp_path / "a")[:20])
    assert len(labels) >= 7  # without --shuffle the first shard holds 2 classes
    assert sorted(k for k, _ in samples(tmp_path / "a")) == sorted(k for k, _ in samples(tmp_path / "c"))


# ---------------------------------------------------------------- 7. verify / inspect

@pytest.mark.slow
def test_verify_catches_corruption_and_inspect_summarises(small, tmp_path):
    out = tmp_path / "o"
    make([small], out, samples_per_shard=10, workers=0)
    assert verify(str(out)) == []
    assert cli("verify", out).returncode == 0
    info = inspect(str(out))
    assert info["samples"] == 30 and info["shards"] == 3 and info["formats"] == {"jpg": 30}
    assert info["width"]["max"] >= info["width"]["min"] > 0 and info["labels"] == 10
    text = cli("inspect", out).stdout
    assert "30 in 3 shards" in text and "jpg 30" in text
    # flip bytes inside an image of shard 1: same size, wrong sha256, and that sample no longer decodes
    m = manifest(out)
    path = out / m["shards"][1]["name"]
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tf:
        first = next(iter(tf))
    for i in range(first.offset_data + 200, first.offset_data + first.size - 200):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    problems = verify(str(out))
    assert any("sha256" in p and m["shards"][1]["name"] in p for p in problems)
    assert any("does not decode" in p for p in problems)
    p = cli("verify", out, check=False)
    assert p.returncode == 1 and "problem(s)" in p.stdout
    (out / m["shards"][2]["name"]).unlink()
    assert any(p.endswith("missing") for p in verify(str(out), decode=False))
    p = cli("verify", tmp_path / "nothing", check=False)
    assert p.returncode == 2 and p.stderr.startswith("mocostream: error:") and "Traceback" not in p.stderr


# ---------------------------------------------------------------- 10. --part + merge + k8s

@pytest.mark.slow
def test_parts_cover_inputs_and_merge(imagenette_small, tmp_path):
    whole = make([imagenette_small], tmp_path / "whole", shuffle=True, samples_per_shard=25, workers=2)
    out = tmp_path / "parts"
    for i in range(3):
        cli("create", imagenette_small, "--out", out, "--part", f"{i}/3", "--shuffle", "--samples-per-shard", "25",
            "--workers", "1", "--quiet")
    with pytest.raises(ShardError, match="parts not finished"):
        shutil.rmtree(out / "part-00002-of-00003")
        merge(str(out))
    cli("create", imagenette_small, "--out", out, "--part", "2/3", "--shuffle", "--samples-per-shard", "25", "--quiet")
    report = json.loads(cli("merge", out, "--json").stdout)
    m = manifest(out)
    assert report["parts"] == 3 and m["total_samples"] == 120 == whole.written and m["inputs"] == 120
    assert all(s["name"].startswith("part-0000") for s in m["shards"])
    classes = sorted(p.name for p in imagenette_small.iterdir())  # the parts' class names, joined
    assert m["classes"] == manifest(tmp_path / "whole")["classes"] == classes
    assert all(set(manifest(out / f"part-0000{i}-of-00003")["classes"]) <= set(classes) for i in range(3))
    keys = [k for k, _ in samples(out)]
    assert sorted(keys) == sorted(k for k, _ in samples(tmp_path / "whole"))  # disjoint, complete
    assert verify(str(out)) == []
    from mocostream.pipeline.filesystems import Storage
    from mocostream.pipeline.sources import read_manifest  # the trainer reads the merged manifest as it is
    shards = read_manifest(str(out / "manifest.json"), storage=Storage())
    assert [s.samples for s in shards] == [e["samples"] for e in m["shards"]] and all(os.path.exists(s.url) for s in shards)
    with pytest.raises(ShardError, match="--part"):
        make([imagenette_small], tmp_path / "x", part="3/3")


def test_k8s_indexed_job_runs_parts_then_merge():
    docs = list(yaml.safe_load_all((REPO / "ops" / "k8s" / "shards-indexed-job.yaml").read_text()))
    create, merge_job = docs
    assert create["kind"] == merge_job["kind"] == "Job" and create["apiVersion"] == "batch/v1"
    spec = create["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    c = pod["containers"][0]
    cmd = " ".join(c["command"] + c["args"])
    n = spec["completions"]
    assert "mocostream shards create" in cmd and f'--part "${{JOB_COMPLETION_INDEX}}/{n}"' in cmd
    out = cmd.split("--out ")[1].split()[0]
    m = merge_job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert m[:3] == ["mocostream", "shards", "merge"] and m[3] == out
    # the command line parses with our own CLI
    from mocostream.ops.cli import build_parser
    argv = cmd.split("exec ", 1)[1].replace('"${JOB_COMPLETION_INDEX}', "0").replace('"', "").split()[1:]
    args = build_parser().parse_args(argv)
    assert args.part == f"0/{n}" and args.out == out


# ---------------------------------------------------------------- 8. CLI

@pytest.mark.slow
def test_cli_one_line_errors(small, tmp_path):
    for argv, msg in [
        (["create", tmp_path / "missing", "--out", tmp_path / "o"], "source not found"),
        (["create", small, "--out", tmp_path / "o", "--max-size", "4", "--min-size", "8"], "--max-size 4"),
        (["create", small, "--out", "/proc/forbidden"], "cannot use destination"),
        (["create", small, "--out", tmp_path / "o", "--part", "x"], "--part"),
    ]:
        p = cli(*argv, check=False)
        assert p.returncode == 2, p.stderr
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("mocostream: error:") and msg in p.stderr, p.stderr


@pytest.mark.slow
def test_cli_help_lists_everything():
    text = cli("create", "--help").stdout
    for opt in ("--workers", "--timeout", "--max-pixels", "--min-size", "--max-size", "--quality", "--reencode",
                "--dedup", "--shuffle", "--seed", "--part", "--max-shard-bytes", "--json", "--quiet",
                "rejects.jsonl", "report.json", "_stats.json", "AWS_ENDPOINT_URL", ".jsonl", "parquet"):
        assert opt in text, opt
    for sub in ("verify", "inspect", "merge"):
        assert cli(sub, "--help").returncode == 0


def test_tar_writer_bytes_equal_what_tarfile_writes(tmp_path):
    """Our hand-built ustar headers are byte-for-byte tarfile's (USTAR_FORMAT), padding included."""
    import random
    from mocostream.shards.record import encode
    from mocostream.shards.tar_writer import TarShardWriter, sample_json
    from mocostream.shards.validate import Sample
    rng = random.Random(0)
    for trial in range(10):
        ours = TarShardWriter(str(tmp_path / "ours.tar"))
        with tarfile.open(tmp_path / "ref.tar", "w", format=tarfile.USTAR_FORMAT) as ref:
            for i in range(rng.randint(1, 20)):
                s = Sample(rng.randbytes(rng.choice([0, 1, 511, 512, 513, rng.randint(0, 5000)])),
                           rng.choice(["jpg", "png", "webp"]), 3, 4)
                key = ("k" * rng.randint(1, 90) + f"_{i}")[-90:]
                ours.add(key, "src/é", "lab", encode(s, key, "src/é", "lab", {"caption": "ç"}, tar=True))
                for name, data in ((f"{key}.{s.ext}", s.data), (f"{key}.json", sample_json(key, "src/é", "lab", s,
                                                                                           {"caption": "ç"}))):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
                    ref.addfile(info, io.BytesIO(data))
        ours.close()
        assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes(), trial
        assert ours.digest() == (len((tmp_path / "ref.tar").read_bytes()),
                                 hashlib.sha256((tmp_path / "ref.tar").read_bytes()).hexdigest())
        from mocostream.shards.wds_index import index_lines
        assert ours.index_lines() == index_lines(str(tmp_path / "ours.tar"))
