"""Everything the hospital client and the coordinator server both need.

``common`` imports nothing else of this repository.
"""

__version__ = "0.1.0"
