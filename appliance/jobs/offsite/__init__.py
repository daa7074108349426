"""Off-site replication with rsync, its verification, and the restore from it.

Layout of an off-site target (every name opaque: no UID, name or plaintext hash):

    objects/ab/cd/<name>      sealed blobs, as on the hot tier
    packs/ab/cd/<id>          packs, for versions that have no hot copy
    snapshots/<run>.index     the index (LMDB copy), sealed
    snapshots/<run>.keyring   the keyring (wrapped data keys only), sealed
    snapshots/<run>.audit     the audit trail with a checkpoint signed at the run (tar), sealed
    manifests/<run>.manifest  sealed: every object of the run with its size and xxh3-128

Snapshots and manifests are sealed with a key derived from the KEK (keys.snapshot_key):
the off-site copy is useless without the key file, which never goes with it. A run
copies objects first, snapshots next and its manifest last (the manifest is the
commit point); rsync writes under a partial directory and moves files in place at
the end (`--partial-dir --delay-updates`); exit codes other than 0 (23 and 24
included) fail the run. An object counts as replicated only once verified: read
back and hashed for local and rsync-daemon targets, `rsync --dry-run --checksum
--itemize-changes` showing no difference for ssh. Objects of studies deleted at home
are deleted off-site by the next run; manifests beyond `keep_manifests` go with their
snapshots.

Restore builds a new home from the latest manifest's snapshot plus every object
off-site (objects newer than the snapshot are indexed from their bytes), with the
packs on the home's `cold` tier.
"""
