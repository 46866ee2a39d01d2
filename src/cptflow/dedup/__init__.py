"""Near-duplicate and exact-duplicate removal, as four file-to-file stages (datatrove's layout).

``signature`` (per input file: exact hash + MinHash signature per document) → ``bands`` (one job per
band group: LSH bucket collisions → candidate pairs, verified by estimated Jaccard) → ``clusters``
(the one global job: union-find → one kept document per cluster → a drop list per input file) →
``apply`` (per input file: remove the listed documents). ``minhash`` holds the pure core and the
``DedupConfig`` that all four share.
"""
