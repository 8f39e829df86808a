"""The backend-independent core: wire format, call identity, the protocol and its verdicts.

Nothing here knows MPI or torch: transports implement ``core.transport.Transport`` above it.
"""
