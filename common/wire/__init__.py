"""What crosses the network, and the records a run writes.

Federation schema and config, TLS and keys, app signing, fault codes and the
run-folder contract.
"""
