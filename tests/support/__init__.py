"""Test machinery that is not a fixture: a real `appliance serve` and the dcmtk clients that talk to it,
generated images, off-site servers (rsync daemon, sshd), the power-cut file system."""
