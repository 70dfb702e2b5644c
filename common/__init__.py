"""Everything the hospital client and the coordinator server both need.

Cut by concern: ``common.imaging`` (images to model space, cache, datasets),
``common.detector`` (model, training recipe, FROC, adaptation, DP) and
``common.wire`` (federation schema, keys, records); ``config``, ``cli``,
``errors``, ``fileio`` and ``keys`` at the top. ``common`` imports nothing
else of this repository (``tests/layout/test_import_rules.py``).
"""

__version__ = "0.1.0"
