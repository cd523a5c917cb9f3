"""FAISS indices: which one to build, how to build and tune it, and the exact reference it is judged by.

Vectors are L2-normalised and compared by inner product; ids are the store's int64 primary keys.
This package knows nothing about the store: :mod:`index.index_dir` keeps its files in sync.

Modules:

* ``vector_index``: :class:`~index.ann.vector_index.VectorIndex`: add, remove, filtered search, save/load.
* ``factory``: the factory rule (exact up to 100k vectors, IVF with a codec sized to a byte budget) and
  parsing of factory strings.
* ``build``: train, add and tune an index; rank candidate factories by measured recall on a sample.
* ``parts``: building blocks: id selectors, inner-product PCA, input checks, exact re-ranking.
* ``reference``: brute-force search, k-recall@k and seeded clustered test vectors.
"""
