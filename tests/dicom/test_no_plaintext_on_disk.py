"""Invariant 7, as an attacker with the stolen disk would look: the home on a loop-mounted
ext4 image, large instances stored over DICOM with canaries in what the index does not
keep (Image Comments, a byte pattern starting every frame), the page cache written out
again and again while they arrive; then the server stops, the image is unmounted and every
byte of it is searched: no canary, no unsealed Part 10 header, anywhere."""

from __future__ import annotations

import mmap
import subprocess
import threading
import os

import pytest

import corpus
from conftest import run_cli
from support.dicom_server import CLIENT_AE, Server, dcmtk, free_port, register

COMMENT = "CANARY-COMMENT-7f3a91 not in the index"
MARKER = b"PV-PIXEL-CANARY-c4e2"


@pytest.fixture
def ext4_image(tmp_path):
    image, mount = tmp_path / "disk.img", tmp_path / "mnt"
    mount.mkdir()
    with open(image, "wb") as fp:
        fp.truncate(1200 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    if subprocess.run(["mount", "-o", "loop", str(image), str(mount)]).returncode != 0:
        pytest.skip("cannot loop-mount an ext4 image here (needs root)")
    try:
        yield image, mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_no_plaintext_of_a_received_instance_reaches_the_disk(ext4_image, tmp_path):
    image, mount = ext4_image
    home = mount / "home"
    run_cli("init", home=home)
    register(home, CLIENT_AE, free_port(), "store,query,retrieve")
    sources = [corpus.multiframe(tmp_path / f"big{n}.dcm", 160, comments=COMMENT, marker=MARKER + bytes([n]),
                                 seed=n) for n in range(2)]
    srv = Server(home, log_dir=tmp_path).start()
    stop = threading.Event()

    def write_back():  # dirty pages out to the image while the instances arrive
        while not stop.is_set():
            os.sync()
            stop.wait(0.1)

    syncing = threading.Thread(target=write_back)
    syncing.start()
    try:
        dcmtk("storescu", "-aet", CLIENT_AE, "-aec", "ARCHIVE", "127.0.0.1", str(srv.port), *map(str, sources))
    finally:
        stop.set()
        syncing.join()
        srv.stop()
    assert run_cli("status", "--json", home=home).stdout.count('"instances": 2') == 1
    subprocess.run(["umount", str(mount)], check=True)
    with open(image, "rb") as fp, mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as disk:
        for needle in (COMMENT.encode(), MARKER, b"DICM\x02\x00"):
            assert disk.find(needle) == -1, needle
        # and the search does find what is there in the clear: the index's attributes
        assert disk.find(b"BIG^FRAMES") != -1
