"""Known-abuse hash lists and the hashes images are matched by.

- `image_hashes`: MD5 and SHA-1 of an image member's bytes, and PDQ (256 bits and a quality) of its decoded pixels;
- `lists`: reading and validating list files (one hash per line, kind by length) into a `HashLists` value that never
  shows a hash and is named by a fingerprint of its content;
- `pdq_index`: an exact Hamming-radius search of PDQ hashes against a list (multi-index hashing in numpy, checked against faiss);
- `matching`: a run's lists planned once and an entry's hashes matched against them;
- `image_pass`: hashing the images of an entry written before hashes existed (its one decode).

Nothing here logs hashes or talks to Prefect; only `image_pass` decodes, for entries that predate hashing.
"""
