"""The physical limits every other figure sits under: the disk, one core, and sealing on two cores.

    python benchmarks/limits_bench.py [--quick] [--mb N] [--syncs N] [--ct N] [--workdir DIR] [--results DIR]

On the file system under test (the work directory):
- sequential write with `dd conv=fdatasync` (of zeros: a compressing or deduplicating
  file system flatters it), sequential read with `dd iflag=direct` (past the page cache);
- fdatasync rate: 4 KB appended and synced, as a journal does;
- durable new files: a 10 KB file written, fsynced, renamed into place and its
  directory fsynced, as every stored blob is;
on one core, over CT bytes: zstd-3 compression and decompression, AES-256-GCM,
SHA-256, xxh3-128; and the sealing limit import is held to: the CT instances, held in
memory with their content addresses (taken beforehand: `sealed.seal` hashes the bytes
itself as it seals, and checks them against it), each sealed by `sealed.seal` as the
archive seals CT (zstd-3 over shuffled bytes, AES-256-GCM), by one process, then by two
at once (each over its half) into /dev/null (the CPU limit) and into files in the work
directory with one fdatasync per file (the CPU + disk limit; no rename or directory sync,
so it bounds any durable put from above). MB/s of instance bytes, the median of a few rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import corpus  # noqa: E402
from common import IMPORT_STUDY_INSTANCES, add_common_arguments, machine, run_and_report  # noqa: E402

from appliance.format import sealed  # noqa: E402

SEALING_PROCESSES = 2  # issue 16 holds import to the sealing limit of the appliance's two cores


def _dd_mb_s(*args: str, megabytes: int) -> float:
    start = time.perf_counter()
    subprocess.run(["dd", "bs=1M", f"count={megabytes}", *args], check=True, capture_output=True)
    return megabytes * 1.048576 / (time.perf_counter() - start)


def disk(work: Path, megabytes: int, syncs: int) -> dict:
    target = work / "dd.bin"
    write = _dd_mb_s("if=/dev/zero", f"of={target}", "conv=fdatasync", megabytes=megabytes)
    direct = True
    try:
        read = _dd_mb_s(f"if={target}", "of=/dev/null", "iflag=direct", megabytes=megabytes)
    except subprocess.CalledProcessError:  # a file system without O_DIRECT (tmpfs): through the cache
        direct = False
        read = _dd_mb_s(f"if={target}", "of=/dev/null", megabytes=megabytes)
    target.unlink()

    block = os.urandom(4096)
    fd = os.open(work / "journal", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        start = time.perf_counter()
        for _ in range(syncs):
            os.write(fd, block)
            os.fdatasync(fd)
        fdatasync_per_s = syncs / (time.perf_counter() - start)
    finally:
        os.close(fd)

    payload = os.urandom(10_000)
    directory = work / "files"
    directory.mkdir()
    start = time.perf_counter()
    for number in range(syncs):
        tmp, final = directory / f"{number}.tmp", directory / str(number)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, payload)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, final)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    durable_files_per_s = syncs / (time.perf_counter() - start)
    return {"seq_write_fdatasync_mb_s": write, "seq_read_mb_s": read, "seq_read_o_direct": direct,
            "fdatasync_4k_per_s": fdatasync_per_s, "durable_10k_files_per_s": durable_files_per_s}


def one_core(data: bytes) -> dict:
    """MB/s of each codec pacs-vault runs, on one core, over `data` (CT instances)."""
    import xxhash
    import zstandard
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    def rate(fn) -> float:
        start = time.perf_counter()
        fn()
        return len(data) / (time.perf_counter() - start) / 1e6

    aead, nonce = AESGCM(os.urandom(32)), os.urandom(12)
    segments = [data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
    compressed = zstandard.ZstdCompressor(level=3).compress(data)
    return {"zstd3_compress_mb_s": rate(lambda: zstandard.ZstdCompressor(level=3).compress(data)),
            "zstd_decompress_mb_s": rate(lambda: zstandard.ZstdDecompressor().decompress(compressed)),
            "aes256gcm_mb_s": rate(lambda: [aead.encrypt(nonce, s, None) for s in segments]),
            "sha256_mb_s": rate(lambda: hashlib.sha256(data).digest()),
            "xxh3_128_mb_s": rate(lambda: xxhash.xxh3_128_digest(data))}


def _seal_share(share: list[tuple[bytes, bytes]], directory: Path | None, barrier, finished) -> None:
    """One sealing process: once every process is ready, seal `share` (instance, content address)
    into /dev/null (`directory` None) or into one file each there, fdatasync'ed; puts its
    (start, end) on `finished`."""
    data_key, key_id = os.urandom(32), os.urandom(16)
    barrier.wait()
    start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    for number, (data, address) in enumerate(share):
        with open(directory / str(number) if directory else os.devnull, "wb") as dst:
            sealed.seal(io.BytesIO(data), len(data), dst, data_key=data_key, key_id=key_id,
                        content_address=address, shuffled=True)
            if directory:
                dst.flush()
                os.fdatasync(dst.fileno())
    finished.put((start, time.perf_counter()))


def _sealing_mb_s(instances: list[tuple[bytes, bytes]], processes: int, directory: Path | None,
                  rounds: int) -> float:
    """Median over `rounds` of the instance bytes per second `processes` processes seal at once."""
    context = multiprocessing.get_context("fork")  # the shares are inherited, not pickled
    rates = []
    for _ in range(rounds):
        barrier, finished = context.Barrier(processes), context.Queue()
        workers = []
        for number in range(processes):
            target = directory / str(number) if directory else None
            if target:
                target.mkdir(parents=True)
            workers.append(context.Process(target=_seal_share, args=(instances[number::processes], target,
                                                                     barrier, finished)))
        for worker in workers:
            worker.start()
        spans = [finished.get() for _ in workers]
        for worker in workers:
            worker.join()
            if worker.exitcode != 0:
                raise RuntimeError(f"a sealing process failed (exit code {worker.exitcode})")
        if directory:
            shutil.rmtree(directory)
        seconds = max(end for _, end in spans) - min(start for start, _ in spans)
        rates.append(sum(len(data) for data, _ in instances) / seconds / 1e6)
    return statistics.median(rates)


def sealing(instances: list[bytes], work: Path, rounds: int) -> dict:
    instances = [(data, hashlib.sha256(data).digest()) for data in instances]
    return {"processes": SEALING_PROCESSES, "rounds": rounds,
            "one_process_null_mb_s": _sealing_mb_s(instances, 1, None, rounds),
            "two_processes_null_mb_s": _sealing_mb_s(instances, SEALING_PROCESSES, None, rounds),
            "two_processes_synced_files_mb_s": _sealing_mb_s(instances, SEALING_PROCESSES, work / "sealed", rounds)}


def run(work: Path, megabytes: int, syncs: int, ct: int, rounds: int) -> dict:
    instances = [p.read_bytes() for p in corpus.ct_study(work / "ct", ct)]
    return {"machine": machine(), "disk": disk(work, megabytes, syncs), "one_core": one_core(b"".join(instances)),
            "sealing": {"instances": ct, **sealing(instances, work, rounds)}}


def markdown(results: dict) -> str:
    d, c, s = results["disk"], results["one_core"], results["sealing"]
    return "\n".join([
        "| physical limit | value |", "|---|---|",
        f"| disk sequential write (dd, fdatasync) | {d['seq_write_fdatasync_mb_s']:.0f} MB/s |",
        f"| disk sequential read (dd, {'O_DIRECT' if d['seq_read_o_direct'] else 'page cache'}) | "
        f"{d['seq_read_mb_s']:.0f} MB/s |",
        f"| 4 KB append + fdatasync | {d['fdatasync_4k_per_s']:.0f} /s |",
        f"| 10 KB file: write, fsync, rename, fsync directory | {d['durable_10k_files_per_s']:.0f} /s |",
        f"| one core: zstd-3 compress / decompress | {c['zstd3_compress_mb_s']:.0f} / "
        f"{c['zstd_decompress_mb_s']:.0f} MB/s |",
        f"| one core: AES-256-GCM, SHA-256, xxh3-128 | {c['aes256gcm_mb_s']:.0f}, {c['sha256_mb_s']:.0f}, "
        f"{c['xxh3_128_mb_s']:.0f} MB/s |",
        f"| sealing CT from memory (sealed.seal), one process, into /dev/null | "
        f"{s['one_process_null_mb_s']:.0f} MB/s |",
        f"| sealing, {s['processes']} processes at once, into /dev/null (CPU limit) | "
        f"{s['two_processes_null_mb_s']:.0f} MB/s |",
        f"| sealing, {s['processes']} processes at once, into files, one fdatasync per file (CPU + disk limit) | "
        f"{s['two_processes_synced_files_mb_s']:.0f} MB/s |",
        "", f"Sealing: {s['instances']} CT instances, median of {s['rounds']} rounds, MB/s of instance bytes."])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024, help="size of the sequential write and read")
    parser.add_argument("--syncs", type=int, default=1000, help="synced appends and durable files timed")
    parser.add_argument("--ct", type=int, default=IMPORT_STUDY_INSTANCES,
                        help="CT instances the codecs and the sealing run over (the import benchmark's study)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    megabytes, syncs, ct, rounds = (32, 50, 12, 1) if args.quick else (args.mb, args.syncs, args.ct, 3)
    return run_and_report("limits", args, lambda work: run(work, megabytes, syncs, ct, rounds), markdown)


if __name__ == "__main__":
    raise SystemExit(main())
