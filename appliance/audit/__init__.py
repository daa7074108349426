"""The audit trail: who did what to which images, append-only, hash-chained, signed.

Layout (`HOME/audit/`):

    trail/<first seq, 12 digits>.log   JSON lines, one record each; a new segment past 64 MB
    head                               the latest signed checkpoint (rewritten by every append)
    checkpoints.log                    signed checkpoints kept for good: every 1,000 records,
                                       every hour, and before every off-site copy
    config.digest                      SHA-256 of each configuration file, to notice changes
    reserve                            1 MB set aside: released when the volume fills, so the
                                       records of the last stores still fit

A record is one line of canonical JSON (sorted keys, no spaces): `seq` (1, 2, ...), `time`
(UTC), `prev` (SHA-256 of the previous record's line, newline included), then the event
in the DICOM audit vocabulary (PS3.15 A.5: `event`, `type`, `action` C/R/U/D/E,
`outcome` 0/4/8/12) and who (`user`, `host`), what (`op`, `patient`, `study`,
`instances`, `dest`) and the rest (`detail`). Changing, removing, inserting or reordering
any byte breaks a link; removing records from the end is caught by the head and the
checkpoints, which an Ed25519 key signs (`audit.key_file`: kept apart from the KEK, never
replicated). A key is trusted when a record of the trail announces it (`audit_key`: the
first record, and a restore) or when `audit verify --public-key` pins it.

Writers are several processes (the server, every CLI command): each append takes an
exclusive flock on `audit/lock`, continues the chain from the last line on disk, fsyncs
and signs a new head. Inside a process, concurrent records are group-committed: one
thread writes a batch while the others wait for it, so a C-STORE is answered only once
its record is durable.
"""
