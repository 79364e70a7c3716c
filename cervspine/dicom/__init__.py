"""Results as DICOM, and the DICOM node that takes studies from a PACS and gives the results back.

Results of a scored study (``predict study=DIR dicom_out=OUT`` and the node):

- :mod:`.results`     :func:`~.results.write_dicom_results`: the SR and the key images of one study
- :mod:`.sr`          the TID 1500 Measurement Report (Comprehensive 3D SR); :func:`~.sr.read_sr` reads it
- :mod:`.key_images`  Secondary Capture key images with the use notice burned in
- :mod:`.source`      the source series' headers: evidence, patient/study data, type-2 completion
- :mod:`.codes`       the coded concepts; :mod:`.algorithm` the algorithm identification

The node (``python -m cervspine.serve``, :mod:`.node`):

- :mod:`.scp`       C-STORE SCP (pynetdicom): CT Image Storage from the allowed callers into the spool,
                    within :class:`~.settings.Limits`; :mod:`.listener` its TCP side (unknown addresses
                    closed unread, per-peer caps, TLS handshakes); :mod:`.callers` (AE title, address)
                    pairs; :mod:`.tls` TLS both ways; :mod:`.events` refusal events, folded
- :mod:`.spool`     durable instance files and result folders; :mod:`.queue` the persisted queue (SQLite);
                    :mod:`.retention` what is purged when
- :mod:`.answer`    the next complete series vetted (:mod:`.vetting`), scored — in a worker process,
                    :mod:`.isolation` — by :mod:`.worker` into published results, or quarantined
- :mod:`.delivery`  published results C-STOREd (:mod:`.sender`), retried or dead-lettered
- :mod:`.liveness`  the node's loops: errors caught, backed off, liveness reported
- :mod:`.status`    the status page; :mod:`.settings` the node's settings; :mod:`.faults` the fault hooks
- :mod:`.orthanc`   a private Orthanc on free ports (the tests', the benchmark's and the README's PACS)
"""
