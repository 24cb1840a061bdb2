"""The contract between the HTTP side (`service`) and the queue side (`workers`).

Settings, storage back ends, Redis key names and job statuses live here so that neither side imports
the other; both depend on this package and on `melfusion`, never the reverse. Torch-free.
"""
